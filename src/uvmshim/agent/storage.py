"""Guest storage: SCSI disks, the 9p export, vPMEM, overlays, sandbox/hugepage dirs. STDLIB ONLY.

A layer disk that comes with dm-verity parameters (``MountScsi.verity``) is mounted through a
read-only dm-verity device (:mod:`uvmshim.agent.devmapper`) named after its slot
(``verity-scsi<c>.<lun>``, ``verity-pmem<n>``), removed again when the disk is unmounted.

How a disk is found: the host creates virtio-scsi controller ``i`` at PCI address
``scsi_controller_pci_address(i)`` and hot-adds each disk at target ``SCSI_TARGET``, LUN
``lun``. The guest-side SCSI host number is assigned by Linux, so we start from the PCI device
in sysfs: ``/sys/bus/pci/devices/<addr>/virtio*/host*/target*:0:<T>/*:0:<T>:<L>/block/<sdX>``.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import struct
import sys
import threading
import time

from uvmshim.agent import paths
from uvmshim.agent.kmods import ModuleLoader
from uvmshim.agent.util import (
    AgentError,
    is_mountpoint,
    makedirs,
    mount,
    mounts,
    remove_dir,
    umount,
    wait_for,
)
from uvmshim.protocol.constants import (
    CONTAINER_ROOT_PREFIX,
    HUGEPAGES_DIR,
    PLAN9_GUEST_ROOT,
    PLAN9_MOUNT_OPTIONS,
    PLAN9_MOUNT_TAG,
    SANDBOX_MOUNTS_DIR,
    SCSI_TARGET,
    check_share_name,
    plan9_share_guest_path,
    scsi_controller_pci_address,
    scsi_linux_lun,
    vpmem_root_port_pci_address,
)
from uvmshim.protocol.messages import ErrorKind, ProtocolError
from uvmshim.protocol.requests import (
    CombineLayers,
    HugepagesDir,
    MountPlan9,
    MountPlan9Batch,
    MountScsi,
    MountVpmem,
    RemoveCombinedLayers,
    SandboxDir,
    UnmountPlan9,
    UnmountPlan9Batch,
    UnmountScsi,
    UnmountVpmem,
    VerityStatus,
)
from uvmshim.protocol.verity import (
    SUPERBLOCK_SIZE,
    Verity,
    VerityError,
    check_superblock,
    dm_table,
)

#: How long to wait for a hot-added disk or pmem device (seen in ~50 ms normally).
DEVICE_TIMEOUT = 5.0

#: 2 MiB pages reserved when a hugetlbfs mount finds none free (64 MiB).
DEFAULT_HUGEPAGES = 32

_VERITY_PREFIX = "verity-"


def _verity_name(kind: str, *numbers: int) -> str:
    """The dm device name of a verified disk in a slot: ``verity-scsi0.3``, ``verity-pmem1``."""
    return _VERITY_PREFIX + kind + ".".join(str(n) for n in numbers)


def _tree_blocks(v: Verity) -> int:
    from uvmshim.protocol.verity import DIGEST_SIZES, tree_blocks

    return tree_blocks(v.data_blocks, v.hash_block_size, DIGEST_SIZES[v.algorithm])


def find_scsi_block_device(controller: int, lun: int, *, sysfs: str = "/sys") -> str | None:
    """Return the block device name (``sdb``) at (controller, LUN), or None if absent."""
    try:
        addr = scsi_controller_pci_address(controller)
    except ValueError as err:
        raise AgentError(str(err), ErrorKind.INVALID) from None
    t, lun_l = SCSI_TARGET, scsi_linux_lun(lun)
    pattern = f"{sysfs}/bus/pci/devices/{addr}/virtio*/host*/target*:0:{t}/*:0:{t}:{lun_l}/block/*"
    for hit in sorted(glob.glob(pattern)):
        return os.path.basename(hit)
    return None


def find_pmem_device(device: int, *, sysfs: str = "/sys") -> str | None:
    """Return the block device name (``pmem1``) of vPMEM device ``device``, or None.

    The device sits behind root port ``vpmem_root_port_pci_address(device)``. If that PCI
    address does not exist at all (a VM with boot-time pmem devices on the root bus), fall
    back to ``pmem<device>``, which matches probe order there.
    """
    try:
        port = f"{sysfs}/bus/pci/devices/{vpmem_root_port_pci_address(device)}"
    except ValueError as err:
        raise AgentError(str(err), ErrorKind.INVALID) from None
    if not os.path.exists(port):
        name = f"pmem{device}"
        return name if os.path.exists(f"{sysfs}/block/{name}") else None
    pattern = f"{port}/0000:*/virtio*/ndbus*/region*/namespace*/block/pmem*"
    for hit in sorted(glob.glob(pattern)):
        return os.path.basename(hit)
    return None


def scsi_host_name(controller: int, *, sysfs: str = "/sys") -> str | None:
    """Return the SCSI host (``host1``) of controller ``controller``, or None."""
    addr = scsi_controller_pci_address(controller)
    for hit in sorted(glob.glob(f"{sysfs}/bus/pci/devices/{addr}/virtio*/host*")):
        return os.path.basename(hit)
    return None


#: How long a freshly hot-added disk may answer ENXIO/ENOENT before we give up (hcsshim's
#: guest retries mounts for 5 s on exactly these errors).
DEVICE_SETTLE_TIMEOUT = 5.0


def detect_fstype(device: str, *, settle: float = DEVICE_SETTLE_TIMEOUT) -> str:
    """Return ``ext4``, ``xfs`` or ``erofs`` from the superblock of ``device``.

    A disk whose block device was just registered can still answer ENXIO (the sd driver has
    not finished bringing it online); that is retried for up to ``settle`` seconds.

    :raises AgentError: if the device cannot be read or holds none of these.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            with open(device, "rb") as f:
                head = f.read(2048)
            break
        except OSError as err:
            if err.errno not in (errno.ENXIO, errno.ENOENT) or time.monotonic() > deadline:
                raise AgentError(f"read {device}: {err.strerror}") from None
            time.sleep(0.01)
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 1028 and struct.unpack_from("<I", head, 1024)[0] == 0xE0F5E1E2:
        return "erofs"
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1024 + 56)[0] == 0xEF53:
        return "ext4"  # ext2/3 images mount fine with the ext4 driver
    raise AgentError(f"{device}: no ext4, xfs or erofs file system found",
                     ErrorKind.UNSUPPORTED)


