"""QEMU's own mount namespace: a root that holds only what QEMU needs, nothing else of the host.

Even with every image passed as a descriptor (:mod:`.host`), a bug in QEMU (or a guest that
exploits one) could open host files by path, with the ``CAP_DAC_OVERRIDE`` the 9p export needs.
So QEMU starts in a mount namespace of its own whose root is a small read-only tmpfs holding:

* ``/usr`` read-only (``nosuid,nodev``) and the top-level ``/bin``, ``/sbin``, ``/lib*``
  (symlinks on a merged-``/usr`` system, read-only binds otherwise); the install prefix of
  ``setpriv`` and of the QEMU binary if they are outside ``/usr``; ``/etc/ld.so.cache``;
* the boot files (kernel, initrd), read-only, at their host paths;
* of the VM directory only ``console.log`` (read-write) and the 9p export ``share/``
  (a recursive bind, so the shares under it come along);
* ``/dev/{null,zero,full,random,urandom}``, ``/dev/kvm`` when KVM is used, ``/dev/net/tun`` and
  ``/dev/vhost-net`` if the host has them, ``/dev/vfio`` and a read-only ``/sys`` when the host
  can assign devices with VFIO;
* ``/proc/self`` only: a bind of QEMU's own ``/proc/<pid>`` (QEMU and its 9p server use
  ``/proc/self/fd``), so no other process of the host, not even another QEMU running as the same
  user, can be reached through ``/proc/<pid>/root`` or ``/proc/<pid>/fd``.

Nothing else of the host's ``/etc``, ``/home``, ``/root``, ``/tmp``, ``/var`` or ``/run``: a
directory on the way to a bound file (``/root/.cache/uvmshim/boot/<key>``, the VM directory) is
an empty directory of the tmpfs. No other VM's directory, not even this VM's ``qemu.pid`` or
``qemu.log``. Paths inside are the host paths, so QEMU's command line is unchanged.

**Shares added later.** Shares are bind mounts that the host makes under ``share/`` while the VM
runs (:func:`uvmshim.uvm.qemu.host.QemuHostBackend.plan9_add`). The host's ``share/`` mount is
made *shared* (:func:`uvmshim.uvm.qemu.machine.create_state_dir`) and QEMU's copy is its
*slave*: a bind made on the host appears in QEMU's namespace, an unmount there too, and nothing
propagates back. The per-mount flags (``ro,nosuid,nodev``) of a propagated copy are the ones the
mount had when it was attached, so :func:`.mounts.bind_mount` sets them on a detached mount
before attaching it (``open_tree``/``mount_setattr``/``move_mount``, Linux 5.12+).

The namespace is built in the forked child before ``exec`` (:func:`enter`, called from the
``preexec_fn`` of :mod:`.sandbox`): ``unshare(CLONE_NEWNS)``, every mount made a slave, a tmpfs
on ``<state>/root`` (an empty directory on the host), the binds, the tmpfs remounted read-only,
``pivot_root`` into it and the old root detached. All paths are worked out in the parent
(:func:`plan`); a failure in the child is written to QEMU's log (stderr) and the child exits
with status 1, which the machine reports as a launch error with that log.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import Accel, MachinePaths, QemuConfig

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 0x2
_SYS_PIVOT_ROOT = 155  # x86_64

#: Read-only directories every QEMU needs (plus the top-level links into them).
SYSTEM_DIRS = ("/usr",)
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Device nodes bound when the host has them (``/dev/kvm`` only when KVM is used).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
NET_DEVICES = ("/dev/net/tun", "/dev/vhost-net")
VFIO_DRIVER_DIR = Path("/sys/bus/pci/drivers/vfio-pci")
#: The tmpfs holding the new root: directories, empty mount-point files and a few links.
ROOT_TMPFS_OPTIONS = "mode=0755,size=256k,nr_inodes=4096"


@dataclass(frozen=True)
class Bind:
    """Bind ``source`` on ``target`` (a path inside the new root, as QEMU will see it).

    ``flags``: ``ro`` remounts the bind read-only, ``nosuid,nodev`` (and ``noexec`` for a file);
    ``rw`` remounts it ``nosuid,nodev,noexec``; ``keep`` keeps the flags of the source mounts
    (device nodes need ``dev``; the 9p export keeps its host-enforced ``ro``/``nosuid,nodev``).
    """

    source: str
    target: str
    flags: Literal["ro", "rw", "keep"] = "ro"
    recursive: bool = False


@dataclass(frozen=True)
class RootPlan:
    """Everything :func:`enter` does, worked out in the parent (no I/O in the child but the
    mounts themselves)."""

    #: Where the new root's tmpfs is mounted while it is built (an empty host directory).
    build_dir: str
    dirs: tuple[str, ...]  # made in the tmpfs, parents first
    files: tuple[str, ...]  # empty mount-point files in the tmpfs
    links: tuple[tuple[str, str], ...]  # (path, link text)
    binds: tuple[Bind, ...]

    def describe(self) -> list[str]:
        """One line per bind and link (for logs and tests)."""
        out = [f"{b.target} <- {b.source} ({b.flags})" for b in self.binds]
        out += [f"{path} -> {text}" for path, text in self.links]
        return out


def _under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def plan(config: QemuConfig, paths: MachinePaths, *, accel: Accel) -> RootPlan:
    """The root QEMU gets for ``config`` (see the module docstring)."""
    binds: list[Bind] = []
    links: list[tuple[str, str]] = []
    ro_dirs = [os.path.realpath(d) for d in SYSTEM_DIRS]
    binds += [Bind(d, d) for d in ro_dirs]
    for top in TOP_LEVEL:
        if os.path.islink(top):
            links.append((top, os.readlink(top)))
        elif os.path.isdir(top) and not _under(top, ro_dirs):
            binds.append(Bind(top, top))
            ro_dirs.append(top)

    def covered(path: str) -> bool:
        """Whether ``path`` (as QEMU names it) reaches the same file in the new root."""
        return _under(path, ro_dirs) or _under(path, [top for top, _ in links])

    for program in ("setpriv", config.qemu_binary):
        found = shutil.which(program)
        if found and not (covered(found) and covered(os.path.realpath(found))):
            prefix = os.path.dirname(os.path.dirname(os.path.realpath(found)))  # <prefix>/bin/x
            binds.append(Bind(prefix, prefix))
            ro_dirs.append(prefix)
    files = [f for f in ("/etc/ld.so.cache",) if os.path.isfile(f)]
    files += [os.path.abspath(config.kernel), os.path.abspath(config.initrd)]
    for f in dict.fromkeys(files):
        if not covered(f):
            binds.append(Bind(f, f))
    binds.append(Bind(os.fspath(paths.console_log), os.path.abspath(paths.console_log), "rw"))
    share = os.path.abspath(paths.share_dir)
    binds.append(Bind(share, share, "keep", recursive=True))
    devices = list(DEVICES) + list(NET_DEVICES)
    if accel == "kvm":
        devices.append("/dev/kvm")
    for dev in devices:
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.stat(dev).st_mode):
                binds.append(Bind(dev, dev, "keep"))
    if VFIO_DRIVER_DIR.is_dir():
        binds.append(Bind("/sys", "/sys"))
        if os.path.isdir("/dev/vfio"):
            binds.append(Bind("/dev/vfio", "/dev/vfio", "keep"))
    # Mount points: directories for directory binds, empty files for file binds.
    dirs: dict[str, None] = {"/proc": None}
    mount_files: list[str] = []
    for b in binds:
        is_dir = os.path.isdir(b.source)
        parents = list(Path(b.target).parents)
        if is_dir:
            parents.insert(0, Path(b.target))
        for p in reversed(parents):
            if str(p) != "/":
                dirs.setdefault(str(p))
        if not is_dir:
            mount_files.append(b.target)
    for path, _ in links:
        for p in reversed(list(Path(path).parents)):
            if str(p) != "/":
                dirs.setdefault(str(p))
    return RootPlan(
        build_dir=os.fspath(paths.state_dir / "root"),
        dirs=tuple(dirs),
        files=tuple(mount_files),
        links=tuple(links),
        binds=tuple(binds),
    )


# Section: in the child (between fork and exec)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
)  # fmt: skip
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


class ConfineError(Exception):
    """A step of :func:`enter` failed (only ever raised in the child)."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise ConfineError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        ),
        f"mount {source or '(flags)'} on {target}",
    )


