"""The escape battery (stillhouse.verify.escape_battery) in both of the sandbox's modes: as the
user running the tests (root in CI) and as an unprivileged uid through setpriv. Every attack
must be blocked; a control run with no sandbox shows the checks do see an escape."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stillhouse.verify.escape_battery import ATTACKS, run_battery, unprivileged_command
from support import SRC


_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), "LANG": "C.UTF-8"}


def _assert_all_blocked(outcomes):
    assert len(outcomes) == len(ATTACKS) >= 30
    escaped = [f"{o.name}: {o.evidence}" for o in outcomes if o.escaped]
    assert escaped == []


def test_battery_as_the_current_user():
    # As root this is the root mode (a fresh uid, then bubblewrap); otherwise the non-root mode.
    _assert_all_blocked(run_battery())


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root; the current-user test covers non-root")
def test_battery_as_an_unprivileged_user():
    cmd = unprivileged_command([sys.executable, "-m", "stillhouse.verify.escape_battery", "--json"], reach=[str(SRC)])
    r = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, cwd="/", timeout=600)
    assert r.stdout, r.stderr
    outcomes = json.loads(r.stdout)
    assert len(outcomes) == len(ATTACKS)
    assert [o["name"] for o in outcomes if o["escaped"]] == [], r.stdout
    assert r.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root; test_sandbox.py covers non-root")
def test_resource_limits_hold_as_an_unprivileged_user():
    """test_sandbox.py's fork bomb, memory bomb, loop, output flood and hidden files, as uid 65534
    (the non-root mode: the launcher's own user namespace, then bubblewrap)."""
    home = Path(tempfile.mkdtemp(prefix="stillhouse-nobody-"))  # pytest's tmp_path is root's 0700
    os.chown(home, 65534, 65534)
    tests = Path(__file__).parent
    picked = "fork_bomb or memory_bomb or infinite_loop or output_flood or users_files or environment"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={home / 't'}",
            str(tests / "test_sandbox.py"), "-k", picked]
    cmd = unprivileged_command(argv, reach=[str(SRC), str(tests)])
    r = subprocess.run(cmd, capture_output=True, text=True, env=_ENV | {"HOME": str(home), "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": f"{SRC}:{tests}"}, cwd="/", timeout=600)
    shutil.rmtree(home, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "6 passed" in r.stdout, r.stdout


def _unsandboxed(code, *, limits):
    """The control: the same program run directly on the host, as the sandbox's result type."""
    from stillhouse.verify.sandbox import SandboxResult

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/tmp")
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