def read_only_options(fstype: str) -> list[str]:
    """Mount options for a read-only mount that never writes to the device.

    A read-only ext4/xfs mount still replays a dirty journal unless told not to, which fails
    on a read-only disk: ``noload`` / ``norecovery`` skip that.
    """
    extra = {"ext4": ["noload"], "xfs": ["norecovery"]}.get(fstype, [])
    return ["ro", *extra]


class Storage:
    """Mount and unmount everything the host asks for.

    :param loader: loads kernel modules on demand.
    :param sysfs: sysfs root (tests point it at a fake tree).
    :param dev: /dev root.
    """

    def __init__(self, loader: ModuleLoader, *, sysfs: str = "/sys", dev: str = "/dev") -> None:
        self._loader = loader
        self._sysfs = sysfs
        self._dev = dev
        self._share_lock = threading.Lock()

    # SCSI ------------------------------------------------------------------------------------

    def _wait_scsi(self, controller: int, lun: int) -> str:
        def check() -> str | None:
            name = find_scsi_block_device(controller, lun, sysfs=self._sysfs)
            if name and os.path.exists(f"{self._dev}/{name}"):
                return name
            return None

        def rescan() -> None:
            # A disk the guest let go of (unmount_scsi deletes it) is not re-probed by the
            # kernel if the host did not re-plug it; ask the SCSI host to scan that LUN.
            host = scsi_host_name(controller, sysfs=self._sysfs)
            if host:
                try:
                    with open(f"{self._sysfs}/class/scsi_host/{host}/scan", "w") as f:
                        f.write(f"0 {SCSI_TARGET} {scsi_linux_lun(lun)}")
                except OSError:
                    pass

        name = wait_for(check, timeout=DEVICE_TIMEOUT, on_slow=rescan)
        if name is None:
            raise AgentError(
                f"no SCSI disk at controller {controller} LUN {lun} after {DEVICE_TIMEOUT:g} s",
                ErrorKind.TIMEOUT)
        return name

    def mount_scsi(self, req: MountScsi) -> dict[str, str]:
        """Wait for the disk at (controller, LUN) and mount it (or only wait, if no path)."""
        guest_path = req.guest_path
        self._loader.ensure_group("scsi")
        name = self._wait_scsi(req.controller, req.lun)
        device = f"{self._dev}/{name}"
        if not guest_path:
            return {"device": device}
        if req.verity is not None and not req.read_only:
            raise AgentError("dm-verity needs a read-only mount", ErrorKind.INVALID)
        found = self._mount_disk(device, guest_path, options=req.options,
                                 read_only=req.read_only, verity=req.verity,
                                 dm_name=_verity_name("scsi", req.controller, req.lun))
        return {"device": device, **found}

    def _mount_disk(self, device: str, guest_path: str, *, options: tuple[str, ...] = (),
                    read_only: bool, verity: dict[str, object] | None,
                    dm_name: str) -> dict[str, str]:
        """Mount ``device`` (through dm-verity device ``dm_name`` if ``verity``); return
        ``{"fstype": ...}`` plus ``"verity"`` (the dm device)."""
        source, found = device, {}
        if verity is not None:
            source = found["verity"] = self._open_verity(verity, device, dm_name)
        try:
            fstype = detect_fstype(source)
            self._loader.ensure_group(fstype)
            opts = read_only_options(fstype) if read_only else []
            opts += [o for o in options if o and o not in opts]
            makedirs(guest_path)
            mount(source, guest_path, fstype=fstype, options=",".join(opts))
        except AgentError as err:
            if verity is None:
                raise
            why = self._verity_failure(dm_name)
            self._close_verity(dm_name)
            if why is not None:
                raise AgentError(
                    f"{device}: dm-verity refused the layer's data{f' ({why})' if why else ''}: "
                    "it does not match the root hash, the disk was changed after the import",
                    ErrorKind.CORRUPT) from None
            raise AgentError(f"{err} (through dm-verity device {dm_name})", err.kind) from None
        found["fstype"] = fstype
        return found

    def unmount_scsi(self, req: UnmountScsi) -> None:
        """Unmount ``guest_path`` (if given) and detach the disk from the guest kernel.

        Deleting the SCSI device makes the later hot-unplug clean: the kernel has flushed and
        forgotten the disk instead of seeing it vanish under it.
        """
        if req.guest_path:
            umount(req.guest_path)
            remove_dir(req.guest_path)
        self._close_verity(_verity_name("scsi", req.controller, req.lun))
        name = find_scsi_block_device(req.controller, req.lun, sysfs=self._sysfs)
        if name is None:
            return
        device = f"{self._dev}/{name}"
        if any(src == device or src.startswith(device + "p") for src, *_ in mounts()):
            return  # still mounted elsewhere: keep it
        try:
            with open(f"{self._sysfs}/block/{name}/device/delete", "w") as f:
                f.write("1")
        except FileNotFoundError:
            pass
        except OSError as err:
            raise AgentError(f"delete SCSI device {name}: {err.strerror}") from None

    # Plan 9 ----------------------------------------------------------------------------------

    def _ensure_share_root(self) -> None:
        # One virtio-9p device allows one guest mount (a second gives EBUSY), so the export is
        # mounted once and every share is a bind mount of one of its subdirectories.
        with self._share_lock:
            if is_mountpoint(PLAN9_GUEST_ROOT):
                return
            self._loader.ensure_group("9p")
            makedirs(PLAN9_GUEST_ROOT)
            mount(PLAN9_MOUNT_TAG, PLAN9_GUEST_ROOT, fstype="9p", options=PLAN9_MOUNT_OPTIONS)

    def mount_plan9(self, req: MountPlan9) -> None:
        """Bind share ``name`` (``PLAN9_GUEST_ROOT/<name>``) onto ``guest_path``."""
        name, guest_path = req.name, req.guest_path
        try:
            check_share_name(name)
        except ValueError as err:
            raise AgentError(str(err), ErrorKind.INVALID) from None
        if not guest_path:
            raise AgentError("mount_plan9 needs a guest path", ErrorKind.INVALID)
        self._ensure_share_root()
        src = plan9_share_guest_path(name)
        if not os.path.lexists(src):
            raise AgentError(f"share {name} not found in the 9p export ({src})",
                             ErrorKind.NOT_FOUND)
        if os.path.isdir(src):
            makedirs(guest_path)
        else:
            makedirs(os.path.dirname(guest_path) or "/")
            if not os.path.exists(guest_path):
                open(guest_path, "a").close()  # an empty file as the bind target
        mount(src, guest_path, options="bind")
        if req.read_only:
            # The host already enforces read-only shares; this makes the guest view match.
            try:
                mount(src, guest_path, options="remount,bind,ro")
            except AgentError:
                umount(guest_path)
                raise

    def unmount_plan9(self, req: UnmountPlan9) -> None:
        """Unmount share ``name`` from ``guest_path`` and remove the mount point."""
        if req.guest_path:
            umount(req.guest_path)
            remove_dir(req.guest_path)

    def mount_plan9_batch(self, req: MountPlan9Batch) -> None:
        """Link each guest path to its share in the export mount, all or none.

        No process and no mount per share: a link costs a few system calls where a bind
        mount costs two runs of mount(8) (the initrd has no ctypes for mount(2)).
        """
        names, guest_paths = req.names, req.guest_paths
        if len(names) != len(guest_paths):
            raise AgentError(f"mount_plan9_batch: {len(names)} names for {len(guest_paths)} "
                             "guest paths", ErrorKind.INVALID)
        for name, guest_path in zip(names, guest_paths, strict=True):
            try:
                check_share_name(name)
            except ValueError as err:
                raise AgentError(str(err), ErrorKind.INVALID) from None
            if not guest_path.startswith("/") or "\0" in guest_path:
                raise AgentError(f"share {name}: bad guest path {guest_path!r}",
                                 ErrorKind.INVALID)
        if not names:
            return
        self._ensure_share_root()
        try:
            present = set(os.listdir(PLAN9_GUEST_ROOT))
        except OSError as err:
            raise AgentError(f"list the 9p export: {err.strerror}") from None
        made: set[str] = set()
        done: list[str] = []
        try:
            for name, guest_path in zip(names, guest_paths, strict=True):
                if name not in present:
                    raise AgentError(f"share {name} not found in the 9p export "
                                     f"({plan9_share_guest_path(name)})", ErrorKind.NOT_FOUND)
                parent = os.path.dirname(guest_path) or "/"
                if parent not in made:
                    makedirs(parent)
                    made.add(parent)
                try:
                    os.symlink(plan9_share_guest_path(name), guest_path)
                except FileExistsError:
                    # An empty directory (a mount point left behind) may be replaced.
                    try:
                        os.rmdir(guest_path)
                        os.symlink(plan9_share_guest_path(name), guest_path)
                    except OSError as err:
                        raise AgentError(f"share {name} at {guest_path}: {err.strerror}",
                                         ErrorKind.BUSY) from None
                except OSError as err:
                    raise AgentError(f"share {name} at {guest_path}: {err.strerror}") from None
                done.append(guest_path)
        except AgentError:
            for guest_path in reversed(done):
                try:
                    os.unlink(guest_path)
                except OSError as err:  # the link stays; say so
                    print(f"uvmshim-agent: undo {guest_path}: {err}", file=sys.stderr)
            raise

    def unmount_plan9_batch(self, req: UnmountPlan9Batch) -> dict[str, dict[str, str]]:
        """Take each share away from its guest path, in order, attempting every one."""
        failed: dict[str, str] = {}
        for name, guest_path in zip(req.names, req.guest_paths, strict=False):
            try:
                if os.path.islink(guest_path):  # mount_plan9_batch's: no mount to look for
                    os.unlink(guest_path)
                elif guest_path:
                    umount(guest_path)
                    remove_dir(guest_path)
            except FileNotFoundError:
                pass
            except OSError as err:
                failed[name] = f"remove {guest_path}: {err.strerror}"
            except AgentError as err:
                failed[name] = str(err)
        for name in req.names[len(req.guest_paths):]:
            failed[name] = "no guest path given"
        return {"failed": failed}

    # vPMEM -----------------------------------------------------------------------------------

    def mount_vpmem(self, req: MountVpmem) -> None:
        """Mount ``/dev/pmem<device>`` read-only on ``guest_path``."""
        device, guest_path = req.device, req.guest_path
        self._loader.ensure_group("pmem")

        def check() -> str | None:
            name = find_pmem_device(device, sysfs=self._sysfs)
            node = f"{self._dev}/{name}" if name else None
            return node if node and os.path.exists(node) else None

        node = wait_for(check, timeout=DEVICE_TIMEOUT)
        if node is None:
            raise AgentError(f"vPMEM device {device} did not appear after {DEVICE_TIMEOUT:g} s",
                             ErrorKind.TIMEOUT)
        self._mount_disk(node, guest_path, read_only=True, verity=req.verity,
                         dm_name=_verity_name("pmem", device))

    def unmount_vpmem(self, req: UnmountVpmem) -> None:
        """Unmount vPMEM device ``device`` from ``guest_path``."""
        if req.guest_path:
            umount(req.guest_path)
            remove_dir(req.guest_path)
        self._close_verity(_verity_name("pmem", req.device))

    # dm-verity -------------------------------------------------------------------------------

    def _open_verity(self, spec: dict[str, object], device: str, dm_name: str) -> str:
        """Check ``spec`` against the disk's verity superblock and put a dm-verity device over
        ``device``; return the new device's node."""
        from uvmshim.agent import devmapper

        try:
            v = Verity.from_json(spec).check()
        except (ProtocolError, VerityError) as err:
            raise AgentError(str(err), ErrorKind.INVALID) from None
        self._loader.ensure_group("dm-verity")
        try:
            with open(device, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(v.hash_offset)
                raw = f.read(SUPERBLOCK_SIZE)
        except OSError as err:
            raise AgentError(f"read {device}: {err.strerror}") from None
        try:
            check_superblock(raw, v)
        except VerityError as err:
            raise AgentError(f"{device}: {err}", ErrorKind.CORRUPT) from None
        if size < v.hash_offset + (1 + _tree_blocks(v)) * v.hash_block_size:
            raise AgentError(f"{device}: the disk ends before its dm-verity hash tree",
                             ErrorKind.CORRUPT)
        self._close_verity(dm_name)  # one left over by an agent that died mid-unmount
        rdev = os.stat(device).st_rdev
        data = f"{os.major(rdev)}:{os.minor(rdev)}"
        node = devmapper.device_node(
            devmapper.create(dm_name, "verity", dm_table(v, data), v.data_bytes // 512),
            dev=self._dev, sysfs=self._sysfs)
        if wait_for(lambda: node if os.path.exists(node) else None,
                    timeout=DEVICE_TIMEOUT) is None:
            self._close_verity(dm_name)
            raise AgentError(f"{node} (dm-verity over {device}) did not appear",
                             ErrorKind.TIMEOUT)
        return node

    def _close_verity(self, dm_name: str) -> None:
        """Remove dm device ``dm_name`` if it exists."""
        if not os.path.exists(f"{self._dev}/mapper/control"):
            return  # dm_mod not loaded: there is none
        from uvmshim.agent import devmapper

        devmapper.remove(dm_name)

    def _verity_failure(self, dm_name: str) -> str | None:
        """None if dm-verity device ``dm_name`` has not refused a block; else what the kernel
        said about it (``data block 66 is corrupted``; may be empty)."""
        from uvmshim.agent import devmapper

        try:
            statuses = devmapper.status(dm_name)
        except AgentError:
            return None
        if not any(t == "verity" and s.strip().startswith("C") for t, s in statuses):
            return None
        data = ""
        for slave in glob.glob(f"{self._sysfs}/block/*/holders/*"):
            try:
                with open(f"{slave}/dm/name") as f:
                    if f.read().strip() == dm_name:
                        with open(f"{slave.split('/holders/')[0]}/dev") as g:
                            data = g.read().strip()
            except OSError:
                continue
        needle = f"verity: {data}: "
        lines = devmapper.kernel_messages(needle) if data else []
        return "; ".join(line.split(needle, 1)[-1] for line in lines)

    def verity_status(self, req: VerityStatus) -> dict[str, dict[str, object]]:
        """For each of ``guest_paths`` mounted through dm-verity: has a block failed?"""
        source = {target: src for src, target, *_ in mounts()}
        out: dict[str, dict[str, object]] = {}
        for path in req.guest_paths:
            src = source.get(path.rstrip("/") or "/", "")
            dev_name = src.rsplit("/", 1)[-1]
            try:
                with open(f"{self._sysfs}/block/{dev_name}/dm/name") as f:
                    dm_name = f.read().strip()
            except OSError:
                continue
            if not dm_name.startswith(_VERITY_PREFIX):
                continue
            why = self._verity_failure(dm_name)
            out[path] = {"corrupted": why is not None, "detail": why or ""}
        return out

    # Overlay ---------------------------------------------------------------------------------

    def combine_layers(self, req: CombineLayers) -> None:
        """Mount an overlay of ``layers`` (top-most first) on ``rootfs``.

        With ``scratch_dir`` the overlay is writable (``upper``/``work`` below it, one pair per
        container: reusing a pair is undefined behaviour). Without it the overlay is
        read-only; a single read-only layer is bind-mounted read-only instead, because
        overlayfs needs two lower dirs when there is no upper dir.
        """
        container_id, rootfs, layers, scratch_dir = (
            req.container_id, req.rootfs, req.layers, req.scratch_dir)
        if not layers:
            raise AgentError(f"combine_layers for {container_id}: no layers", ErrorKind.INVALID)
        if not rootfs:
            raise AgentError(f"combine_layers for {container_id}: no rootfs path",
                             ErrorKind.INVALID)
        for layer in layers:
            if ":" in layer or "," in layer:
                # overlayfs splits lowerdir on ':' and options on ','
                raise AgentError(f"layer path {layer!r} contains ':' or ','", ErrorKind.INVALID)
        makedirs(rootfs)
        if not scratch_dir and len(layers) == 1:
            mount(layers[0], rootfs, options="bind")
            mount(layers[0], rootfs, options="remount,bind,ro")
            return
        self._loader.ensure_group("overlay")
        opts = [f"lowerdir={':'.join(layers)}"]
        if scratch_dir:
            upper, work = f"{scratch_dir}/upper", f"{scratch_dir}/work"
            makedirs(upper)
            makedirs(work)
            opts += [f"upperdir={upper}", f"workdir={work}"]
        else:
            opts.insert(0, "ro")
        mount("overlay", rootfs, fstype="overlay", options=",".join(opts))

    def remove_combined_layers(self, req: RemoveCombinedLayers) -> None:
        """Unmount the overlay (or bind) on ``rootfs``."""
        umount(req.rootfs)

    # Sandbox and hugepages -------------------------------------------------------------------

    def sandbox_dir(self, req: SandboxDir) -> str:
        """Create (mode 0777) and return the guest directory for a ``sandbox://`` source."""
        path = paths.sandbox_mount_path(req.sandbox_id, req.path)
        makedirs(path, 0o777)
        return path

    def hugepages_dir(self, req: HugepagesDir) -> str:
        """Create the directory for a ``hugepages://`` source, with hugetlbfs mounted on it."""
        path, size = paths.hugepages_mount_path(req.sandbox_id, req.path)
        if is_mountpoint(path):
            return path
        self._reserve_hugepages(paths.hugepage_size_kb(size))
        makedirs(path)
        mount("none", path, fstype="hugetlbfs", options=f"pagesize={size}")
        return path

    def remove_sandbox_dirs(self, sandbox_id: str) -> None:
        """Unmount the sandbox's hugetlbfs mounts and remove its sandbox directories.

        Called when the sandbox (a pod's sandbox container, or a container that is its own
        sandbox) is deleted: these directories are shared by the pod and live as long as it.
        """
        root = os.path.join(CONTAINER_ROOT_PREFIX, sandbox_id)
        huge = os.path.join(root, HUGEPAGES_DIR)
        for _src, target, *_ in sorted(mounts(), key=lambda m: -len(m[1])):
            if target == huge or target.startswith(huge + "/"):
                umount(target)
        for sub in (HUGEPAGES_DIR, SANDBOX_MOUNTS_DIR):
            path = os.path.join(root, sub)
            if os.path.isdir(path) and not is_mountpoint(path):
                shutil.rmtree(path, ignore_errors=True)

    def _reserve_hugepages(self, size_kb: int) -> None:
        base = f"{self._sysfs}/kernel/mm/hugepages/hugepages-{size_kb}kB"
        if not os.path.isdir(base):
            raise AgentError(f"the guest does not support {size_kb} kB huge pages",
                             ErrorKind.UNSUPPORTED)
        try:
            with open(f"{base}/free_hugepages") as f:
                if int(f.read()) > 0:
                    return
            with open(f"{base}/nr_hugepages") as f:
                total = int(f.read())
            # A 1G page needs RAM the small UVM usually lacks; reserve only a few small ones.
            want = DEFAULT_HUGEPAGES if size_kb <= 2048 else 1
            with open(f"{base}/nr_hugepages", "w") as f:
                f.write(str(total + want))
        except (OSError, ValueError) as err:
            raise AgentError(f"reserve huge pages: {err}") from None
