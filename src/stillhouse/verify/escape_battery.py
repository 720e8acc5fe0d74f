"""The sandbox escape battery: attacks run through `run_python`, each checked from both sides.

    python -m stillhouse.verify.escape_battery [--json] [--verbose] [--sandbox OTHER/sandbox.py]  # as the current user
    python bench/sandbox_escape.py                              # as root and as uid 65534, one table

Every attack is a small program that prints `ESCAPED <how>` if it got through. The host side
plants what an attacker would be after and checks it independently: a 0600 file of the user
(the secret), a path the program tries to create, a UNIX socket (by path and abstract), a TCP
listener on the host's loopback, and a process of the user to kill. An attack counts as an
escape when the program says so OR the host saw the effect, so an attack that lies about its
result, or a sandbox that lies to the attack, is still caught.

Raw system-call numbers come from libseccomp (`pyseccomp.resolve_syscall`), so the programs
do not hard-code one architecture's table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from stillhouse.verify.sandbox import Limits, run_python

# Tight limits so the disk and inode fills end quickly; the fill attacks check against these.
BATTERY_LIMITS = Limits(wall_s=8.0, cpu_s=4, memory_mb=512, processes=16, tmp_mb=16, inodes=512)

_PRELUDE = """\
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def escaped(how):
    print('ESCAPED', how, flush=True)
def err():
    return os.strerror(ctypes.get_errno())
def sysc(nr, *args):
    return libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
"""

# (name, what it tries, program). Format fields: {secret} {secret_value} {target} {unix}
# {abstract} {port} {host_pid} {nr_<syscall>} {mb} {inodes}.
ATTACKS: list[tuple[str, str, str]] = [
    ("chroot_escape", "classic mkdir/chroot/chdir('..') loop; then the secret, a host file, host processes, the UNIX socket", """
try:
    os.mkdir('j')
    fd = os.open('.', os.O_RDONLY)
    os.chroot('j')
    os.fchdir(fd)
    for _ in range(64):
        os.chdir('..')
    os.chroot('.')
except OSError as e:
    print('blocked:', e)
else:
    for name, attempt in [
        ('secret', lambda: open({secret!r}).read()),
        ('host file', lambda: open({target!r}, 'w').write('pwned')),
        ('host processes', lambda: str({host_pid}) in os.listdir('/proc') or 1 / 0),
        ('socket', lambda: socket.socket(socket.AF_UNIX).connect({unix!r})),
    ]:
        try:
            attempt()
            escaped('after chroot: ' + name)
        except Exception as e:
            print('after chroot,', name, 'blocked:', e)
"""),
    ("proc1_root", "read the secret through /proc/1/root", """
try:
    escaped(open('/proc/1/root' + {secret!r}).read())
except OSError as e:
    print('blocked:', e)
"""),
    ("host_pid_root", "read the secret through the host process's /proc/PID/root", """
try:
    escaped(open('/proc/{host_pid}/root' + {secret!r}).read())
except OSError as e:
    print('blocked:', e)
"""),
    ("host_pid_environ", "read a host process's environment", """
try:
    escaped(open('/proc/{host_pid}/environ').read()[:40])
except OSError as e:
    print('blocked:', e)
"""),
    ("list_host_processes", "see any process outside the sandbox", """
pids = [p for p in os.listdir('/proc') if p.isdigit()]
names = [open(f'/proc/{{p}}/comm').read().strip() for p in pids if os.path.exists(f'/proc/{{p}}/comm')]
if str({host_pid}) in pids or len(pids) > 4:
    escaped(f'{{len(pids)}} processes: {{names[:8]}}')
else:
    print('blocked: sees only', names)
"""),
    ("read_secret", "read the user's 0600 file by its path", """
try:
    escaped(open({secret!r}).read())
except OSError as e:
    print('blocked:', e)
"""),
    ("write_host_file", "create a file on the host", """
try:
    open({target!r}, 'w').write('pwned')
    escaped('wrote ' + {target!r})
except OSError as e:
    print('blocked:', e)
"""),
    ("write_usr", "write into the read-only /usr", """
try:
    open('/usr/lib/stillhouse-pwned', 'w').write('x')
    escaped('wrote /usr/lib')
except OSError as e:
    print('blocked:', e)
"""),
    ("symlink_to_host", "symlink in /sandbox to the secret, via /proc/1/cwd and ../..", """
