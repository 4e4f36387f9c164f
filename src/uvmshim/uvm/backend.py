"""The seam between the device managers and a concrete UVM.

hcsshim sends each change as one ``ModifySettingRequest`` with a host part (HCS) and a guest part
(GCS). We keep the two apart: a :class:`HostBackend` changes the virtual hardware (QMP, host bind
mounts) and a :class:`GuestBackend` changes the guest (the agent). The managers decide the order,
as hcsshim's ``modify`` does: on add the host step runs first and is rolled back if the guest step
fails; on remove the guest step runs first.

Two implementations exist: the simulated UVM (:mod:`uvmshim.uvm.sim`) and the QEMU UVM.
Every method raises :class:`uvmshim.errors.BackendError` (or a subclass) on failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from uvmshim.protocol.verity import Verity
from uvmshim.uvm.hostnet import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRef:
    """One read-only layer of a combined-layers (overlay) request, top-most first."""

    path: str


@dataclass(frozen=True)
class Plan9Add:
    """One share of :meth:`HostBackend.plan9_add_batch` (the arguments of ``plan9_add``)."""

    name: str
    host_path: str
    read_only: bool
    allowed_files: tuple[str, ...] = ()


class HostBackend(Protocol):
    """Virtual hardware changes: the HCS half of hcsshim's ``modify``."""

    async def scsi_attach(
        self, controller: int, lun: int, host_path: str, *, read_only: bool, passthrough: bool
    ) -> None:
        """Hot-add ``host_path`` (an image file, or a block device if ``passthrough``)."""

    async def scsi_detach(self, controller: int, lun: int) -> None:
        """Hot-remove the disk at (controller, LUN)."""

    async def plan9_add(
        self, name: str, host_path: str, *, read_only: bool, allowed_files: Sequence[str]
    ) -> None:
        """Share ``host_path`` as ``name``; if ``allowed_files`` is non-empty, only those files."""

    async def plan9_remove(self, name: str) -> None:
        """Stop sharing ``name``."""

    async def plan9_add_batch(self, shares: Sequence[Plan9Add]) -> None:
        """Share each of ``shares`` in one host round, all or none.

        :raises BatchError: naming the item that failed (the others are undone too).
        """

    async def plan9_remove_batch(self, names: Sequence[str]) -> dict[str, str]:
        """Stop sharing each of ``names``, in order, attempting every one; return why, per
        name, for those still shared."""

    async def vpmem_add(self, device: int, host_path: str) -> None:
        """Expose ``host_path`` read-only as vPMEM device ``device``."""

    async def vpmem_remove(self, device: int) -> None:
        """Remove vPMEM device ``device``."""

    async def vpci_add(self, vmbus_guid: str, instance_id: str, function: int) -> None:
        """Assign host PCI device ``instance_id`` (virtual function ``function``)."""

    async def vpci_remove(self, vmbus_guid: str) -> None:
        """Unassign the device assigned as ``vmbus_guid``."""

    async def nic_add(self, nic_id: str, endpoint: Endpoint, *, netns: str = "",
                      host_forwards: Sequence[str] | None = None) -> bool:
        """Hot-add a NIC with ``endpoint``'s MAC and MTU: connected to ``endpoint``'s
        interface in the host network namespace ``netns`` (a tap and tc redirects), or, with
        ``host_forwards`` instead, to QEMU's user-mode network with those port forwards
        (``tcp:HOSTADDR:HOSTPORT-:GUESTPORT``).

        :returns: True if, instead of a hot-add, the NIC is the VM's ready NIC (present from
            boot, its tap made for ``netns`` before the VM started), which the guest claims
            (``add_nic(ready=True)``)."""

    async def nic_remove(self, nic_id: str) -> None:
        """Hot-remove NIC ``nic_id`` and undo what connected it on the host."""

    def has_ready_nic(self, netns: str) -> bool:
        """Whether the first :meth:`nic_add` for ``netns`` will be the ready NIC."""


