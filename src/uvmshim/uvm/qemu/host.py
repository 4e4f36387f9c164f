"""The :class:`~uvmshim.uvm.backend.HostBackend` of a QEMU utility VM: QMP hot-plug and host binds.

Contracts with the guest agent:

* **SCSI**: the disk at (controller ``c``, LUN ``l``) is ``scsi-hd`` id ``scsi<c>-lun<l>`` on bus
  ``scsi<c>.0``, channel 0, SCSI id 0, LUN ``l``; the controller is PCI ``0000:00:0{5+c}.0``. The
  guest sees ``H:0:0:L`` below that PCI device (``L = 0x4000 | l`` for ``l >= 256``). Every disk
  also has ``serial=uvm-c<c>-l<l>`` and ``wwn`` = NAA-5 ``0x5525400 << 36 | c << 16 | l``
  (``/sys/block/sdX/device/wwid`` is ``naa.55254000<cccc><llll>`` in hex).
* **Plan9**: one 9p device, mount tag ``share0``. Share ``name`` is the directory ``<name>`` at the
  top of that export; a restricted share with ``allowed_files`` is a directory ``<name>`` that
  holds exactly those files. The top of the export and a restricted share's directory are
  read-only; a share is as writable as its ``read_only`` flag says (enforced on the host).
* **vPMEM**: device ``n`` is ``virtio-pmem-pci`` id ``vpmem<n>`` behind root port ``rp<n>``, PCI
  ``0000:00:{0x10+n}.0``; the guest finds its ``/dev/pmemX`` below that bridge
  (``.../0000:00:1n.0/0000:BB:00.0/virtio*/ndbus*/region*/namespace*/block/pmemX``).
* **vPCI**: ``vfio-pci`` id ``vpci-<guid>`` on the first free root port after the vPMEM ones.

QEMU opens no host file by name (it could not: it runs in a mount namespace holding only its VM
directory and what it needs to run, see :mod:`.mountns`). uvmshim opens every disk image, block
device and vPMEM file itself, with the caller's intent (``O_RDONLY`` for read-only, ``O_RDWR``
otherwise), and hands the descriptor to QEMU over QMP (``SCM_RIGHTS`` + ``add-fd``, one fdset per
file); block nodes name ``/dev/fdset/<n>``, and the fdset is removed (``remove-fd``) when the
disk is detached or its attach failed. Before that, the image's headers are read from that very
descriptor (:mod:`.images`): an image that names another file (a qcow2 backing file or external
data file, a differencing VHD or VHDX) is refused, unless every file of the chain is listed in
``allowed_backing_files``; then uvmshim opens those read-only (a data file: like the image) and
passes them the same way. qcow2 nodes always get ``"backing": null`` or the explicit chain, so
QEMU never resolves a name from an image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import ExecuteError, QMPError

from ...asyncutil import finish_despite_cancel
from ...errors import BackendError, BatchError
from .. import hostnet
from ..backend import Plan9Add
from . import mounts
from .cmdline import root_port_id, scsi_controller_id
from .images import ImageFormat, ImageReference, format_of, inspect_image
from .machine import QemuMachine

__all__ = ["ImageFormat", "QemuHostBackend", "detect_image_format", "qmp_error_class", "scsi_wwn"]

#: How long a hot-unplug may take (measured: 52 ms for scsi-hd, ~60-150 ms on a root port).
DEVICE_DELETED_TIMEOUT = 10.0
#: QEMU's limits for scsi-hd on virtio-scsi.
MAX_LUN = 16383
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,200}$")
_BDF_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
VFIO_DRIVER_DIR = Path("/sys/bus/pci/drivers/vfio-pci")
#: How deep an allowed backing chain may be.
MAX_CHAIN_DEPTH = 16


def detect_image_format(path: str | os.PathLike[str]) -> ImageFormat:
    """The QEMU block driver for the disk image at ``path``, from its magic bytes.

    ``QFI\\xfb`` at 0 is qcow2, ``vhdxfile`` at 0 is VHDX, a ``conectix`` footer in the last 512
    bytes (or its copy in the first 512, as dynamic VHDs have) is VHD (QEMU's ``vpc``);
    anything else is raw.

    :raise BackendError: the file can't be read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - 512))
            tail = f.read(512)
    except OSError as e:
        raise BackendError(f"cannot read disk image {os.fspath(path)}: {e.strerror}") from e
    return format_of(head, tail)


def scsi_wwn(controller: int, lun: int) -> int:
    """The deterministic NAA-5 WWN of the disk at (controller, LUN) (QEMU's OUI 52:54:00)."""
    return (0x5 << 60) | (0x525400 << 36) | (controller << 16) | lun


def qmp_error_class(err: BaseException) -> str | None:
    """The QMP error class (``GenericError``, ``DeviceNotFound``, ...) of a refused command:
    of ``err`` itself or of the :class:`ExecuteError` it was raised from; else None."""
    cause = err if isinstance(err, ExecuteError) else err.__cause__
    if isinstance(cause, ExecuteError):
        return cause.error.error.class_
    return None


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise BackendError(f"{kind} {name!r} is not a plain file name")


log = logging.getLogger(__name__)


def _refusal(image: str, fmt: ImageFormat, ref: ImageReference) -> BackendError:
    """The error for an image that names a file it may not: what, which file, what to do."""
    name = repr(ref.name) if ref.name else "(unnamed)"
    if ref.kind == "parent disk":
        kind = "VHDX" if fmt == "vhdx" else "VHD"
        return BackendError(
            f"disk image {image} is a differencing {kind} on the parent disk {name}: uvmshim "
            "does not attach images that refer to other files",
            hint=f"merge it into a standalone image (qemu-img convert -O {fmt} {image} NEW) "
            "and attach that",
        )
    if ref.kind == "backing file":
        return BackendError(
            f"disk image {image} is a qcow2 overlay on the backing file {name}: uvmshim does "
            "not let QEMU open files that an image names",
            hint=f"make it self-contained (qemu-img convert -O qcow2 {image} NEW.qcow2) and "
            "attach that, or allow this exact chain through the API "
            "(QemuHostBackend(allowed_backing_files=...))",
        )
    return BackendError(
        f"disk image {image} keeps its data in the external data file {name}: uvmshim does "
        "not let QEMU open files that an image names",
        hint=f"make it self-contained (qemu-img convert -O qcow2 {image} NEW.qcow2) and attach "
        "that, or allow this exact file through the API "
        "(QemuHostBackend(allowed_backing_files=...))",
    )


@dataclass
class _File:
    """A file uvmshim opened for QEMU: our descriptor until QEMU has it, then its fdset."""

    path: str
    fd: int
    fdset: int | None = None
    sent: bool = False  # its descriptor went out to QEMU (maybe without an answer)

    @property
    def qemu_name(self) -> str:
        return f"/dev/fdset/{self.fdset}"


@dataclass
class _Image:
    """An image to attach: its file and format, and the allowed files it names."""

    file: _File
    format: ImageFormat
    read_only: bool
    backing: _Image | None = None
    data_file: _File | None = None


@dataclass
class _Disk:
    host_path: str
    device_id: str
    nodes: tuple[str, ...]  # top (format) node first
    fdsets: tuple[int, ...]  # removed after the node


@dataclass
class _Nic:
    """A hot-added NIC: its root port and, for a tap, the host plumbing behind it. The ready
    NIC has no port (it is not hot-plugged)."""

    port: str
    plumbing: hostnet.Plumbing | None

    @property
    def ready(self) -> bool:
        """The ready NIC (the one without a port)."""
        return not self.port


@dataclass
class _Share:
    name: str
    targets: list[Path]  # mount points, under share/
    created: list[Path]  # what we created in exports/, in creation order


class QemuHostBackend:
    """Virtual hardware changes on a running :class:`QemuMachine` (see the module docstring).

    Every method raises :class:`BackendError` with the QMP or OS error in the message; on failure
    nothing half-done stays behind. A failed detach stays tracked so it can be retried.

    :param allowed_backing_files: host files that images may name as their qcow2 backing file
        or external data file (each file of a chain must be listed; compared after resolving
        symlinks; a relative name in an image is relative to the image's directory). Empty by
        default: such images are refused. Differencing VHD/VHDX images are always refused.
    :param ready_tap: the tap the machine's ready NIC was started with
        (:func:`uvmshim.uvm.hostnet.make_tap`): the first NIC for an interface of its network
        namespace uses the ready NIC instead of a hot-added one.
    """

    def __init__(
        self, machine: QemuMachine, *, allowed_backing_files: Iterable[str | os.PathLike[str]] = (),
        ready_tap: hostnet.Plumbing | None = None,
    ) -> None:
        self.machine = machine
        self._ready_tap = ready_tap
        self._allowed_files = frozenset(os.path.realpath(p) for p in allowed_backing_files)
        self._tags = 0  # makes every add-fd opaque tag unique
        self._lock = asyncio.Lock()
        self._disks: dict[tuple[int, int], _Disk] = {}
        self._shares: dict[str, _Share] = {}
        self._vpmem: dict[int, str] = {}  # device -> memory backend object id
        self._vpci: dict[str, str] = {}  # guid -> port
        self._nics: dict[str, _Nic] = {}
        self._taps = 0
        cfg = machine.config
        # vPMEM device n owns root port n; vPCI takes the rest.
        self._free_ports = [root_port_id(i) for i in range(cfg.vpmem_slots, cfg.hotplug_ports)]

    # Section: QMP helpers

    async def _execute(self, cmd: str, args: dict[str, object], what: str) -> object:
        log.debug("qmp %s %s", cmd, args)
        try:
            return await self.machine.qmp.execute(cmd, args)
        except ExecuteError as e:
            raise BackendError(f"QMP {cmd} for {what}: {e}") from e
        except (QMPError, OSError, EOFError) as e:
            raise BackendError(f"QMP {cmd} for {what}: {type(e).__name__}: {e}") from e

    async def _device_del(self, device_id: str, what: str) -> None:
        """``device_del`` and wait for *its* ``DEVICE_DELETED`` (children emit their own)."""
        qmp = self.machine.qmp
        with qmp.listener("DEVICE_DELETED") as listener:
            try:
                await self._execute("device_del", {"id": device_id}, what)
            except BackendError as e:
                # QEMU 7.2 answers an unknown id (a device already gone, e.g. on a retry after
                # a timed-out wait) with the class DeviceNotFound.
                if qmp_error_class(e) == "DeviceNotFound":
                    return
                raise
            try:
                async with asyncio.timeout(DEVICE_DELETED_TIMEOUT):
                    while True:
                        event = await listener.get()
                        data = event.get("data", {})
                        if isinstance(data, dict) and data.get("device") == device_id:
                            return
            except TimeoutError:
                raise BackendError(
                    f"{what}: no DEVICE_DELETED for {device_id} within "
                    f"{DEVICE_DELETED_TIMEOUT:.0f} s (is it still in use in the guest?)"
                ) from None

    def _take_port(self, what: str) -> str:
        if not self._free_ports:
            raise BackendError(
                f"{what}: no free hot-plug root port (QemuConfig.hotplug_ports="
                f"{self.machine.config.hotplug_ports})"
            )
        return self._free_ports.pop(0)

    def _give_port(self, port: str) -> None:
        self._free_ports.append(port)
        self._free_ports.sort(key=lambda p: int(p[2:]))

    # Section: files handed to QEMU

    def _open_file(
        self, path: str, *, read_only: bool, block_device: bool, files: list[_File]
    ) -> _File:
        """Open ``path`` for QEMU (``O_RDONLY`` or ``O_RDWR``) and add it to ``files``.

        ``O_NONBLOCK`` while opening (a FIFO put in its place must not hang us), then the type
        is checked on the descriptor itself.
        """
        mode = os.O_RDONLY if read_only else os.O_RDWR
        what = "pass-through disk" if block_device else "disk image"
        try:
            fd = os.open(path, mode | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise BackendError(f"{what} {path}: {e.strerror}") from e
        file = _File(path, fd)
        files.append(file)
        try:
            st = os.fstat(fd)
            os.set_blocking(fd, True)
        except OSError as e:
            raise BackendError(f"{what} {path}: {e.strerror}") from e
        _check_disk_kind(path, st.st_mode, block_device)
        return file

    def _open_image(
        self,
        path: str,
        *,
        read_only: bool,
        files: list[_File],
        depth: int = 0,
        named_format: str | None = None,
    ) -> _Image:
        """Open the image at ``path`` and, if allowed, every file it names; see the module
        docstring. ``named_format`` is the format an overlay's header gives for this file."""
        file = self._open_file(path, read_only=read_only, block_device=False, files=files)
        if named_format == "raw":  # QEMU would not look inside: neither do we
            return _Image(file, "raw", read_only)
        info = inspect_image(file.fd, path)
        if named_format is not None and named_format != info.format:
            raise BackendError(
                f"backing file {path} is {info.format}, but its overlay names it as "
                f"{named_format}"
            )
        image = _Image(file, info.format, read_only)
        for ref in info.references:
            if ref.kind == "parent disk" or not ref.name:
                raise _refusal(path, info.format, ref)
            named = os.path.join(os.path.dirname(path), ref.name)  # absolute names stay as they are
            target = os.path.realpath(named)
            if target not in self._allowed_files:
                raise _refusal(path, info.format, ref)
            if ref.kind == "data file":
                image.data_file = self._open_file(
                    target, read_only=read_only, block_device=False, files=files
                )
                continue
            if depth + 1 >= MAX_CHAIN_DEPTH:
                raise BackendError(
                    f"disk image {path}: backing chain deeper than {MAX_CHAIN_DEPTH} files"
                )
            image.backing = self._open_image(
                target, read_only=True, files=files, depth=depth + 1, named_format=ref.format
            )
        return image

    def _image_node(self, image: _Image, prefix: str) -> dict[str, object]:
        """The ``blockdev-add`` arguments of ``image`` (format node over a ``file`` node)."""
        ro = image.read_only
        node: dict[str, object] = {
            "driver": image.format, "node-name": f"{prefix}-fmt", "read-only": ro,
            "file": {"driver": "file", "node-name": f"{prefix}-file",
                     "filename": image.file.qemu_name, "read-only": ro},
        }  # fmt: skip
        if image.format == "qcow2":
            backing = image.backing
            node["backing"] = self._image_node(backing, prefix + "-b") if backing else None
            if image.data_file is not None:
                node["data-file"] = {
                    "driver": "file", "node-name": f"{prefix}-data",
                    "filename": image.data_file.qemu_name, "read-only": ro,
                }  # fmt: skip
        return node

    async def _hand_over(self, files: list[_File], tag: str) -> None:
        """Pass each file's descriptor to QEMU (``SCM_RIGHTS`` + ``add-fd``, a new fdset each,
        ``opaque`` = ``tag``) and close ours. On failure, :meth:`_drop_fdsets` cleans up."""
        for file in files:
            await self._add_fd(file, tag)
            os.close(file.fd)
            file.fd = -1

    async def _add_fd(self, file: _File, tag: str) -> int:
        """Give ``file`` to QEMU in a new fdset; return QEMU's descriptor number for it.

        Only under ``self._lock``: the descriptor travels with a byte of its own on the QMP
        socket and QEMU takes the last one received for the next ``add-fd``.
        """
        try:
            file.sent = True
            self.machine.qmp.send_fd_scm(file.fd)
        except (QMPError, OSError) as e:
            raise BackendError(f"passing {file.path} to QEMU: {e}") from e
        reply = await self._execute("add-fd", {"opaque": tag}, file.path)
        if not isinstance(reply, dict):
            raise BackendError(f"QMP add-fd for {file.path}: unexpected reply {reply!r}")
        file.fdset = int(reply["fdset-id"])
        return int(reply["fd"])

    async def _drop_fdsets(self, tag: str, what: str) -> None:
        """Remove every fdset whose descriptors carry ``tag`` (errors are logged, not raised):
        this also finds an fdset whose ``add-fd`` answer we never saw."""
        try:
            fdsets = await self._execute("query-fdsets", {}, what)
            for fdset in fdsets if isinstance(fdsets, list) else []:
                if any(fd.get("opaque") == tag for fd in fdset.get("fds", [])):
                    await self._execute("remove-fd", {"fdset-id": fdset["fdset-id"]}, what)
        except BackendError as e:
            log.warning("%s: could not remove its file descriptors from QEMU: %s", what, e)

    def _next_tag(self, what: str) -> str:
        self._tags += 1
        return f"uvmshim:{what}:{self._tags}"

    # Section: SCSI

    async def scsi_attach(
        self, controller: int, lun: int, host_path: str, *, read_only: bool, passthrough: bool
    ) -> None:
        """Hot-add ``host_path`` at (``controller``, ``lun``) as a ``scsi-hd``.

        An image file goes through a ``file`` node and a format node (raw/qcow2/vpc/vhdx by
        magic); a pass-through block device through a ``host_device`` node. ``read_only`` is set
        on every node, so QEMU opens the file read-only.
        """
        if not 0 <= controller < self.machine.config.scsi_controllers:
            raise BackendError(
                f"SCSI controller {controller} does not exist "
                f"(the VM has {self.machine.config.scsi_controllers})"
            )
        if not 0 <= lun <= MAX_LUN:
            raise BackendError(f"SCSI LUN {lun} is out of range 0..{MAX_LUN}")
        async with self._lock:
            if (controller, lun) in self._disks:
                held = self._disks[controller, lun].host_path
                raise BackendError(f"SCSI {controller}:{lun} already holds {held}")
            try:
                st = os.stat(host_path)
            except OSError as e:
                raise BackendError(f"disk {host_path}: {e.strerror}") from e
            _check_disk_kind(host_path, st.st_mode, passthrough)
            dev = f"scsi{controller}-lun{lun}"
            tag = self._next_tag(dev)
            files: list[_File] = []
            try:
                if passthrough:
                    file = self._open_file(
                        host_path, read_only=read_only, block_device=True, files=files
                    )
                    image = None
                else:
                    image = self._open_image(host_path, read_only=read_only, files=files)
                await self._hand_over(files, tag)
            except BaseException:
                if any(f.sent for f in files):
                    await finish_despite_cancel(self._drop_fdsets(tag, host_path))
                raise
            finally:
                for f in files:
                    if f.fd >= 0:
                        os.close(f.fd)
            fdsets = tuple(f.fdset for f in files if f.fdset is not None)
            if image is None:
                nodes: tuple[str, ...] = (f"{dev}-dev",)
                blockdev: dict[str, object] = {
                    "driver": "host_device", "node-name": nodes[0], "filename": file.qemu_name,
                    "read-only": read_only,
                }  # fmt: skip
            else:
                nodes = (f"{dev}-fmt", f"{dev}-file")
                blockdev = self._image_node(image, dev)
                if not read_only:
                    blockdev["discard"] = "unmap"  # guest fstrim shrinks sparse scratch images
            try:
                await self._execute("blockdev-add", blockdev, host_path)
            except BaseException as e:
                refused = isinstance(e, BackendError) and isinstance(e.__cause__, ExecuteError)
                rollback = self._rollback_disk(
                    dev, nodes[0], host_path, tag, device=False, node_added=not refused
                )
                await finish_despite_cancel(rollback)
                raise
            try:
                await self._execute(
                    "device_add",
                    {
                        "driver": "scsi-hd", "id": dev, "drive": nodes[0],
                        "bus": f"{scsi_controller_id(controller)}.0",
                        "channel": 0, "scsi-id": 0, "lun": lun,
                        "serial": f"uvm-c{controller}-l{lun}",
                        "wwn": scsi_wwn(controller, lun),
                    },
                    host_path,
                )  # fmt: skip
            except BaseException as e:
                # Roll back; the original error is the one that matters. If we were interrupted
                # (cancelled, QMP broke) the device may exist after all: try to remove it too.
                refused = isinstance(e, BackendError) and isinstance(e.__cause__, ExecuteError)
                rollback = self._rollback_disk(
                    dev, nodes[0], host_path, tag, device=not refused, node_added=True
                )
                await finish_despite_cancel(rollback)
                raise
            self._disks[controller, lun] = _Disk(host_path, dev, nodes, fdsets)

    async def _rollback_disk(
        self, dev: str, node: str, what: str, tag: str, *, device: bool, node_added: bool
    ) -> None:
        """Undo a failed attach: the device and the node if they may exist, then the fdsets."""
        with contextlib.suppress(BackendError):
            if device:
                await self._device_del(dev, what)
            if node_added:
                await self._execute("blockdev-del", {"node-name": node}, what)
        await self._drop_fdsets(tag, what)

    async def scsi_detach(self, controller: int, lun: int) -> None:
        """Hot-remove the disk at (controller, LUN): ``device_del``, wait, ``blockdev-del``,
        then ``remove-fd`` of its fdsets (QEMU closes the image files)."""
        async with self._lock:
            disk = self._disks.get((controller, lun))
            if disk is None:
                raise BackendError(f"no disk is attached at SCSI {controller}:{lun}")
            await self._device_del(disk.device_id, disk.host_path)
            await self._execute("blockdev-del", {"node-name": disk.nodes[0]}, disk.host_path)
            del self._disks[controller, lun]
            for fdset in disk.fdsets:
                try:
                    await self._execute("remove-fd", {"fdset-id": fdset}, disk.host_path)
                except BackendError as e:  # the disk is gone all the same
                    log.warning("%s: fdset %d stays open in QEMU: %s", disk.host_path, fdset, e)

    # Section: Plan9

    async def plan9_add(
        self, name: str, host_path: str, *, read_only: bool, allowed_files: Sequence[str]
    ) -> None:
        """Share ``host_path`` as ``name`` by bind-mounting it under the 9p export.

        A directory share binds the directory on ``share/<name>``. With ``allowed_files``,
        ``share/<name>/`` is a read-only directory holding binds of exactly those files of
        ``host_path``. Binds are ``nosuid,nodev`` and read-only on the host if ``read_only``.
        """
        _check_name("share name", name)
        for f in allowed_files:
            _check_name("allowed file", f)
        async with self._lock:
            self._add_share(name, host_path, read_only=read_only, allowed_files=allowed_files)

    async def plan9_add_batch(self, shares: Sequence[Plan9Add]) -> None:
        """:meth:`plan9_add` for each of ``shares`` in one round (one lock, no QMP), all or
        none: on a failure the shares already made are undone, newest first.

        :raises BatchError: naming the share that failed.
        """
        for k, sh in enumerate(shares):
            try:
                _check_name("share name", sh.name)
                for f in sh.allowed_files:
                    _check_name("allowed file", f)
            except BackendError as e:
                raise BatchError(e.message, k) from None
        async with self._lock:
            added: list[str] = []
            try:
                for k, sh in enumerate(shares):
                    try:
                        self._add_share(sh.name, sh.host_path, read_only=sh.read_only,
                                        allowed_files=sh.allowed_files)
                    except BackendError as e:
                        raise BatchError(e.message, k) from None
                    added.append(sh.name)
            except BaseException:
                for name in reversed(added):
                    errors = self._undo_share(self._shares[name])
                    if errors:
                        log.warning("rolling back share %s: %s", name, "; ".join(errors))
                    else:
                        del self._shares[name]
                raise

    def _add_share(self, name: str, host_path: str, *, read_only: bool,
                   allowed_files: Sequence[str]) -> None:
        """The host part of a share, under the lock (see :meth:`plan9_add`)."""
        if name in self._shares:
            raise BackendError(f"share {name!r} already exists")
        if not os.path.isdir(host_path):
            raise BackendError(f"share {name!r}: {host_path} is not a directory")
        paths = self.machine.paths
        share = _Share(name, [], [])
        try:
            export = paths.exports_dir / name
            export.mkdir(mode=0o755)
            share.created.append(export)
            if not allowed_files:
                target = paths.share_dir / name
                mounts.bind_mount(host_path, target, read_only=read_only)
                share.targets.append(target)
            for f in dict.fromkeys(allowed_files):
                # Resolve on the host now: the bind pins this exact file.
                source = os.path.realpath(os.path.join(host_path, f))
                if not os.path.isfile(source):
                    raise BackendError(
                        f"share {name!r}: allowed file {f} is not a file in {host_path}"
                    )
                placeholder = export / f
                placeholder.touch(mode=0o644, exist_ok=False)
                share.created.append(placeholder)
                target = paths.share_dir / name / f
                mounts.bind_mount(source, target, read_only=read_only)
                share.targets.append(target)
        except OSError as e:
            self._undo_share(share)
            raise BackendError(f"share {name!r}: {e.strerror or e}") from e
        except BaseException:
            self._undo_share(share)
            raise
        self._shares[name] = share

    async def plan9_remove(self, name: str) -> None:
        """Stop sharing ``name``: unmount its binds (lazily if busy) and remove its directory."""
        async with self._lock:
            share = self._shares.get(name)
            if share is None:
                raise BackendError(f"no share named {name!r}")
            errors = self._undo_share(share)
            if errors:
                raise BackendError(f"removing share {name!r}: " + "; ".join(errors))
            del self._shares[name]

    async def plan9_remove_batch(self, names: Sequence[str]) -> dict[str, str]:
        """:meth:`plan9_remove` for each of ``names``, in order, in one round, attempting every
        one; return why, per name, for the shares still there."""
        failed: dict[str, str] = {}
        async with self._lock:
            for name in names:
                share = self._shares.get(name)
                if share is None:
                    failed[name] = f"no share named {name!r}"
                    continue
                errors = self._undo_share(share)
                if errors:
                    failed[name] = f"removing share {name!r}: " + "; ".join(errors)
                else:
                    del self._shares[name]
        return failed

    def _undo_share(self, share: _Share) -> list[str]:
        errors: list[str] = []
        for target in reversed(share.targets):
            try:
                mounts.unmount(target)
            except BackendError as e:
                if mounts.is_mount_point(target):
                    errors.append(str(e))
        if errors:
            return errors  # never delete mount points that are still mounted
        share.targets.clear()
        for p in reversed(share.created):
            try:
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(f"remove {p}: {e.strerror}")
        share.created.clear()
        return errors

    # Section: vPMEM

    async def vpmem_add(self, device: int, host_path: str) -> None:
        """Expose ``host_path`` read-only as ``virtio-pmem-pci`` device ``device``.

        Needs ``QemuConfig.vpmem_slots > 0``. The file size must be a multiple of 2 MiB
        (the guest maps it in huge-page-aligned sections). The file goes to QEMU as a read-only
        descriptor; ``memory-backend-file`` only takes a path, so it names that descriptor as
        ``/proc/self/fd/<n>`` (QEMU re-opens it read-only through its own ``/proc``) and the
        fdset is removed once the backend holds its own descriptor.
        """
        cfg = self.machine.config
        if cfg.vpmem_slots == 0:
            raise BackendError("vPMEM is not enabled in this VM (QemuConfig.vpmem_slots is 0)")
        if not 0 <= device < cfg.vpmem_slots:
            raise BackendError(
                f"vPMEM device {device} does not exist (the VM has {cfg.vpmem_slots})"
            )
        async with self._lock:
            if device in self._vpmem:
                raise BackendError(f"vPMEM device {device} is already in use")
            try:
                size = os.stat(host_path).st_size
            except OSError as e:
                raise BackendError(f"vPMEM image {host_path}: {e.strerror}") from e
            if size == 0 or size % (2 << 20):
                raise BackendError(
                    f"vPMEM image {host_path} is {size} bytes; "
                    "it must be a non-zero multiple of 2 MiB"
                )
            port = root_port_id(device)
            mem = f"vpmem{device}-mem"
            tag = self._next_tag(mem)
            files: list[_File] = []
            try:
                file = self._open_file(host_path, read_only=True, block_device=False, files=files)
                qemu_fd = await self._add_fd(file, tag)
                await self._execute(
                    "object-add",
                    {"qom-type": "memory-backend-file", "id": mem,
                     "mem-path": f"/proc/self/fd/{qemu_fd}", "size": size, "share": True,
                     "readonly": True},
                    host_path,
                )  # fmt: skip
            finally:
                for f in files:
                    os.close(f.fd)
                if any(f.sent for f in files):
                    await finish_despite_cancel(self._drop_fdsets(tag, host_path))
            try:
                await self._execute(
                    "device_add",
                    {"driver": "virtio-pmem-pci", "id": f"vpmem{device}", "memdev": mem,
                     "bus": port},
                    host_path,
                )
            except BaseException:
                with contextlib.suppress(BackendError):
                    await self._execute("object-del", {"id": mem}, host_path)
                raise
            self._vpmem[device] = mem

    async def vpmem_remove(self, device: int) -> None:
        """Hot-remove vPMEM device ``device`` and its memory backend.

        QEMU 7.2 refuses this (``GenericError`` "virtio based memory devices cannot be
        unplugged."): the error is raised as a :class:`BackendError` and the device stays
        attached (and tracked) until the VM stops. A QEMU that can unplug it gets the full
        ``device_del`` + ``object-del``.
        """
        async with self._lock:
            mem = self._vpmem.get(device)
            if mem is None:
                raise BackendError(f"no vPMEM device {device}")
            try:
                await self._device_del(f"vpmem{device}", f"vPMEM {device}")
            except BackendError as e:
                # QEMU has no error class of its own for this refusal (only GenericError), so
                # the class narrows the check and the text decides.
                if qmp_error_class(e) == "GenericError" and "cannot be unplugged" in str(e):
                    raise BackendError(
                        f"vPMEM device {device} cannot be removed: this QEMU cannot hot-unplug "
                        "virtio-pmem devices; it stays attached until the VM stops"
                    ) from e
                raise
            await self._execute("object-del", {"id": mem}, f"vPMEM {device}")
            del self._vpmem[device]

    # Section: vPCI (VFIO)

    async def vpci_add(self, vmbus_guid: str, instance_id: str, function: int) -> None:
        """Assign host PCI device ``instance_id`` (a BDF such as ``0000:01:00.0``) with VFIO.

        ``function`` > 0 selects SR-IOV virtual function ``function - 1`` of that device
        (``virtfn<n>`` in sysfs). The device must already be bound to ``vfio-pci``.
        """
        _check_name("vPCI id", vmbus_guid)
        if not VFIO_DRIVER_DIR.is_dir():
            raise BackendError(
                "assigned devices need VFIO, which this host does not have "
                f"({VFIO_DRIVER_DIR} is missing)"
            )
        bdf = instance_id.lower()
        if len(bdf) == 7:  # accept "01:00.0" for domain 0
            bdf = "0000:" + bdf
        if not _BDF_RE.match(bdf):
            raise BackendError(
                f"assigned device {instance_id!r} is not a PCI address (dddd:bb:ss.f)"
            )
        dev = Path("/sys/bus/pci/devices") / bdf
        if function > 0:
            vf = dev / f"virtfn{function - 1}"
            if not vf.exists():
                raise BackendError(f"PCI device {bdf} has no virtual function {function - 1}")
            dev = vf.resolve()
            bdf = dev.name
        if not dev.exists():
            raise BackendError(f"host has no PCI device {bdf}")
        if not (dev / "iommu_group").exists():
            raise BackendError(f"PCI device {bdf} has no IOMMU group (is the IOMMU enabled?)")
        driver = (dev / "driver").resolve().name if (dev / "driver").exists() else None
        if driver != "vfio-pci":
            raise BackendError(
                f"PCI device {bdf} is bound to {driver or 'no driver'}, not vfio-pci"
            )
        async with self._lock:
            if vmbus_guid in self._vpci:
                raise BackendError(f"vPCI device {vmbus_guid} is already assigned")
            port = self._take_port(f"vPCI {bdf}")
            try:
                await self._execute(
                    "device_add",
                    {"driver": "vfio-pci", "host": bdf, "id": f"vpci-{vmbus_guid}", "bus": port},
                    f"PCI device {bdf}",
                )
            except BaseException:
                self._give_port(port)
                raise
            self._vpci[vmbus_guid] = port

    async def vpci_remove(self, vmbus_guid: str) -> None:
        """Unassign the device assigned as ``vmbus_guid``."""
        async with self._lock:
            port = self._vpci.get(vmbus_guid)
            if port is None:
                raise BackendError(f"no vPCI device {vmbus_guid}")
            await self._device_del(f"vpci-{vmbus_guid}", f"vPCI {vmbus_guid}")
            del self._vpci[vmbus_guid]
            self._give_port(port)

    # Section: NICs

    async def nic_add(self, nic_id: str, endpoint: hostnet.Endpoint, *, netns: str = "",
                      host_forwards: Sequence[str] | None = None) -> bool:
        """Hot-add ``virtio-net-pci`` id ``nic-<nic_id>`` (MAC and ``host_mtu`` of
        ``endpoint``) on a free root port, behind netdev ``net-<nic_id>``.

        With ``netns``, the netdev is a tap that uvmshim creates in that namespace and
        connects to ``endpoint``'s interface (:func:`uvmshim.uvm.hostnet.plumb`); QEMU gets the
        tap's descriptor (``SCM_RIGHTS`` + ``getfd``), never ``/dev/net/tun``. Without it, the
        netdev is QEMU's user-mode network (``10.0.2.0/24``) with ``host_forwards``.
        Whatever fails, nothing stays: not the device, the netdev, the descriptor, the tap
        nor the redirects.

        The first NIC for an interface of the namespace of the ready tap (``ready_tap``) is
        the ready NIC instead: only the redirects are made (the ready NIC then has no tap any
        more, whatever happens). :returns: True for the ready NIC.
        """
        _check_name("NIC id", nic_id)
        if not netns and host_forwards is None:
            raise BackendError(f"NIC {nic_id}: neither a network namespace nor user-mode "
                               "networking")
        async with self._lock:
            if nic_id in self._nics:
                raise BackendError(f"NIC {nic_id} already exists")
            ready = self._ready_tap
            if ready is not None and self.has_ready_nic(netns):
                self._ready_tap = None  # it serves one endpoint, whatever happens
                nic = _Nic("", ready)
                try:
                    await hostnet.connect_tap(ready, endpoint)
                except BaseException:
                    await finish_despite_cancel(self._nic_undo(nic_id, nic, device=False))
                    raise
                self._nics[nic_id] = nic
                return True
            port = self._take_port(f"NIC {endpoint.ifname}")
            nic = _Nic(port, None)
            try:
                await self._nic_add(nic_id, nic, endpoint, netns, host_forwards)
            except BaseException:
                await finish_despite_cancel(self._nic_undo(nic_id, nic, device=True))
                raise
            self._nics[nic_id] = nic
            return False

    async def _nic_add(self, nic_id: str, nic: _Nic, endpoint: hostnet.Endpoint, netns: str,
                       host_forwards: Sequence[str] | None) -> None:
        what = f"NIC {endpoint.ifname}"
        netdev: dict[str, object] = {"id": f"net-{nic_id}"}
        if netns:
            tap = f"{hostnet.TAP_PREFIX}{self._taps}"
            self._taps += 1
            nic.plumbing = await hostnet.plumb(netns, endpoint, tap)
            fdname = f"tap-{nic_id}"
            try:
                self.machine.qmp.send_fd_scm(nic.plumbing.fd)
            except (QMPError, OSError) as e:
                raise BackendError(f"passing {tap} to QEMU: {e}") from e
            finally:
                nic.plumbing.close_fd()
            await self._execute("getfd", {"fdname": fdname}, what)
            netdev.update({"type": "tap", "fd": fdname, "vhost": False})
            try:
                await self._execute("netdev_add", netdev, what)
            except BaseException:
                with contextlib.suppress(BackendError):
                    await self._execute("closefd", {"fdname": fdname}, what)
                raise
        else:
            # IPv4 only: the guest is configured statically, and without router
            # advertisements on fec0::/64 the container has exactly the address it is given.
            netdev.update({"type": "user", "net": "10.0.2.0/24", "ipv6": False,
                           "hostfwd": [{"str": f} for f in host_forwards or ()]})
            await self._execute("netdev_add", netdev, what)
        await self._execute(
            "device_add",
            {"driver": "virtio-net-pci", "id": f"nic-{nic_id}", "netdev": f"net-{nic_id}",
             "mac": endpoint.mac, "host_mtu": endpoint.mtu, "bus": nic.port},
            what,
        )

    async def _nic_undo(self, nic_id: str, nic: _Nic, *, device: bool) -> None:
        """Remove the device (if ``device``), the netdev and the plumbing; what is not there
        is skipped. :raises BackendError: something stayed (the first problem)."""
        problems: list[str] = []
        if device and not nic.ready:
            try:
                await self._device_del(f"nic-{nic_id}", f"NIC {nic_id}")
            except BackendError as e:
                problems.append(str(e))
        if not problems:
            # The ready NIC stays, without its peer: QEMU closes the tap.
            netdev = "net-ready" if nic.ready else f"net-{nic_id}"
            try:
                await self._execute("netdev_del", {"id": netdev}, f"NIC {nic_id}")
            except BackendError as e:
                if qmp_error_class(e) not in ("DeviceNotFound", "GenericError"):
                    problems.append(str(e))
        if nic.plumbing is not None and not problems:
            try:
                await hostnet.unplumb(nic.plumbing)
            except BackendError as e:
                problems.append(str(e))
        if problems:
            raise BackendError("; ".join(problems))
        if not nic.ready:
            self._give_port(nic.port)

    def has_ready_nic(self, netns: str) -> bool:
        ready = self._ready_tap
        return ready is not None and bool(netns) and _same_file(ready.netns, netns)

    async def nic_remove(self, nic_id: str) -> None:
        """Hot-remove NIC ``nic_id``: ``device_del`` (waiting for the guest), ``netdev_del``
        (QEMU closes the tap), then the tap and the redirects on the host."""
        async with self._lock:
            nic = self._nics.get(nic_id)
            if nic is None:
                raise BackendError(f"no NIC {nic_id}")
            await self._nic_undo(nic_id, nic, device=True)
            del self._nics[nic_id]


def _check_disk_kind(path: str, mode: int, block_device: bool) -> None:
    """A pass-through disk must be a host block device; any other disk a regular file."""
    if block_device and not stat.S_ISBLK(mode):
        raise BackendError(f"pass-through disk {path} is not a host block device")
    if not block_device and not stat.S_ISREG(mode):
        raise BackendError(f"disk image {path} is not a regular file")


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (a network namespace, say)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
