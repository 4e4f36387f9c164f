"""Confine the QEMU process so a guest cannot plant privileged files on the host through 9p.

The 9p ``local`` backend with ``security_model=none`` performs the guest's ``chown``/``chmod``/
``create`` on the host *as the QEMU process*. Run as root, a guest could create a root-owned
setuid binary in a writable share (qemu-notes section 4). ``mapped-xattr`` would avoid that, but it
breaks every pre-existing host symlink in a share, so we keep ``none`` and confine QEMU instead:

1. **Unprivileged user** (``setpriv --reuid/--regid --clear-groups``, default ``nobody``): files the
   guest creates are owned by that user, never by root, and ``chown`` to any other user fails
   (no ``CAP_CHOWN``). QEMU keeps only ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH`` (ambient,
   and nothing else in the bounding set) so it can still open the boot files, the disk images,
   its state directory and the shared trees that the host (root) decided to give it.
2. **seccomp filter** (installed in the child before ``exec``, with ``no_new_privs``): any
   ``chmod``/``open(O_CREAT)``/``mkdir``/``mknod`` family call whose mode has ``S_ISUID`` or
   ``S_ISGID`` fails with ``EPERM``; ``openat2`` (whose mode can't be inspected) fails with
   ``ENOSYS``; the x32 and i386 ABIs are refused. So not even a setuid-``nobody`` file can appear.
3. Share bind mounts are ``nosuid,nodev`` (see :mod:`.mounts`), and QEMU's own ``-sandbox`` policy
   forbids it to change uid or spawn processes.

Independently of 9p: with ``die_with_parent`` the child gets ``PR_SET_PDEATHSIG(SIGKILL)``
(kept across setpriv's credential change by ``--pdeathsig keep``), so a crashed or SIGKILLed
host process can't leave a QEMU running. The signal fires when the *thread* that started QEMU
exits: start VMs from a thread that lives as long as they should (the event loop's thread).

Guest-made symlinks are real host symlinks in a writable share (``none`` model); QEMU itself
never follows them (it walks with ``O_NOFOLLOW`` from the export root), and the guest resolves
them in its own namespace. Host tools must not follow paths inside a writable share blindly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import struct
from collections.abc import Callable

# Classic BPF opcodes and seccomp constants (linux/filter.h, linux/seccomp.h, linux/audit.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SETID_BITS = 0o6000

#: x86_64 syscall number -> index of its ``mode`` argument.
_MODE_SYSCALLS: dict[int, int] = {
    2: 2,  # open(path, flags, mode)
    83: 1,  # mkdir(path, mode)
    85: 1,  # creat(path, mode)
    90: 1,  # chmod(path, mode)
    91: 1,  # fchmod(fd, mode)
    133: 1,  # mknod(path, mode, dev)
    257: 3,  # openat(dirfd, path, flags, mode)
    258: 2,  # mkdirat(dirfd, path, mode)
    259: 2,  # mknodat(dirfd, path, mode, dev)
    268: 2,  # fchmodat(dirfd, path, mode)
    452: 2,  # fchmodat2(dirfd, path, mode, flags)
}
_OPENAT2 = 437

#: The capabilities QEMU keeps: open any file root handed it (images, shares, boot files).
KEPT_CAPS = ("dac_override", "dac_read_search")


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    """The classic-BPF seccomp program described in the module docstring."""
    deny = _RET_ERRNO | errno.EPERM
    prog = [
        _insn(_LD_W_ABS, 0, 0, 4),  # A = arch
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        _insn(_LD_W_ABS, 0, 0, 0),  # A = nr
        _insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        _insn(_JEQ_K, 0, 1, _OPENAT2),
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
    ]
    for nr, arg in _MODE_SYSCALLS.items():
        prog += [
            _insn(_JEQ_K, 0, 4, nr),  # not this syscall: skip its 4-instruction block
            _insn(_LD_W_ABS, 0, 0, 16 + 8 * arg),  # low 32 bits of args[arg]
            _insn(_JSET_K, 0, 1, _SETID_BITS),
            _insn(_RET_K, 0, 0, deny),
            _insn(_RET_K, 0, 0, _RET_ALLOW),
        ]
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def child_preexec(*, die_with_parent: bool = True) -> Callable[[], None]:
    """A ``preexec_fn``: parent-death SIGKILL (optional), ``no_new_privs``, the seccomp filter.

    Everything is allocated before the fork; the child only makes ``prctl`` calls.
    """
    parent = os.getpid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    code = seccomp_program()
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = libc.prctl

    def hook() -> None:
        _keep = buf  # keep the filter alive as long as the hook
        if die_with_parent:
            if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != parent:  # the parent died before the prctl
                os._exit(1)
        if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
        del _keep

    return hook


def setpriv_prefix(uid: int, gid: int) -> list[str]:
    """``setpriv`` argv that runs the rest as ``uid:gid`` with only :data:`KEPT_CAPS`."""
    caps = ",".join(f"+{c}" for c in KEPT_CAPS)
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        f"--inh-caps=-all,{caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set=-all,{caps}",
        "--pdeathsig=keep",
        "--",
    ]