found = []
for src in ['/proc/1/cwd/../../../..' + {secret!r}, '../../../../../..' + {secret!r}, '/proc/self/root/../..' + {secret!r}]:
    try:
        os.symlink(src, 'link')
        found.append(open('link').read())
    except OSError as e:
        print('blocked:', e)
    finally:
        if os.path.lexists('link'):
            os.unlink('link')
if found:
    escaped(found[0])
"""),
    ("unix_socket_path", "connect to a host UNIX socket by path", """
try:
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect({unix!r}); s.sendall(b'hi')
    escaped('connected to ' + {unix!r})
except OSError as e:
    print('blocked:', e)
"""),
    ("unix_socket_abstract", "connect to a host abstract UNIX socket", """
try:
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect({abstract!r}); s.sendall(b'hi')
    escaped('connected to the abstract socket')
except OSError as e:
    print('blocked:', e)
"""),
    ("tcp_loopback", "connect to a TCP listener on the host's 127.0.0.1", """
try:
    s = socket.create_connection(('127.0.0.1', {port}), timeout=2); s.sendall(b'hi')
    escaped('connected to port {port}')
except OSError as e:
    print('blocked:', e)
"""),
    ("internet", "connect to an internet address", """
try:
    socket.create_connection(('1.1.1.1', 80), timeout=2)
    escaped('reached 1.1.1.1')
except OSError as e:
    print('blocked:', e)
"""),
    ("kill_host_process", "SIGKILL a process of the user on the host", """
try:
    os.kill({host_pid}, 9)
    escaped('signalled {host_pid}')
except OSError as e:
    print('blocked:', e)
"""),
    ("kill_everything", "kill(-1, SIGKILL): every process it may signal", """
try:
    os.kill(-1, 9)
    print('blocked: kill(-1) reached only the sandbox (host checks the host process)')
except OSError as e:
    print('blocked:', e)
"""),
    ("ptrace_attach", "ptrace(PTRACE_ATTACH) the sandbox's PID 1", """
if sysc({nr_ptrace}, 16, 1, 0, 0) == 0:
    escaped('attached to pid 1')
else:
    print('blocked:', err())
"""),
    ("process_vm_readv", "read another process's memory (a child of its own, even)", """
import time
child = os.fork()
if child == 0:
    time.sleep(5)
    os._exit(0)
if sysc({nr_process_vm_readv}, child, 0, 0, 0, 0, 0) >= 0:
    escaped('process_vm_readv allowed')
else:
    print('blocked:', err())
os.kill(child, 9)
"""),
    ("mount_tmpfs", "mount a tmpfs", """
if libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None) == 0:
    escaped('mounted')
else:
    print('blocked:', err())
"""),
    ("mount_proc", "mount a fresh /proc", """
os.makedirs('p', exist_ok=True)
if libc.mount(b'proc', b'p', b'proc', 0, None) == 0:
    escaped('mounted proc: ' + str(len(os.listdir('p'))))
else:
    print('blocked:', err())
"""),
    ("umount_usr", "unmount /usr", """
if libc.umount2(b'/usr', 2) == 0:
    escaped('unmounted /usr')
else:
    print('blocked:', err())
"""),
    ("unshare_user", "unshare(CLONE_NEWUSER) to become root in a new namespace", """
if libc.unshare(0x10000000) == 0:
    escaped('new user namespace')
else:
    print('blocked:', err())
"""),
    ("unshare_mount", "unshare(CLONE_NEWNS)", """
if libc.unshare(0x00020000) == 0:
    escaped('new mount namespace')
else:
    print('blocked:', err())
"""),
    ("clone_newuser", "clone(CLONE_NEWUSER) instead of unshare", """
