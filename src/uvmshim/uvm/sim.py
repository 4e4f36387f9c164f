"""The simulated UVM: an in-memory, deterministic backend with a real UVM's limits.

It is a product backend, not a test mock: ``uvmshim plan`` runs allocations on it to show what
a spec will do. It keeps the state a real UVM would have (which disks sit in which slots, which
shares exist, what is mounted where in the guest, which overlays exist), refuses what a real one
refuses (a missing image, a busy slot, mounting over a mount, an overlay over unmounted layers),
records every host and guest operation in order, and can be told to fail at operation *N*.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uvmshim.errors import BackendError, BatchError, os_error_text
from uvmshim.protocol.verity import Verity
from uvmshim.uvm.backend import LayerRef, Plan9Add
from uvmshim.uvm.hostnet import Endpoint
from uvmshim.uvm.options import LUNS_PER_CONTROLLER, UvmOptions
from uvmshim.uvm.utilityvm import UtilityVM

_GUID_NAMESPACE = uuid.UUID("6c4f6f0e-2f0b-4d43-9a57-2b1d0c6f1a11")
#: Hot-plug root ports for NICs and assigned devices (a QEMU UVM's default).
SIM_HOTPLUG_PORTS = 4


@dataclass(frozen=True)
class Operation:
    """One recorded operation: ``side`` is ``host`` or ``guest``."""

    seq: int
    side: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "side": self.side, "op": self.op, **self.args}

    def __str__(self) -> str:
        detail = " ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"{self.seq:>4} {self.side:<5} {self.op} {detail}"


class SimulatedBackend:
    """Host and guest backend in one object (it implements both Protocols)."""

    def __init__(self, options: UvmOptions | None = None, *,
                 fail_at: Iterable[int] = ()) -> None:
        self.options = options or UvmOptions()
        self.operations: list[Operation] = []
        self._fail_at = set(fail_at)
        self._seq = itertools.count(1)
        # host state
        self.disks: dict[tuple[int, int], dict[str, Any]] = {}
        self.shares: dict[str, dict[str, Any]] = {}
        self.pmem: dict[int, str] = {}
        self.pci: dict[str, str] = {}
        self.nics: dict[str, dict[str, Any]] = {}
        # guest state
        self.mounts: dict[str, dict[str, Any]] = {}
        self.guest_devices: set[str] = set()
        self.netns: dict[str, set[str]] = {}  # guest network namespace -> its NICs
        # Indexes that keep every release O(1) (O(depth of the path)): how many mounts lie
        # strictly below each path, and how many guest mounts each share has.
        self._below: dict[str, int] = {}
        self._share_mounts: dict[str, int] = {}

    def fail_at(self, *numbers: int) -> None:
        """Make operation number ``n`` (1-based, counting from the start) fail once."""
        self._fail_at.update(numbers)

    def _record(self, side: str, op: str, **args: Any) -> None:
        seq = next(self._seq)
        self.operations.append(Operation(seq, side, op, args))
        if seq in self._fail_at:
            self._fail_at.discard(seq)
            raise BackendError(f"injected failure of operation {seq} ({side} {op})")

    def live(self) -> dict[str, Any]:
        """Everything still attached, shared or mounted (empty when all was released)."""
        state = {"disks": self.disks, "shares": self.shares, "pmem": self.pmem,
                 "pci": self.pci, "mounts": self.mounts, "nics": self.nics,
                 "netns": self.netns}
        return {k: v for k, v in state.items() if v}

    # Section: host side

    async def scsi_attach(self, controller: int, lun: int, host_path: str, *, read_only: bool,
                          passthrough: bool) -> None:
        self._record("host", "scsi-attach", controller=controller, lun=lun, path=host_path,
                     read_only=read_only, passthrough=passthrough)
        if not 0 <= controller < self.options.scsi_controller_count:
            raise BackendError(f"no SCSI controller {controller}")
        if not 0 <= lun < LUNS_PER_CONTROLLER:
            raise BackendError(f"bad SCSI LUN {lun}")
        if (controller, lun) in self.disks:
            raise BackendError(f"SCSI slot {controller}:{lun} is in use")
        try:
            os.stat(host_path)
        except OSError as err:
            raise BackendError(f"could not open disk image: {os_error_text('open', err)}") from err
        self.disks[(controller, lun)] = {"path": host_path, "read_only": read_only,
                                         "passthrough": passthrough}

    async def scsi_detach(self, controller: int, lun: int) -> None:
        self._record("host", "scsi-detach", controller=controller, lun=lun)
        if (controller, lun) not in self.disks:
            raise BackendError(f"no disk at SCSI slot {controller}:{lun}")
        if f"scsi:{controller}:{lun}" in self.guest_devices:
            raise BackendError(f"the guest still uses the disk at {controller}:{lun}")
        del self.disks[(controller, lun)]

    async def plan9_add(self, name: str, host_path: str, *, read_only: bool,
                        allowed_files: Sequence[str]) -> None:
        self._record("host", "plan9-add", name=name, path=host_path, read_only=read_only,
                     allowed_files=list(allowed_files))
        if name in self.shares:
            raise BackendError(f"plan9 share {name} exists")
        for path in [host_path, *(os.path.join(host_path, f) for f in allowed_files)]:
            try:
                os.stat(path)
            except OSError as err:
                raise BackendError(os_error_text("stat", err)) from err
        self.shares[name] = {"path": host_path, "read_only": read_only,
                             "allowed_files": list(allowed_files)}

    async def plan9_remove(self, name: str) -> None:
        self._record("host", "plan9-remove", name=name)
        if name not in self.shares:
            raise BackendError(f"no plan9 share {name}")
        if self._share_mounts.get(name):
            raise BackendError(f"plan9 share {name} is still mounted in the guest")
        del self.shares[name]

    async def plan9_add_batch(self, shares: Sequence[Plan9Add]) -> None:
        # One host round in a real UVM; recorded as its per-share operations, in order.
        added: list[str] = []
        try:
            for k, sh in enumerate(shares):
                try:
                    await self.plan9_add(sh.name, sh.host_path, read_only=sh.read_only,
                                         allowed_files=sh.allowed_files)
                except BackendError as err:
                    raise BatchError(err.message, k) from None
                added.append(sh.name)
        except BaseException:
            for name in reversed(added):
                await self.plan9_remove(name)
            raise

    async def plan9_remove_batch(self, names: Sequence[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for name in names:
            try:
                await self.plan9_remove(name)
            except BackendError as err:
                failed[name] = err.message
        return failed

    async def vpmem_add(self, device: int, host_path: str) -> None:
        self._record("host", "vpmem-add", device=device, path=host_path)
        if not 0 <= device < self.options.effective_vpmem_count:
            raise BackendError(f"no vPMEM device {device}")
        if device in self.pmem:
            raise BackendError(f"vPMEM device {device} is in use")
        self.pmem[device] = host_path

    async def vpmem_remove(self, device: int) -> None:
        self._record("host", "vpmem-remove", device=device)
        if device not in self.pmem:
            raise BackendError(f"no vPMEM device {device}")
        del self.pmem[device]

    async def vpci_add(self, vmbus_guid: str, instance_id: str, function: int) -> None:
        self._record("host", "vpci-add", vmbus_guid=vmbus_guid, instance_id=instance_id,
                     function=function)
        self.pci[vmbus_guid] = instance_id

    async def vpci_remove(self, vmbus_guid: str) -> None:
        self._record("host", "vpci-remove", vmbus_guid=vmbus_guid)
        if vmbus_guid not in self.pci:
            raise BackendError(f"no assigned device {vmbus_guid}")
        del self.pci[vmbus_guid]

    async def nic_add(self, nic_id: str, endpoint: Endpoint, *, netns: str = "",
                      host_forwards: Sequence[str] | None = None) -> bool:
        self._record("host", "nic-add", nic_id=nic_id, mac=endpoint.mac, netns=netns,
                     ifname=endpoint.ifname,
                     **({} if host_forwards is None else {"forwards": list(host_forwards)}))
        if nic_id in self.nics:
            raise BackendError(f"NIC {nic_id} already exists")
        if len(self.nics) + len(self.pci) >= SIM_HOTPLUG_PORTS:
            raise BackendError(f"NIC {endpoint.ifname}: no free hot-plug root port")
        self.nics[nic_id] = {"mac": endpoint.mac, "netns": netns, "ifname": endpoint.ifname}
        return False  # the simulated UVM has no ready NIC: every NIC is hot-added

    def has_ready_nic(self, netns: str) -> bool:
        return False

    async def nic_remove(self, nic_id: str) -> None:
        self._record("host", "nic-remove", nic_id=nic_id)
        if nic_id not in self.nics:
            raise BackendError(f"no NIC {nic_id}")
        del self.nics[nic_id]

    # Section: guest side

    @staticmethod
    def _ancestors(path: str) -> list[str]:
        """``/a/b/c`` -> ``["/a/b", "/a", "/"]`` (what lies above it)."""
        out = []
        p = path.rstrip("/")
        while p:
            p = p[: p.rfind("/")]
            out.append(p or "/")
            if not p:
                break
        return out

    def _mount(self, path: str, **what: Any) -> None:
        if path in self.mounts:
            raise BackendError(f"mount on {path}: device or resource busy")
        self.mounts[path] = what
        for above in self._ancestors(path):
            self._below[above] = self._below.get(above, 0) + 1
        share = what.get("share")
        if share is not None:
            self._share_mounts[share] = self._share_mounts.get(share, 0) + 1

    def _unmount(self, path: str, kind: str) -> None:
        mount = self.mounts.get(path)
        if mount is None or mount["kind"] != kind:
            raise BackendError(f"umount {path}: not mounted")
        if self._below.get(path.rstrip("/") or "/"):
            nested = next(p for p in self.mounts if p.startswith(path.rstrip("/") + "/"))
            raise BackendError(f"umount {path}: target is busy ({nested} is mounted below)")
        del self.mounts[path]
        for above in self._ancestors(path):
            left = self._below[above] - 1
            if left:
                self._below[above] = left
            else:
                del self._below[above]
        share = mount.get("share")
        if share is not None:
            left = self._share_mounts[share] - 1
            if left:
                self._share_mounts[share] = left
            else:
                del self._share_mounts[share]

    async def mount_scsi(self, controller: int, lun: int, guest_path: str, *, read_only: bool,
                         options: Sequence[str], verity: Verity | None = None) -> None:
        extra = {"verity": verity.root_hash} if verity is not None else {}
        self._record("guest", "mount-scsi", controller=controller, lun=lun, path=guest_path,
                     read_only=read_only, options=list(options), **extra)
        if (controller, lun) not in self.disks:
            raise BackendError(f"no disk at SCSI {controller}:{lun} in the guest")
        self._mount(guest_path, kind="scsi", controller=controller, lun=lun,
                    read_only=read_only)
        self.guest_devices.add(f"scsi:{controller}:{lun}")

    async def unmount_scsi(self, controller: int, lun: int, guest_path: str) -> None:
        self._record("guest", "unmount-scsi", controller=controller, lun=lun, path=guest_path)
        if guest_path:
            self._unmount(guest_path, "scsi")
        self.guest_devices.discard(f"scsi:{controller}:{lun}")

    async def mount_plan9(self, name: str, guest_path: str, *, read_only: bool) -> None:
        self._record("guest", "mount-plan9", name=name, path=guest_path, read_only=read_only)
        if name not in self.shares:
            raise BackendError(f"no plan9 share {name} to mount")
        self._mount(guest_path, kind="plan9", share=name, read_only=read_only)

    async def unmount_plan9(self, name: str, guest_path: str) -> None:
        self._record("guest", "unmount-plan9", name=name, path=guest_path)
        self._unmount(guest_path, "plan9")

    async def mount_plan9_batch(self, shares: Sequence[tuple[str, str, bool]]) -> None:
        # One agent request in a real UVM; recorded as its per-share mounts, in order.
        done: list[tuple[str, str]] = []
        try:
            for name, guest_path, read_only in shares:
                await self.mount_plan9(name, guest_path, read_only=read_only)
                done.append((name, guest_path))
        except BaseException:
            for name, guest_path in reversed(done):
                await self.unmount_plan9(name, guest_path)
            raise

    async def unmount_plan9_batch(self, shares: Sequence[tuple[str, str]]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for name, guest_path in shares:
            try:
                await self.unmount_plan9(name, guest_path)
            except BackendError as err:
                failed[name] = err.message
        return failed

    async def mount_vpmem(self, device: int, guest_path: str, *,
                          verity: Verity | None = None) -> None:
        extra = {"verity": verity.root_hash} if verity is not None else {}
        self._record("guest", "mount-vpmem", device=device, path=guest_path, **extra)
        if device not in self.pmem:
            raise BackendError(f"no /dev/pmem{device} in the guest")
        self._mount(guest_path, kind="vpmem", device=device, read_only=True)

    async def unmount_vpmem(self, device: int, guest_path: str) -> None:
        self._record("guest", "unmount-vpmem", device=device, path=guest_path)
        self._unmount(guest_path, "vpmem")

    async def add_vpci(self, vmbus_guid: str) -> None:
        self._record("guest", "add-vpci", vmbus_guid=vmbus_guid)
        if vmbus_guid not in self.pci:
            raise BackendError(f"assigned device {vmbus_guid} never showed up in the guest")

    async def add_netns(self, ns_id: str, *, bind_ready: bool = False) -> None:
        self._record("guest", "add-netns", ns_id=ns_id)
        if ns_id in self.netns:
            raise BackendError(f"network namespace {ns_id} exists")
        self.netns[ns_id] = set()

    async def remove_netns(self, ns_id: str) -> None:
        self._record("guest", "remove-netns", ns_id=ns_id)
        if ns_id not in self.netns:
            raise BackendError(f"no network namespace {ns_id}")
        del self.netns[ns_id]

    async def add_nic(self, ns_id: str, nic_id: str, endpoint: Endpoint, *,
                      ready: bool = False) -> None:
        self._record("guest", "add-nic", ns_id=ns_id, nic_id=nic_id, ifname=endpoint.ifname,
                     addresses=list(endpoint.addresses), routes=list(endpoint.routes))
        if ns_id not in self.netns:
            raise BackendError(f"no network namespace {ns_id}")
        if nic_id not in self.nics:
            raise BackendError(f"NIC {nic_id} ({endpoint.mac}) never showed up in the guest")
        self.netns[ns_id].add(nic_id)

    async def remove_nic(self, ns_id: str, nic_id: str) -> None:
        self._record("guest", "remove-nic", ns_id=ns_id, nic_id=nic_id)
        if nic_id not in self.netns.get(ns_id, set()):
            raise BackendError(f"no NIC {nic_id} in network namespace {ns_id}")
        self.netns[ns_id].discard(nic_id)

    async def combine_layers(self, container_id: str, rootfs: str, layers: Sequence[LayerRef],
                             scratch_dir: str) -> None:
        paths = [layer.path for layer in layers]
        self._record("guest", "combine-layers", container_id=container_id, rootfs=rootfs,
                     layers=paths, scratch=scratch_dir)
        for p in paths:
            if p not in self.mounts:
                raise BackendError(f"overlay on {rootfs}: layer {p} is not mounted")
        if scratch_dir and not any(
            scratch_dir.startswith(m.rstrip("/") + "/") and not info["read_only"]
            for m, info in self.mounts.items()
        ):
            raise BackendError(f"overlay on {rootfs}: scratch {scratch_dir} is not on a "
                               "writable mount")
        self._mount(rootfs, kind="overlay", layers=paths, scratch=scratch_dir, read_only=False)

    async def remove_combined_layers(self, rootfs: str) -> None:
        self._record("guest", "remove-combined-layers", rootfs=rootfs)
        self._unmount(rootfs, "overlay")

    async def install_drivers(self, rw_path: str, disk_path: str) -> None:
        self._record("guest", "install-drivers", rw_path=rw_path, disk_path=disk_path)
        if disk_path not in self.mounts:
            raise BackendError(f"install-drivers: {disk_path} is not mounted")


def simulated_uvm(options: UvmOptions | None = None, *, vm_id: str = "sim-uvm",
                  fail_at: Iterable[int] = ()) -> tuple[UtilityVM, SimulatedBackend]:
    """A fresh simulated UVM and its backend (to inspect operations and live state)."""
    opts = options or UvmOptions()
    backend = SimulatedBackend(opts, fail_at=fail_at)
    counter = itertools.count(1)

    def new_guid() -> str:
        return str(uuid.uuid5(_GUID_NAMESPACE, f"{vm_id}/{next(counter)}"))

    return UtilityVM(vm_id, backend, backend, opts, new_guid=new_guid), backend
