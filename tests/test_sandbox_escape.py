"""The escape battery (stillhouse.verify.escape_battery) in both of the sandbox's modes: as the
user running the tests (root in CI) and as an unprivileged uid through setpriv. Every attack
must be blocked; a control run with no sandbox shows the checks do see an escape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stillhouse.verify.escape_battery import ATTACKS, run_battery, unprivileged_command
from support import SRC


def _assert_all_blocked(outcomes):
    assert len(outcomes) == len(ATTACKS) >= 30
    escaped = [f"{o.name}: {o.evidence}" for o in outcomes if o.escaped]
    assert escaped == []


def test_battery_as_the_current_user():
    # As root this is the root mode (a fresh uid, then bubblewrap); otherwise the non-root mode.
    _assert_all_blocked(run_battery())


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root; the current-user test covers non-root")
def test_battery_as_an_unprivileged_user():
    cmd = unprivileged_command([sys.executable, "-m", "stillhouse.verify.escape_battery", "--json"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), "LANG": "C.UTF-8"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert r.stdout, r.stderr
    outcomes = json.loads(r.stdout)
    assert len(outcomes) == len(ATTACKS)
    assert [o["name"] for o in outcomes if o["escaped"]] == [], r.stdout
    assert r.returncode == 0


def _unsandboxed(code, *, limits):
    """The control: the same program run directly on the host, as the sandbox's result type."""
    from stillhouse.verify.sandbox import SandboxResult

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd="/tmp")
    return SandboxResult("ok" if r.returncode == 0 else "error", r.returncode, r.stdout, r.stderr, 0.0)


def test_the_checks_see_an_escape_when_there_is_no_sandbox():
    names = ["read_secret", "write_host_file", "unix_socket_path", "unix_socket_abstract", "tcp_loopback",
             "kill_host_process", "list_host_processes", "host_pid_environ"]
    outcomes = run_battery(runner=_unsandboxed, names=names)
    assert sorted(o.name for o in outcomes) == sorted(names)
    assert all(o.escaped for o in outcomes), [(o.name, o.evidence) for o in outcomes if not o.escaped]
    # host-side evidence, not only the program's word
    by_name = {o.name: o.evidence for o in outcomes}
    assert "host file was written" in by_name["write_host_file"]
    assert "tcp listener got a connection" in by_name["tcp_loopback"]
    assert "host process died" in by_name["kill_host_process"]
