"""Confine the QEMU process: no privileged or escaping files through 9p, no host files at all.

The 9p ``local`` backend with ``security_model=none`` performs the guest's ``chown``/``chmod``/
``create`` on the host *as the QEMU process*. Run as root, a guest could create a root-owned
setuid binary in a writable share (``docs/design.md``, section 4). ``mapped-xattr`` would avoid
that, but it breaks every pre-existing host symlink in a share, so we keep ``none`` and confine
QEMU instead:

1. **Unprivileged user** (``setpriv --reuid/--regid --clear-groups``, default ``nobody``): files the
   guest creates are owned by that user, never by root, and ``chown`` to any other user fails
   (no ``CAP_CHOWN``). QEMU keeps only ``CAP_DAC_OVERRIDE`` (ambient, and nothing else in the
   bounding set). Disk images and vPMEM files don't need it (they come as descriptors,
   :mod:`.host`), but the 9p export does: shares are whatever host trees root hands out,
   typically root-owned ``rwxr-xr-x``, so without it the guest cannot create a file in a
   writable share (measured: ``EACCES``). It also covers reading ``0600`` files and searching
   ``0700`` directories in a share, so ``CAP_DAC_READ_SEARCH``, which QEMU used to keep too, is
   gone: it is the capability of ``open_by_handle_at``, which opens any file of a file system
   from a file handle, past every mount namespace. What ``CAP_DAC_OVERRIDE`` can reach is bounded
   by 4.
2. **seccomp filter** (installed in the child before ``exec``, with ``no_new_privs``): any
   ``chmod``/``open(O_CREAT)``/``mkdir``/``mknod`` family call whose mode has ``S_ISUID`` or
   ``S_ISGID`` fails with ``EPERM``; ``symlink``/``symlinkat`` fail with ``EPERM`` (see below),
   and so do ``open_by_handle_at`` (belt and braces: it needs the dropped capability anyway) and
   ``ptrace``, ``process_vm_readv``/``writev`` and ``pidfd_getfd`` (every VM's QEMU runs as the
   same user, so without this one compromised QEMU could reach into another's memory or files);
   ``openat2`` (whose mode can't be inspected) fails with ``ENOSYS``; the x32 and i386 ABIs are
   refused. So not even a setuid-``nobody`` file can appear.
3. Share bind mounts are ``nosuid,nodev`` (see :mod:`.mounts`), and QEMU's own ``-sandbox`` policy
   forbids it to change uid or spawn processes.
4. **Its own mount namespace** (:mod:`.mountns`, ``QemuConfig.private_root``): QEMU's root holds
   only ``/usr``, its boot files, its console log, its 9p export and a few device nodes, so
   even a compromised QEMU, with its capabilities, cannot open any other host file.

Independently of 9p: with ``die_with_parent`` the child gets ``PR_SET_PDEATHSIG(SIGKILL)``
(kept across setpriv's credential change by ``--pdeathsig keep``), so a crashed or SIGKILLed
host process can't leave a QEMU running. The signal fires when the *thread* that started QEMU
exits: start VMs from a thread that lives as long as they should (the event loop's thread).

**Symlinks in shares.** With the ``none`` model a guest-made symlink would be a real host
symlink: QEMU never follows it (it walks with ``O_NOFOLLOW`` from the export root), but a host
tool that later walks the shared tree would (``/share/x -> /etc/shadow``). Both ways out were
measured (QEMU 7.2, TCG, ext4 share; ``docs/security.md``). ``security_model=mapped-xattr`` stores
a guest symlink as a regular ``0600`` file holding the link text, so it is inert on the host, but
it breaks every symlink already in a shared host tree, even a relative one inside it (the guest
gets ``ELOOP`` on open, ``readlink`` fails), keeps the guest's owners and modes in
``user.virtfs.*`` xattrs while the host sees ``0600``/``0700`` files of ``nobody`` (a guest
``chmod 640`` is not a host ``chmod``), needs user xattrs on the shared file system (tmpfs only
has them since Linux 6.6), and costs some 20-30 % on metadata-heavy work in a share (medians of 4
runs, none vs mapped-xattr: ``ls -l`` of 500 files 0.71 vs 0.84 s, reading them 2.65 vs 3.18 s,
``rm -r`` of 600 entries 2.57 vs 3.36 s; creating 500 files within the noise). Refusing the
``symlink``/``symlinkat`` system calls in QEMU's filter costs nothing and keeps ``none``: a guest's
``ln -s`` into a share fails with ``EPERM`` (QEMU itself never creates symlinks: traced), host
symlinks keep working for the guest, hard links cannot leave their bind mount (``EXDEV``), and
device nodes need ``CAP_MKNOD``. So the filter refuses symlinks and ``none`` stays. What a guest
can still do is move or delete symlinks that the host itself put in a writable share.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import struct
from collections.abc import Callable

from . import mountns

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
#: Refused outright with EPERM: a guest must not plant symlinks in a writable share; no file
#: may be opened by handle (that would bypass QEMU's mount namespace); no other process (another
#: VM's QEMU runs as the same user) may be traced, read, written or robbed of a descriptor.
_DENIED_SYSCALLS = {
    88: "symlink",
    266: "symlinkat",
    304: "open_by_handle_at",
    101: "ptrace",
    310: "process_vm_readv",
    311: "process_vm_writev",
    438: "pidfd_getfd",
}

#: The capabilities QEMU keeps: read and write the shared trees root handed it (see above).
KEPT_CAPS = ("dac_override",)


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
    for nr in _DENIED_SYSCALLS:
        prog += [_insn(_JEQ_K, 0, 1, nr), _insn(_RET_K, 0, 0, deny)]
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


def child_preexec(
    *, die_with_parent: bool = True, root: mountns.RootPlan | None = None
) -> Callable[[], None]:
    """A ``preexec_fn``: parent-death SIGKILL (optional), QEMU's own root (if ``root`` is
    given, see :mod:`.mountns`), ``no_new_privs``, the seccomp filter.

    Everything is worked out before the fork; the child only makes system calls. A failure is
    written to the child's stderr (QEMU's log) and the child exits with status 1, so the launch
    error carries it (an exception in a ``preexec_fn`` would lose its text).
    """
    parent = os.getpid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    code = seccomp_program()
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = libc.prctl

    def confine() -> None:
        if die_with_parent:
            if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != parent:  # the parent died before the prctl
                os._exit(1)
        if root is not None:
            mountns.enter(root)
        if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")

    def hook() -> None:
        _keep = buf  # keep the filter alive as long as the hook
        try:
            confine()
        except BaseException as e:
            with contextlib.suppress(BaseException):
                os.write(2, f"uvmshim: cannot confine QEMU: {e}\n".encode(errors="replace"))
            os._exit(1)
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