def enter(root: RootPlan) -> None:
    """Move the calling (single-threaded, root) process into QEMU's mount namespace and root.

    :raise ConfineError: with the failed step and its errno text.
    """
    build = root.build_dir

    def inside(path: str) -> str:
        return build + path

    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_SLAVE, None)
    _mount("tmpfs", build, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, ROOT_TMPFS_OPTIONS)
    try:
        for d in root.dirs:
            os.mkdir(inside(d), 0o755)
        for f in root.files:
            os.close(os.open(inside(f), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        for path, text in root.links:
            os.symlink(text, inside(path))
        pid = str(os.getpid())
        os.mkdir(inside(f"/proc/{pid}"), 0o555)
        os.symlink(pid, inside("/proc/self"))
    except OSError as e:
        raise ConfineError(f"preparing QEMU's root: {e}") from None
    binds = (*root.binds, Bind(f"/proc/{pid}", f"/proc/{pid}", "rw"))
    for b in binds:
        target = inside(b.target)
        _mount(b.source, target, None, _MS_BIND | (_MS_REC if b.recursive else 0), None)
        if b.flags == "keep":
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV
        if b.flags == "rw":
            flags |= _MS_NOEXEC
        else:
            flags |= _MS_RDONLY | (0 if os.path.isdir(b.source) else _MS_NOEXEC)
        _mount(None, target, None, flags, None)
    sealed = _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount(None, build, None, sealed, None)
    os.chdir(build)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "detach the old root")
    os.chdir("/")
