"""Run untrusted Python (model-written code) in an isolated, resource-limited process.

The program runs under the base interpreter inside bubblewrap (`bwrap`, Debian's `bubblewrap`):
its own user, PID, network, IPC, UTS and cgroup namespaces; a read-only root holding only what
the interpreter needs; a non-zero uid with no capabilities, PR_SET_NO_NEW_PRIVS and a seccomp
filter (`seccomp_policy.py`); a scratch `/sandbox` that is a size- and inode-limited tmpfs; no
network, none of the user's files, no environment variables of ours, and hard limits on wall
time, CPU time, memory, output size and process count. Everything it starts dies with it.
Whatever it does comes back as a `SandboxResult`; only a sandbox that cannot be set up at all
raises, because then nothing is isolated. docs/sandbox.md has the details per mode (root or not).

The preparation bubblewrap cannot do (the inode-limited tmpfs, rlimits, giving up root) is done
by `_sandbox_launch.py`, a separate small interpreter, so no unsafe work happens in a forked copy
of this (multi-threaded) process.
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
from stillhouse.verify import seccomp_policy

_LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall clock for the whole run, set-up included
    cpu_s: int = 10  # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS); see docs/sandbox.md for the total
    processes: int = 32  # processes and threads the program may have at once (RLIMIT_NPROC)
    output_bytes: int = 1_000_000  # per output stream, and per file the program writes
    tmp_mb: int = 64  # size of the /sandbox tmpfs (its /tmp lives there too)
    inodes: int = 2048  # files and directories the /sandbox tmpfs can hold


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


_SANDBOX_UID = 1000  # the program's uid inside its user namespace: not root
# Runs first inside the sandbox: tells the parent the sandbox came up, then becomes the program.
_BOOT = "import os,sys;os.write({fd},b'started');os.close({fd});os.execv(sys.executable,[sys.executable,'-I','-B','main.py'])"


def _bwrap_args(bwrap: str, python: str, ro_paths: list[str], stage: Path, status_fd: int) -> list[str]:
    """The bubblewrap command line; `{SECCOMP_FD}` is filled in by the launcher, which opens it.
    `stage` is where the launcher mounts box/ (the /sandbox tmpfs) and ro/N (the `ro_paths`)."""
    args = [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--new-session", "--cap-drop", "ALL", "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID),
        "--hostname", "sandbox", "--ro-bind", "/usr", "/usr",
    ]
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        host = "/" + name
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    for i, path in enumerate(ro_paths):
        args += ["--ro-bind", str(stage / "ro" / str(i)), path]
    box = stage / "box"
    args += [
        "--proc", "/proc", "--dev", "/dev", "--bind", str(box), "/sandbox", "--bind", str(box / "tmp"), "/tmp",
        # bwrap's /dev is an unlimited tmpfs; its shm/ would be memory outside every limit
        "--bind", str(box / "tmp"), "/dev/shm",
        "--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox",
        "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--seccomp", "{SECCOMP_FD}",
        "--", python, "-I", "-S", "-c", _BOOT.format(fd=status_fd),
    ]
    return args


def run_python(code: str, *, stdin: str = "", limits: Limits | None = None) -> SandboxResult:
    """Run `code` as `main.py` in a fresh sandbox; the result never raises for what the code does."""
    if not sys.platform.startswith("linux"):
        raise StillhouseError("sandbox: untrusted code runs only on Linux (namespaces are required)")
    bwrap = shutil.which("bwrap") or ("/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else None)
    if bwrap is None:
        raise StillhouseError("sandbox: bubblewrap is not installed (apt-get install bubblewrap); untrusted code needs it")
    limits = limits or Limits()
    python, ro_paths = _interpreter()
    private = Path(tempfile.mkdtemp(prefix="stillhouse-sbx-"))  # ours: program, outputs, mount point
    try:
        (private / "main.py").write_text(code)
        (private / "seccomp.bpf").write_bytes(seccomp_policy.bpf())
        (private / "stdin").write_text(stdin)
        uid = 2_000_000_000 + secrets.randbelow(100_000_000)  # fresh, owns nothing on the host
        status_r, status_w = os.pipe()
        cfg = {
            "stage": str(private), "ro_paths": ro_paths, "seccomp": str(private / "seccomp.bpf"),
            "status_fd": status_w, "uid": uid, "memory_mb": limits.memory_mb,
            "cpu_s": int(limits.cpu_s), "output_bytes": limits.output_bytes,
            "processes": limits.processes, "tmp_mb": limits.tmp_mb, "inodes": limits.inodes,
            "bwrap": _bwrap_args(bwrap, python, ro_paths, private, status_w),
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
            os.killpg(proc.pid, 9)  # bubblewrap's death takes the sandbox (--die-with-parent) with it
            proc.wait()
        wall = time.monotonic() - start
        with os.fdopen(status_r, "rb") as f:
            status = f.read().decode(errors="replace")
        err_bytes = (private / "stderr").read_bytes()
        if status != "started" and not timed_out:
            why = status.strip() or _bwrap_error(err_bytes) or f"exit {proc.returncode}"
            raise StillhouseError(f"sandbox: cannot isolate untrusted code ({why})")
        out_size = (private / "stdout").stat().st_size
        out = (private / "stdout").read_bytes()[: limits.output_bytes].decode(errors="replace")
        err = err_bytes[: limits.output_bytes].decode(errors="replace")
        code_ = None if timed_out else proc.returncode
        return SandboxResult(_classify(code_, timed_out, out_size, err, limits), code_, out, err, wall)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _bwrap_error(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.startswith("bwrap:")]
    return lines[-1] if lines else ""
