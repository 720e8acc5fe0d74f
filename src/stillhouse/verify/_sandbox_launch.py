"""Sandbox launcher: runs as its own single-threaded interpreter, isolates, then execs Python.

Started by `stillhouse.verify.sandbox.run_python`, never imported. It uses only the standard
library so it runs under the base interpreter in isolated mode. Steps:

1. new namespaces: mount, network (loopback only, down), IPC, UTS, PID, and a user namespace
   when not root;
2. fork: the child is PID 1 of the new PID namespace, so when it exits or is killed the kernel
   kills every process it left behind (fork bombs included);
3. the child builds a throwaway root (tmpfs) holding read-only binds of /usr, the interpreter's
   prefix and a few device nodes, a private /tmp, and the work directory at /sandbox, then
   chroots into it: the user's files, home directory and other temp files are not there;
4. resource limits (address space, CPU, file size, open files, processes), a fresh unprivileged
   uid when started as root, death-signal tied to the launcher, and exec with a clean env.

Set-up failures are written to the status pipe (fd given in the config) so the parent can tell
them apart from the untrusted program's own exit codes; the pipe is close-on-exec, so a clean
exec leaves it empty.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def _bind(src: str, dst: str, *, readonly: bool, userns: bool) -> None:
    _mount(src, dst, None, MS_BIND | MS_REC)
    if readonly:
        try:
            _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (MS_NODEV if userns else 0))
        except OSError:
            if not userns:  # as root a read-only remount must work; in a user namespace the
                raise       # locked flags can refuse it, and the files are not ours to write anyway


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


def _build_root(cfg: dict, userns: bool) -> None:
    root = cfg["newroot"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID, "size=16m,mode=0755")
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, name))
        elif os.path.isdir(host):
            os.makedirs(os.path.join(root, name))
            _bind(host, os.path.join(root, name), readonly=True, userns=userns)
    binds = ["/usr"] + [p for p in cfg["ro_paths"] if not p.startswith("/usr/")]
    for path in binds:
        target = root + path
        os.makedirs(target, exist_ok=True)
        _bind(path, target, readonly=True, userns=userns)
    os.makedirs(root + "/dev")
    for dev in ("null", "zero", "urandom", "random"):
        open(f"{root}/dev/{dev}", "w").close()
        try:
            _bind(f"/dev/{dev}", f"{root}/dev/{dev}", readonly=False, userns=userns)
        except OSError:
            pass
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    os.makedirs(root + "/sandbox")
    _bind(cfg["workdir"], root + "/sandbox", readonly=False, userns=userns)
    os.chroot(root)
    os.chdir("/sandbox")


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
    os.set_inheritable(status_fd, False)  # a clean exec closes it: no message means success
    root_user = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    try:
        # As root the program runs under a fresh uid, so RLIMIT_NPROC counts only its own
        # processes; otherwise the limit has to leave room for the user's other processes.
        nproc = cfg["processes"] if root_user else cfg["processes"] + _user_processes(uid)
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
        if not root_user:
            flags |= CLONE_NEWUSER
        _check(_libc.unshare(flags), "unshare")
        if not root_user:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
    except Exception as exc:  # noqa: BLE001 - reported through the status pipe
        os.write(status_fd, f"{type(exc).__name__}: {exc}".encode())
        os._exit(125)

    pid = os.fork()
    if pid == 0:
        try:
            _build_root(cfg, userns=not root_user)
            _limit(cfg, nproc)
            if root_user:
                os.setgroups([])
                os.setgid(cfg["uid"])
                os.setuid(cfg["uid"])
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            env = {"PATH": "/usr/bin:/bin", "HOME": "/sandbox", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
            os.execve(cfg["python"], [cfg["python"], "-I", "-B", "main.py"], env)
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(status_fd, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(125)
    os.close(status_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