pid = sysc({nr_clone}, 0x10000000 | 17, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
    escaped('cloned into a new user namespace')
else:
    print('blocked:', err())
"""),
    ("setns", "join PID 1's mount namespace with setns", """
try:
    fd = os.open('/proc/1/ns/mnt', os.O_RDONLY)
    if libc.setns(fd, 0) == 0:
        escaped('setns ok')
    else:
        print('blocked:', err())
except OSError as e:
    print('blocked:', e)
"""),
    ("pivot_root", "pivot_root to move the root", """
os.makedirs('old', exist_ok=True)
if sysc({nr_pivot_root}, ctypes.cast(ctypes.c_char_p(b'.'), ctypes.c_void_p).value, ctypes.cast(ctypes.c_char_p(b'old'), ctypes.c_void_p).value) == 0:
    escaped('pivot_root ok')
else:
    print('blocked:', err())
"""),
    ("setuid_root", "setuid(0)", """
try:
    os.setuid(0)
    escaped('uid is now 0')
except OSError as e:
    print('blocked:', e, '(uid', os.getuid(), ')')
"""),
    ("setuid_binary", "run a setuid-root program (mount) to gain root", """
import subprocess
try:
    r = subprocess.run(['/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp'], capture_output=True, text=True)
    if r.returncode == 0:
        escaped('setuid mount worked')
    else:
        print('blocked:', ' '.join(r.stderr.split())[:100])
except OSError as e:
    print('blocked:', e)
"""),
    ("mknod_device", "create a device node for /dev/mem", """
try:
    os.mknod('mem', 0o600 | 0o020000, os.makedev(1, 1))
    open('mem', 'rb').read(1)
    escaped('read /dev/mem through mknod')
except OSError as e:
    print('blocked:', e)
"""),
    ("dev_access", "open host block devices, /dev/mem, /dev/kmsg", """
got = []
for d in ['/dev/mem', '/dev/kmem', '/dev/kmsg', '/dev/vda', '/dev/sda', '/dev/nvme0n1', '/dev/port', '/dev/tty']:
    try:
        open(d, 'rb').close()
        got.append(d)
    except OSError:
        pass
if got:
    escaped('opened ' + ' '.join(got))
else:
    print('blocked: /dev has', sorted(os.listdir('/dev')))
"""),
    ("keyctl", "read the session keyring (keyctl)", """
if sysc({nr_keyctl}, 0, -3, 0) >= 0:
    escaped('keyctl allowed')
else:
    print('blocked:', err())
"""),
    ("add_key", "add a key to a keyring", """
if sysc({nr_add_key}, ctypes.cast(ctypes.c_char_p(b'user'), ctypes.c_void_p).value, ctypes.cast(ctypes.c_char_p(b'k'), ctypes.c_void_p).value, ctypes.cast(ctypes.c_char_p(b'v'), ctypes.c_void_p).value, 1, -3) >= 0:
    escaped('add_key allowed')
else:
    print('blocked:', err())
"""),
    ("bpf", "load a BPF program", """
buf = ctypes.create_string_buffer(128)
if sysc({nr_bpf}, 0, ctypes.addressof(buf), 128) >= 0:
    escaped('bpf allowed')
else:
    print('blocked:', err())
"""),
    ("perf_event_open", "open a perf event", """
attr = ctypes.create_string_buffer(128)
if sysc({nr_perf_event_open}, ctypes.addressof(attr), 0, -1, -1, 0) >= 0:
    escaped('perf_event_open allowed')
else:
    print('blocked:', err())
"""),
    ("userfaultfd", "create a userfaultfd (a kernel-race helper)", """
if sysc({nr_userfaultfd}, 0) >= 0:
    escaped('userfaultfd allowed')
else:
    print('blocked:', err())
"""),
    ("io_uring", "set up io_uring", """
params = ctypes.create_string_buffer(120)
if sysc({nr_io_uring_setup}, 4, ctypes.addressof(params)) >= 0:
    escaped('io_uring allowed')
else:
    print('blocked:', err())
"""),
    ("kernel_module", "load a kernel module", """
if sysc({nr_init_module}, 0, 0, 0) == 0 or ctypes.get_errno() not in (errno.EPERM,):
    escaped('init_module reached the kernel: ' + err())
else:
    print('blocked:', err())
"""),
    ("sethostname", "change the host name", """
if libc.sethostname(b'pwned', 5) == 0:
    escaped('hostname set')
else:
    print('blocked:', err())
"""),
    ("proc_sys_write", "write a kernel setting under /proc/sys", """
try:
    open('/proc/sys/kernel/hostname', 'w').write('pwned')
    escaped('wrote /proc/sys')
except OSError as e:
    print('blocked:', e)
"""),
    ("sysfs_cgroup", "reach /sys (cgroups, release_agent)", """
try:
    escaped('/sys has ' + ' '.join(os.listdir('/sys/fs/cgroup')))
except OSError as e:
    print('blocked:', e)
"""),
    ("leaked_fds", "use a descriptor inherited from the host (beyond stdin/out/err)", """
extra = {{}}
for fd in map(int, os.listdir('/proc/self/fd')):
    try:
        if fd > 2:
            extra[fd] = os.readlink(f'/proc/self/fd/{{fd}}')
    except OSError:  # the descriptor listdir itself used, closed by now
        pass
if extra:
    escaped(f'inherited {{extra}}')
else:
    print('blocked: only fds 0-2')
"""),
    ("disk_fill", "fill the disk through /sandbox and /tmp", """
total = 0
for d in ['/sandbox', '/tmp']:
    for i in range({mb} + 8):  # past the limit is proof enough; a sandbox without one fills no disk
        try:
            with open(f'{{d}}/fill{{i}}', 'wb') as f:
                f.write(b'x' * 1_000_000)
            total += 1_000_000
        except OSError as e:
            print('blocked at', total // 1_000_000, 'MB:', e)
            break
if total > ({mb} + 1) * 1_000_000 * 1.05:
    escaped(f'wrote {{total // 1_000_000}} MB')
"""),
    ("dev_shm_fill", "fill memory through /dev/shm", """
total = 0
try:
    for i in range(2 * {mb} + 8):
        with open(f'/dev/shm/fill{{i}}', 'wb') as f:
            f.write(b'x' * 1_000_000)
        total += 1_000_000
except OSError as e:
    print('blocked at', total // 1_000_000, 'MB:', e)
if total > ({mb} + 1) * 1_000_000 * 1.05:
    escaped(f'wrote {{total // 1_000_000}} MB to /dev/shm')
"""),
    ("inode_fill", "exhaust inodes with empty files", """
n = 0
try:
    for i in range(4 * {inodes}):
        open(f'/sandbox/e{{i}}', 'w').close()
        n += 1
except OSError as e:
    print('blocked after', n, 'files:', e)
if n > {inodes}:
    escaped(f'created {{n}} files')
"""),
    ("setuid_file", "make a setuid file in /sandbox and run it", """
import shutil, subprocess
try:
    shutil.copy('/usr/bin/id', '/sandbox/myid')
    os.chmod('/sandbox/myid', 0o4755)
    r = subprocess.run(['/sandbox/myid', '-u'], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip() == '0':
        escaped('setuid file ran as root')
    else:
        print('blocked:', (r.stderr or r.stdout).strip())
except OSError as e:
    print('blocked:', e)
"""),
]


@dataclass
class Outcome:
    name: str
    what: str
    escaped: bool
    evidence: str  # the program's last line, or what the host saw


class _Listener:
    """A listening socket whose queued connections are counted after each attack.

    Counting happens in the caller, once the attack's process has exited: a connection the
    kernel completed waits in the backlog until accepted, so draining it then cannot miss one
    (an accepting thread could, if it had not been scheduled yet when the host looked)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.listen(64)
        sock.setblocking(False)

    def drain(self) -> int:
        """Accept and close every queued connection; how many there were."""
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return n
            n += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _syscall_numbers() -> dict[str, int]:
    import pyseccomp as sc

    names = ["ptrace", "process_vm_readv", "clone", "pivot_root", "keyctl", "add_key", "bpf",
             "perf_event_open", "userfaultfd", "io_uring_setup", "init_module"]
    return {f"nr_{n}": sc.resolve_syscall(sc.Arch.NATIVE, n) for n in names}


def run_battery(limits: Limits = BATTERY_LIMITS, *, runner=run_python, names=None) -> list[Outcome]:
    """Run every attack (or those in `names`) against a fresh sandbox; host-side evidence
    overrides what the program says. `runner` is `run_python`'s stand-in for the control test
    that runs attacks with no sandbox, to show the checks do detect an escape."""
    home = Path(tempfile.mkdtemp(prefix="stillhouse-escape-"))
    secret_value = "s3cret-" + os.urandom(6).hex()
    secret = home / "secret.txt"
    secret.write_text(secret_value)
    secret.chmod(0o600)
    target = home / "written-by-sandbox.txt"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(home / "agent.sock"))
    abstract_name = "\0stillhouse-escape-" + os.urandom(4).hex()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(abstract_name)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    listeners = {"unix": _Listener(unix), "abstract": _Listener(abstract), "tcp": _Listener(tcp)}
    victim = subprocess.Popen(["sleep", "600"])
    fields = {
        "secret": str(secret), "secret_value": secret_value, "target": str(target),
        "unix": str(home / "agent.sock"), "abstract": abstract_name, "port": tcp.getsockname()[1],
        "host_pid": victim.pid, "mb": limits.tmp_mb, "inodes": limits.inodes, **_syscall_numbers(),
    }
    outcomes = []
    try:
        for name, what, body in ATTACKS:
            if names is not None and name not in names:
                continue
            for listener in listeners.values():  # nothing left over from the attack before
                listener.drain()
            r = runner(_PRELUDE + body.format(**fields), limits=limits)
            lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
            seen = []
            if secret_value in r.stdout:
                seen.append("the secret's value came out")
            if target.exists():
                seen.append("the host file was written")
                target.unlink()
            seen += [f"host {k} listener got a connection" for k, v in listeners.items() if v.drain()]
            if victim.poll() is not None:
                seen.append("the host process died")
                victim = subprocess.Popen(["sleep", "600"])
                fields["host_pid"] = victim.pid
            claimed = [ln for ln in lines if ln.startswith("ESCAPED")]
            escaped = bool(claimed or seen)
            evidence = "; ".join(claimed + seen) if escaped else (lines[-1] if lines else f"status {r.status}")
            outcomes.append(Outcome(name, what, escaped, evidence[:160]))
    finally:
        victim.kill()
        victim.wait()
        for listener in listeners.values():
            listener.close()
        for p in home.iterdir():
            p.unlink()
        home.rmdir()
    return outcomes


def unprivileged_command(argv: list[str], uid: int = 65534, reach: list[str] = ()) -> list[str]:
    """`argv` as uid `uid` via setpriv (run as root). The interpreter, the environment's prefix and
    the paths in `reach` (a source tree, say) must be reachable by that uid; where one sits under
    a directory it may not enter (pyenv under a 0700 /root, say), the command runs in a private
    mount namespace in which that directory is a tmpfs holding binds of just those paths."""
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *reach)}
    hidden: dict[str, list[str]] = {}
    for path in sorted(needed):
        blocked = next((a for a in _ancestors(path) if not os.stat(a).st_mode & stat.S_IXOTH), None)
        if blocked is not None:
            hidden.setdefault(blocked, []).append(path)
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", *argv]
    if not hidden:
        return setpriv
    lines = ["set -e", "stash=$(mktemp -d)"]
    for d, (blocked, paths) in enumerate(hidden.items()):
        for i, path in enumerate(paths):
            lines.append(f"mkdir $stash/{d}-{i} && mount --bind {shlex.quote(path)} $stash/{d}-{i}")
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(blocked)}")
        for i, path in enumerate(paths):
            lines.append(f"mkdir -p {shlex.quote(path)} && mount --move $stash/{d}-{i} {shlex.quote(path)}")
    lines += ['rm -r "$stash"', 'exec "$@"']
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "; ".join(lines), "sh", *setpriv]


