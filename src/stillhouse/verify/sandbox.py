"""Run untrusted Python (model-written code) in an isolated, resource-limited process.

The program runs under the base interpreter in a separate process that sees no network (its
own network namespace), none of the user's files (a throwaway root with read-only system
directories and a scratch /sandbox), no environment variables of ours, and hard limits on wall
time, CPU time, memory, output size and process count. Everything it starts dies with it (it is
PID 1 of its own PID namespace). Whatever it does comes back as a `SandboxResult`; only a
sandbox that cannot be set up at all raises, because then nothing is isolated.

Needs Linux namespaces: root, or unprivileged user namespaces (the default on most
distributions). The isolation itself is done by `_sandbox_launch.py`, a separate small
interpreter, so no unsafe work happens in a forked copy of this (multi-threaded) process.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stillhouse.errors import StillhouseError

_LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")
_SETUP_FAILED = 125


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    processes: int = 32
    output_bytes: int = 1_000_000
    tmp_mb: int = 64


@dataclass(frozen=True)
class SandboxResult:
    status: str  # ok | error | timeout | memory | output_limit
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def _interpreter() -> tuple[str, list[str]]:
    """The base interpreter (not a venv's symlink) and the directories it needs to start."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    paths = {prefix, os.path.dirname(python)}
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib:
        paths.add(os.path.realpath(stdlib))
    # Keep only outermost directories; /usr is always bound by the launcher.
    keep = sorted(p for p in paths if not any(p != q and p.startswith(q + os.sep) for q in paths))
    return python, [p for p in keep if p != "/usr" and not p.startswith("/usr/")]


def _classify(code: int | None, timed_out: bool, out_size: int, err: str, limits: Limits) -> str:
    if timed_out:
        return "timeout"
    if code == 0:
        return "ok"
    if code in (128 + 24, 128 + 9) and "MemoryError" not in err:  # SIGXCPU, or killed at the hard limit
        return "timeout"
    if "MemoryError" in err or "Cannot allocate memory" in err:
        return "memory"
    if out_size >= limits.output_bytes or "File too large" in err:
        return "output_limit"
    return "error"


def run_python(code: str, *, stdin: str = "", limits: Limits | None = None) -> SandboxResult:
    """Run `code` as `main.py` in a fresh sandbox; the result never raises for what the code does."""
    if not sys.platform.startswith("linux"):
        raise StillhouseError("sandbox: untrusted code runs only on Linux (namespaces are required)")
    limits = limits or Limits()
    python, ro_paths = _interpreter()
    private = Path(tempfile.mkdtemp(prefix="stillhouse-sbx-"))  # ours: output files, new root
    try:
        work = private / "work"
        newroot = private / "root"
        work.mkdir()
        newroot.mkdir()
        (work / "main.py").write_text(code)
        uid = 2_000_000_000 + secrets.randbelow(100_000_000)  # fresh, owns nothing on the host
        if os.geteuid() == 0:
            os.chown(work, uid, uid)
            os.chown(work / "main.py", uid, uid)
        (private / "stdin").write_text(stdin)
        status_r, status_w = os.pipe()
        cfg = {
            "python": python, "ro_paths": ro_paths, "workdir": str(work), "newroot": str(newroot),
            "status_fd": status_w, "uid": uid, "memory_mb": limits.memory_mb,
            "cpu_s": int(limits.cpu_s), "output_bytes": limits.output_bytes,
            "processes": limits.processes, "tmp_mb": limits.tmp_mb,
        }
        start = time.monotonic()
        with open(private / "stdin", "rb") as fin, open(private / "stdout", "wb") as fout, \
                open(private / "stderr", "wb") as ferr:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", str(_LAUNCHER), json.dumps(cfg)],
                stdin=fin, stdout=fout, stderr=ferr, pass_fds=(status_w,),
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True, close_fds=True,
            )
        os.close(status_w)
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # the launcher's death takes PID 1 and its namespace with it
            proc.wait()
        wall = time.monotonic() - start
        with os.fdopen(status_r, "rb") as f:
            setup_error = f.read().decode(errors="replace")
        if setup_error:
            raise StillhouseError(f"sandbox: cannot isolate untrusted code ({setup_error.strip()})")
        out_size = (private / "stdout").stat().st_size
        out = (private / "stdout").read_bytes()[: limits.output_bytes].decode(errors="replace")
        err = (private / "stderr").read_bytes()[: limits.output_bytes].decode(errors="replace")
        code_ = None if timed_out else proc.returncode
        return SandboxResult(_classify(code_, timed_out, out_size, err, limits), code_, out, err, wall)
    finally:
        shutil.rmtree(private, ignore_errors=True)
