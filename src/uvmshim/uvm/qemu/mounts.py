"""Host bind mounts through ``mount(2)``/``umount2(2)`` and a ``/proc/self/mountinfo`` reader.

We call the syscalls through ctypes rather than the ``mount`` program: no fork per share, exact
flags, and errno in the error message. All calls are short and non-blocking (no network file
systems are involved), so they run inline in the event loop.

Binds are made with the mount API of Linux 5.12+ (``open_tree``, ``mount_setattr``,
``move_mount``): the bind gets its final flags while it is still detached, so a mount namespace
that receives it by propagation (QEMU's, :mod:`.mountns`) never sees it writable or without
``nosuid,nodev`` (a propagated copy keeps the flags the mount had when it was attached).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackendError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
# The new mount API (x86_64 system call numbers, linux/mount.h).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p
)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64),
    )  # fmt: skip


def _mount(source: str | None, target: str, flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    if _libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise BackendError(f"mount {source or '(remount)'} on {target}: {os.strerror(err)}")


def bind_mount(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, read_only: bool
) -> None:
    """Bind ``source`` on ``target`` (non-recursive), ``nosuid,nodev``, read-only if asked.

    The bind is cloned detached (``open_tree``), given its flags (``mount_setattr``) and only
    then attached (``move_mount``); see the module docstring. Once attached it is made private,
    so mounts made on it later do not propagate anywhere. On failure nothing stays mounted.

    :raise BackendError: with the errno text.
    """
    src, dst = os.fspath(source), os.fspath(target)
    tree = _libc.syscall(
        _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(src), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
    )
    if tree < 0:
        raise BackendError(f"bind {src} (open_tree): {os.strerror(ctypes.get_errno())}")
    try:
        flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if read_only else 0)
        attr = _MountAttr(flags, 0, MS_PRIVATE, 0)
        if _libc.syscall(
            _SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
            ctypes.sizeof(attr),
        ) != 0:  # fmt: skip
            raise BackendError(f"bind {src} (mount_setattr): {os.strerror(ctypes.get_errno())}")
        if _libc.syscall(
            _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(dst), _MOVE_MOUNT_F_EMPTY_PATH
        ) != 0:  # fmt: skip
            err = ctypes.get_errno()
            raise BackendError(f"mount {src} on {dst}: {os.strerror(err)}")
    finally:
        os.close(tree)  # a detached tree that was never attached goes away with it
    try:
        _mount(None, dst, MS_PRIVATE)
    except BaseException:
        unmount(dst)
        raise


def make_shared(target: str | os.PathLike[str]) -> None:
    """Make the mount at ``target`` the only member of a new shared peer group: mounts made
    under it later propagate to its slaves (QEMU's copy, :mod:`.mountns`).

    :raise BackendError: with the errno text.
    """
    dst = os.fspath(target)
    _mount(None, dst, MS_PRIVATE)
    _mount(None, dst, MS_SHARED)


def unmount(target: str | os.PathLike[str]) -> None:
    """Unmount ``target``; if it is busy, detach it lazily (``MNT_DETACH``) as the last resort.

    :raise BackendError: if even the lazy unmount fails (e.g. it is not a mount point).
    """
    path = os.fsencode(os.fspath(target))
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if _libc.umount2(path, MNT_DETACH) == 0:
        return
    err2 = ctypes.get_errno()
    raise BackendError(
        f"umount {os.fspath(target)}: {os.strerror(err)}; lazy umount: {os.strerror(err2)}"
    )


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo`` (the fields we use)."""

    mount_id: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str

    @property
    def read_only(self) -> bool:
        """Whether the mount (not the super block) is read-only."""
        return "ro" in self.options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Parse ``mountinfo`` into :class:`MountEntry` objects, in mount order."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            entries.append(
                MountEntry(
                    mount_id=int(parts[0]),
                    root=_unescape(parts[3]),
                    mount_point=_unescape(parts[4]),
                    options=tuple(parts[5].split(",")),
                    fs_type=parts[sep + 1],
                    source=_unescape(parts[sep + 2]) if len(parts) > sep + 2 else "",
                )
            )
    return entries


def mounts_under(directory: str | os.PathLike[str]) -> list[MountEntry]:
    """Mounts at or below ``directory``, deepest (and most recent) first: the unmount order."""
    base = os.path.realpath(os.fspath(directory))
    found = [
        m
        for m in read_mountinfo()
        if m.mount_point == base or m.mount_point.startswith(base.rstrip("/") + "/")
    ]
    return sorted(found, key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)


def unmount_all_under(directory: str | os.PathLike[str]) -> list[BackendError]:
    """Unmount everything at or below ``directory``; return the failures (never raises)."""
    errors: list[BackendError] = []
    # Loop: a path can carry stacked mounts, and each pass sees the table as it is now.
    for _ in range(8):
        entries = mounts_under(directory)
        if not entries:
            break
        errors = []
        for m in entries:
            try:
                unmount(m.mount_point)
            except BackendError as e:
                errors.append(e)
    return errors


def is_mount_point(path: Path) -> bool:
    """Whether some mount sits exactly on ``path``."""
    real = os.path.realpath(path)
    return any(m.mount_point == real for m in read_mountinfo())