def _ancestors(path: str) -> list[str]:
    """The directories above `path` and `path` itself, outermost first, without '/'."""
    parts = Path(path).parts
    return [str(Path(*parts[: i + 1])) for i in range(1, len(parts))]


def load_sandbox(path: str):
    """Another checkout's `sandbox.py` as a module (to run the battery against it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("other_sandbox", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["other_sandbox"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def format_table(rows: dict[str, list[Outcome]]) -> str:
    """A markdown table: one row per attack, one column per mode."""
    modes = list(rows)
    out = ["| attack | what it tries | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for i, (name, what, _) in enumerate(ATTACKS):
        cells = ["**ESCAPED**" if rows[m][i].escaped else "blocked" for m in modes]
        out.append(f"| `{name}` | {what} | " + " | ".join(cells) + " |")
    totals = [f"{sum(not o.escaped for o in rows[m])}/{len(rows[m])} blocked" for m in modes]
    out.append("| **total** | | " + " | ".join(totals) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the sandbox escape battery as the current user.")
    ap.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    ap.add_argument("--verbose", action="store_true", help="print each attack's evidence")
    ap.add_argument("--sandbox", metavar="SANDBOX_PY", help="attack another sandbox.py's run_python (an older checkout's)")
    args = ap.parse_args()
    outcomes = run_battery(runner=load_sandbox(args.sandbox).run_python) if args.sandbox else run_battery()
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes]))
    else:
        mode = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        print(format_table({mode: outcomes}))
        if args.verbose:
            for o in outcomes:
                print(f"{o.name}: {o.evidence}")
    return 1 if any(o.escaped for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ATTACKS", "BATTERY_LIMITS", "Outcome", "format_table", "run_battery", "unprivileged_command"]
