"""The utility VM as the allocator sees it: device managers and counters over two backends.

This is hcsshim's ``uvm.UtilityVM`` without the process: it owns the SCSI, Plan9, vPMEM and
vPCI managers, the UVM-wide mount counter, and the resources that live as long as the UVM
(a pod sandbox's layers). Whether the backends are the simulated UVM or a QEMU VM makes no
difference here.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from uvmshim.errors import ReleaseError
from uvmshim.protocol.verity import Verity
from uvmshim.resources import Resource, release_newest_first
from uvmshim.uvm.backend import GuestBackend, HostBackend, LayerRef
from uvmshim.uvm.network import NetworkManager
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.plan9 import Plan9Manager, Plan9Request, Plan9Share
from uvmshim.uvm.scsi import ScsiManager, ScsiMount, VMAccess
from uvmshim.uvm.vpci import VPCIDevice, VPCIManager
from uvmshim.uvm.vpmem import VPMemManager, VPMemMount


class UtilityVM:
    """A Linux utility VM's device bookkeeping.

    :param vm_id: the UVM's id (appears in error messages).
    :param host: changes virtual hardware.
    :param guest: changes the guest.
    :param new_guid: makes VMBus GUIDs; the simulated UVM passes a deterministic one.
    """

    def __init__(
        self,
        vm_id: str,
        host: HostBackend,
        guest: GuestBackend,
        options: UvmOptions | None = None,
        *,
        new_guid: Callable[[], str] | None = None,
    ) -> None:
        self.id = vm_id
        self.host = host
        self.guest = guest
        self.options = options or UvmOptions()
        self.new_guid = new_guid or (lambda: str(uuid.uuid4()))
        self._mount_counter = itertools.count(1)
        # hcsshim's NewManager: each manager gets the backends and the VM id, not the UVM.
        self.scsi = ScsiManager(host, guest, vm_id, self.options.scsi_controller_count)
        self.plan9 = Plan9Manager(host, guest, vm_id,
                                  no_writable_file_shares=self.options.no_writable_file_shares)
        self.vpmem = VPMemManager(host, guest, vm_id, self.options.effective_vpmem_count,
                                  self.options.vpmem_max_size)
        self.vpci = VPCIManager(host, guest, vm_id, new_guid=self.new_guid)
        self.network = NetworkManager(host, guest, vm_id)
        self._owned: list[Resource] = []

    # Section: counters and properties

    def mount_counter(self) -> int:
        """The next value of the UVM-wide mount counter (the first is 1; never reused)."""
        return next(self._mount_counter)

    @property
    def devices_physically_backed(self) -> bool:
        return self.options.fully_physically_backed

    # Section: devices (hcsshim's Add*/Remove* on UtilityVM)

    async def add_scsi(self, host_path: str, guest_path: str, *, read_only: bool,
                       options: Sequence[str] = (),
                       access: VMAccess = VMAccess.INDIVIDUAL,
                       verity: Verity | None = None) -> ScsiMount:
        return await self.scsi.add(host_path, guest_path, read_only=read_only, options=options,
                                   access=access, verity=verity)

    async def add_scsi_physical_disk(self, host_path: str, guest_path: str, *, read_only: bool,
                                     options: Sequence[str] = ()) -> ScsiMount:
        return await self.scsi.add(host_path, guest_path, read_only=read_only, options=options,
                                   passthrough=True, access=VMAccess.INDIVIDUAL)

    async def add_plan9(self, host_path: str, guest_path: str, *, read_only: bool,
                        restrict: bool = False,
                        allowed_names: Sequence[str] | None = None) -> Plan9Share:
        return await self.plan9.add(host_path, guest_path, read_only=read_only,
                                    restrict=restrict, allowed_names=allowed_names)

    async def add_plan9_batch(self, requests: Sequence[Plan9Request]) -> list[Plan9Share]:
        """Many shares in one host round and one guest request (see :mod:`uvmshim.uvm.plan9`)."""
        return await self.plan9.add_batch(requests)

    async def add_vpmem(self, host_path: str, *, verity: Verity | None = None) -> VPMemMount:
        return await self.vpmem.add(host_path, verity=verity)

    async def assign_device(self, instance_id: str, function: int,
                            vmbus_guid: str = "") -> VPCIDevice:
        return await self.vpci.assign(instance_id, function, vmbus_guid)

    async def combine_layers(self, container_id: str, layer_paths: Sequence[str],
                             scratch_dir: str, rootfs: str) -> None:
        await self.guest.combine_layers(container_id, rootfs,
                                        [LayerRef(p) for p in layer_paths], scratch_dir)

    async def remove_combined_layers(self, rootfs: str) -> None:
        await self.guest.remove_combined_layers(rootfs)

    # Section: resources that live as long as the UVM

    @property
    def owned(self) -> list[Resource]:
        """What the UVM adopted and will release when it goes."""
        return list(self._owned)

    def adopt(self, resource: Resource) -> None:
        """Keep ``resource`` until :meth:`release_owned` (a pod sandbox's layers)."""
        self._owned.append(resource)

    async def release_owned(self) -> None:
        """Release what the UVM adopted, newest first (part of tearing the UVM down)."""
        self._owned, errors = await release_newest_first(self._owned)
        if errors:
            raise ReleaseError("failed to release the UVM's own resources", errors)

    def inventory(self) -> dict[str, list[dict[str, Any]]]:
        """What the device managers hold now (``network`` only while it holds something)."""
        held = {
            "scsi": self.scsi.attachments(),
            "plan9": self.plan9.shares(),
            "vpmem": self.vpmem.devices(),
            "vpci": self.vpci.devices(),
        }
        network = self.network.namespaces()
        if network:
            held["network"] = network
        return held
