"""Sandbox launcher: prepares the scratch disk and the limits, then execs bubblewrap.

Started by `stillhouse.verify.sandbox.run_python`, never imported. It uses only the standard
library so it runs under the base interpreter in isolated mode. Steps:

1. a private mount namespace (with a user namespace mapping us to its root when not started as
   root) holding `/sandbox`: a tmpfs limited in size and in inodes, nosuid, nodev, noexec, owned
   by the uid the program runs as (bubblewrap cannot set an inode limit itself), and binds of
   the interpreter's directories where an unprivileged bubblewrap can reach them;
2. resource limits (address space, CPU, file size, open files, processes), inherited by
   everything bubblewrap starts;
3. as root: give up root for a fresh, otherwise unused uid with no groups and no capabilities,
   so that bubblewrap runs unprivileged and the program's uid owns nothing on the host;
4. exec bubblewrap with the arguments `sandbox.py` prepared (new user, PID, network, IPC, UTS,
   cgroup namespaces; a read-only root; a non-zero uid; no capabilities; no new privileges; the
   seccomp filter read from an fd this launcher opens).

Set-up failures are written to the status pipe (fd given in the config) so the parent can tell
them apart from the untrusted program's own exit codes. The pipe stays open through bubblewrap
into the sandbox, where a one-line bootstrap writes "started" to it and closes it before exec'ing
the program: no "started" means the sandbox never came up.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _user_processes(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += os.stat(f"/proc/{pid}").st_uid == uid
            except OSError:
                pass
    return n


def _stage(cfg: dict, owner: int) -> None:
    """Mount a small tmpfs over our private directory cfg['stage'] (in our mount namespace only:
    the parent still sees its files there) holding what bubblewrap binds into the sandbox:
    box/, the /sandbox tmpfs with main.py and tmp/, and ro/N, binds of the interpreter's
    directories (under /root, say, which a fresh uid could not reach)."""
    stage = cfg["stage"]
    with open(os.path.join(stage, "main.py"), "rb") as f:
        code = f.read()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=64,mode=0755")
    box = os.path.join(stage, "box")
    os.mkdir(box)
    opts = f"size={cfg['tmp_mb']}m,nr_inodes={cfg['inodes']},mode=0700,uid={owner},gid={owner}"
    _mount("tmpfs", box, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    with open(os.path.join(box, "main.py"), "wb") as f:
        f.write(code)
    os.mkdir(os.path.join(box, "tmp"), 0o1777)
    for path in (os.path.join(box, "main.py"), os.path.join(box, "tmp")):
        os.chown(path, owner, owner)
    os.mkdir(os.path.join(stage, "ro"))
    for i, path in enumerate(cfg["ro_paths"]):
        target = os.path.join(stage, "ro", str(i))
        os.mkdir(target)
        _mount(path, target, None, MS_BIND | MS_REC)  # bubblewrap makes it read-only


def _limit(cfg: dict, nproc: int) -> None:
    mem = cfg["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["output_bytes"], cfg["output_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    root_user = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    try:
        # bubblewrap's monitor and the sandbox's init are two more processes of the same uid.
        # As root the program gets a fresh uid, so RLIMIT_NPROC counts only its own processes;
        # otherwise the limit has to leave room for the user's other processes.
        nproc = cfg["processes"] + 2 + (0 if root_user else _user_processes(uid))
        if root_user:
            _check(_libc.unshare(CLONE_NEWNS), "unshare")
            owner = cfg["uid"]
        else:
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare")
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
            owner = 0  # our uid, seen from inside this user namespace
        seccomp_fd = os.open(cfg["seccomp"], os.O_RDONLY)  # before the mount hides it
        os.set_inheritable(seccomp_fd, True)
        _stage(cfg, owner)
        _limit(cfg, nproc)
        if root_user:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # also clears every capability set
        args = [a.replace("{SECCOMP_FD}", str(seccomp_fd)) for a in cfg["bwrap"]]
        os.execv(args[0], args)
    except Exception as exc:  # noqa: BLE001 - reported through the status pipe
        os.write(status_fd, f"{type(exc).__name__}: {exc}".encode())
        os._exit(125)


if __name__ == "__main__":
    main()
