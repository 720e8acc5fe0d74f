"""The sandbox's seccomp filter: which system calls untrusted code may not make, as BPF.

The filter is compiled by libseccomp (through `pyseccomp`, a ctypes binding that works in any
interpreter, unlike Debian's `python3-seccomp`) and handed to bubblewrap (`bwrap --seccomp FD`),
which installs it, with PR_SET_NO_NEW_PRIVS, right before it execs the program. Everything not
listed is allowed: the namespaces, the read-only root and the unprivileged uid do the isolating;
the filter takes away the kernel surfaces those rely on (mounting, new namespaces, tracing other
processes, keyrings, BPF, kernel modules...), so a kernel bug there cannot be reached either.
Other architectures' system-call tables (32-bit int 0x80, x32) are killed by libseccomp's default.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

# Refused with EPERM. Grouped by what they would give an attacker.
DENIED = (
    # change the file system view or escape it
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "quotactl", "acct",
    # new or foreign namespaces
    "unshare", "setns",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel keyrings, BPF, perf, userfaultfd, io_uring: large kernel attack surfaces
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # the machine itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "syslog", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm",
    "sethostname", "setdomainname", "vhangup", "uselib", "personality", "lookup_dcookie",
)

# clone() flags that create namespaces: refused even though plain clone/fork is allowed.
_CLONE_NS_FLAGS = (
    0x00000080,  # CLONE_NEWTIME
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
_TIOCSTI = 0x5412  # push characters into a terminal's input (a session escape)


def _filter():
    import pyseccomp as sc  # imported here: only the sandbox needs libseccomp

    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (OSError, ValueError):  # a system call this kernel/libseccomp does not know
            continue
    for flag in _CLONE_NS_FLAGS:
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes libc use clone.
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    return f


@functools.lru_cache(maxsize=1)
def bpf() -> bytes:
    """The compiled filter (a classic-BPF program, the format `bwrap --seccomp` reads)."""
    with tempfile.TemporaryFile() as out:
        _filter().export_bpf(out)
        out.flush()
        os.lseek(out.fileno(), 0, os.SEEK_SET)
        return out.read()