class GuestBackend(Protocol):
    """Changes inside the guest: the GCS half of hcsshim's ``modify``."""

    async def mount_scsi(
        self, controller: int, lun: int, guest_path: str, *, read_only: bool,
        options: Sequence[str], verity: Verity | None = None,
    ) -> None:
        """Mount the disk at (controller, LUN) on ``guest_path`` (through dm-verity with
        ``verity``'s root hash, if given)."""

    async def unmount_scsi(self, controller: int, lun: int, guest_path: str) -> None:
        """Unmount ``guest_path`` (if non-empty) and let go of the disk at (controller, LUN)."""

    async def mount_plan9(self, name: str, guest_path: str, *, read_only: bool) -> None:
        """Mount share ``name`` on ``guest_path``."""

    async def unmount_plan9(self, name: str, guest_path: str) -> None:
        """Unmount share ``name`` from ``guest_path`` and remove the directory."""

    async def mount_plan9_batch(self, shares: Sequence[tuple[str, str, bool]]) -> None:
        """Make each share ``(name, guest_path, read_only)`` appear at its guest path, all or
        none (one request; the guest path may be a link into the export rather than a mount:
        the host makes a read-only share read-only)."""

    async def unmount_plan9_batch(self, shares: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Take each share ``(name, guest_path)`` away, in order, attempting every one;
        return why, per name, for those that stay."""

    async def mount_vpmem(self, device: int, guest_path: str, *,
                          verity: Verity | None = None) -> None:
        """Mount vPMEM device ``device`` read-only on ``guest_path`` (through dm-verity with
        ``verity``'s root hash, if given)."""

    async def unmount_vpmem(self, device: int, guest_path: str) -> None:
        """Unmount vPMEM device ``device`` from ``guest_path``."""

    async def add_vpci(self, vmbus_guid: str) -> None:
        """Wait for the assigned PCI device ``vmbus_guid`` to show up in the guest."""

    async def add_netns(self, ns_id: str, *, bind_ready: bool = False) -> None:
        """Create the guest network namespace ``ns_id`` (``lo`` up); with ``bind_ready``,
        bind the ready NIC's driver meanwhile (its first NIC will be the ready NIC)."""

    async def remove_netns(self, ns_id: str) -> None:
        """Remove the guest network namespace ``ns_id``."""

    async def add_nic(self, ns_id: str, nic_id: str, endpoint: Endpoint, *,
                      ready: bool = False) -> None:
        """Move the NIC with ``endpoint``'s MAC (``ready``: the ready NIC, which gets that
        MAC) into ``ns_id`` and configure it like ``endpoint`` (name, MTU, addresses,
        routes)."""

    async def remove_nic(self, ns_id: str, nic_id: str) -> None:
        """Take NIC ``nic_id`` down (before its hot-unplug)."""

    async def combine_layers(
        self, container_id: str, rootfs: str, layers: Sequence[LayerRef], scratch_dir: str
    ) -> None:
        """Mount an overlay on ``rootfs``: ``layers`` below, upper/work in ``scratch_dir``."""

    async def remove_combined_layers(self, rootfs: str) -> None:
        """Unmount the overlay on ``rootfs``."""

    async def install_drivers(self, rw_path: str, disk_path: str) -> None:
        """Run ``install-drivers <rw_path> <disk_path>`` in the UVM (hcsshim's InstallDrivers)."""


async def host_then_guest(
    host_add: Callable[[], Awaitable[None]],
    guest_add: Callable[[], Awaitable[None]] | None,
    host_undo: Callable[[], Awaitable[None]],
) -> None:
    """hcsshim's ``modify`` for an add: the host step, then the guest step; if the guest step
    fails (or is cancelled), the host step is undone and the guest's error is raised."""
    await host_add()
    if guest_add is None:
        return
    try:
        await guest_add()
    except BaseException:
        try:
            await host_undo()
        except Exception as rollback_err:
            log.warning("failed to roll back resource add: %s", rollback_err)
        raise
