"""The guest half of a QEMU utility VM: :class:`AgentGuestBackend`, over the guest agent.

It implements :class:`uvmshim.uvm.backend.GuestBackend` (what the device managers ask of the
guest) by sending one typed request per call through an
:class:`~.agent_client.AgentClient`; the host half is :class:`~.host.QemuHostBackend` (QMP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from uvmshim.errors import BackendError
from uvmshim.protocol import (
    AddVpci,
    CombineLayers,
    HugepagesDir,
    InstallDrivers,
    MountPlan9,
    MountPlan9Batch,
    MountScsi,
    MountVpmem,
    RemoveCombinedLayers,
    SandboxDir,
    Shutdown,
    UnmountPlan9,
    UnmountPlan9Batch,
    UnmountScsi,
    UnmountVpmem,
)
from uvmshim.protocol.requests import AddNetNS, AddNic, RemoveNetNS, RemoveNic
from uvmshim.protocol.verity import Verity
from uvmshim.uvm.backend import LayerRef
from uvmshim.uvm.hostnet import Endpoint

from .agent_client import AgentClient, ExecResult
from .agent_connection import DEFAULT_REQUEST_TIMEOUT

#: How long the guest may take to sync and answer a shutdown request.
SHUTDOWN_REQUEST_TIMEOUT = 10.0
#: How long a share's unmount may take (milliseconds normally): a teardown must not hang.
UNMOUNT_REQUEST_TIMEOUT = 20.0
#: Time added to a batch request's timeout per share (a link takes well under a millisecond).
BATCH_TIME_PER_SHARE = 0.02


class AgentGuestBackend:
    """:class:`uvmshim.uvm.backend.GuestBackend` over an :class:`AgentClient`."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    async def mount_scsi(self, controller: int, lun: int, guest_path: str, *, read_only: bool,
                         options: Sequence[str], verity: Verity | None = None) -> None:
        """Mount the disk at (controller, LUN) on ``guest_path`` (attach only if empty)."""
        await self.client.request(MountScsi(controller=controller, lun=lun,
                                            guest_path=guest_path, read_only=read_only,
                                            options=tuple(options),
                                            verity=verity.to_json() if verity else None))

    async def unmount_scsi(self, controller: int, lun: int, guest_path: str) -> None:
        """Unmount ``guest_path`` (if non-empty) and let go of the disk."""
        await self.client.request(UnmountScsi(controller=controller, lun=lun,
                                              guest_path=guest_path))

    async def mount_plan9(self, name: str, guest_path: str, *, read_only: bool) -> None:
        """Mount share ``name`` on ``guest_path``."""
        await self.client.request(MountPlan9(name=name, guest_path=guest_path,
                                             read_only=read_only))

    async def unmount_plan9(self, name: str, guest_path: str) -> None:
        """Unmount share ``name`` from ``guest_path``."""
        await self.client.request(UnmountPlan9(name=name, guest_path=guest_path),
                                  timeout=UNMOUNT_REQUEST_TIMEOUT)

    async def mount_plan9_batch(self, shares: Sequence[tuple[str, str, bool]]) -> None:
        """Make every share appear at its guest path: one request, all or none (read-only
        shares are read-only on the host already)."""
        await self.client.request(
            MountPlan9Batch(names=tuple(s[0] for s in shares),
                            guest_paths=tuple(s[1] for s in shares)),
            timeout=DEFAULT_REQUEST_TIMEOUT + BATCH_TIME_PER_SHARE * len(shares))

    async def unmount_plan9_batch(self, shares: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Take every share away, in order: one request; why, per name, for those that
        stay."""
        result = await self.client.request(
            UnmountPlan9Batch(names=tuple(n for n, _ in shares),
                              guest_paths=tuple(p for _, p in shares)),
            timeout=UNMOUNT_REQUEST_TIMEOUT + BATCH_TIME_PER_SHARE * len(shares))
        failed = result.get("failed") if isinstance(result, dict) else None
        if not isinstance(failed, dict):
            raise BackendError(f"guest unmount_plan9_batch: unexpected answer {result!r}")
        return {str(k): str(v) for k, v in failed.items()}

    async def mount_vpmem(self, device: int, guest_path: str, *,
                          verity: Verity | None = None) -> None:
        """Mount ``/dev/pmem<device>`` read-only on ``guest_path``."""
        await self.client.request(MountVpmem(device=device, guest_path=guest_path,
                                             verity=verity.to_json() if verity else None))

    async def unmount_vpmem(self, device: int, guest_path: str) -> None:
        """Unmount vPMEM device ``device``."""
        await self.client.request(UnmountVpmem(device=device, guest_path=guest_path))

    async def add_vpci(self, vmbus_guid: str) -> None:
        """Wait for an assigned PCI device (this guest refuses: no VFIO support)."""
        await self.client.request(AddVpci(vmbus_guid=vmbus_guid))

    async def add_netns(self, ns_id: str, *, bind_ready: bool = False) -> None:
        """Create the guest network namespace ``ns_id`` (with ``bind_ready``, bind the ready
        NIC's driver meanwhile)."""
        await self.client.request(AddNetNS(ns_id=ns_id, bind_ready=bind_ready))

    async def remove_netns(self, ns_id: str) -> None:
        """Remove the guest network namespace ``ns_id``."""
        await self.client.request(RemoveNetNS(ns_id=ns_id))

    async def add_nic(self, ns_id: str, nic_id: str, endpoint: Endpoint, *,
                      ready: bool = False) -> None:
        """Configure the hot-added NIC with ``endpoint``'s MAC (or, with ``ready``, the ready
        NIC) in ``ns_id``."""
        await self.client.request(AddNic(
            ns_id=ns_id, nic_id=nic_id, mac=endpoint.mac, ifname=endpoint.ifname,
            mtu=endpoint.mtu, addresses=endpoint.addresses, routes=endpoint.routes,
            ready=ready))

    async def remove_nic(self, ns_id: str, nic_id: str) -> None:
        """Take NIC ``nic_id`` down in ``ns_id``."""
        await self.client.request(RemoveNic(ns_id=ns_id, nic_id=nic_id))

    async def combine_layers(self, container_id: str, rootfs: str, layers: Sequence[LayerRef],
                             scratch_dir: str) -> None:
        """Overlay ``layers`` (top-most first) on ``rootfs`` with upper/work in ``scratch_dir``."""
        await self.client.request(CombineLayers(
            container_id=container_id, rootfs=rootfs,
            layers=tuple(layer.path for layer in layers), scratch_dir=scratch_dir))

    async def remove_combined_layers(self, rootfs: str) -> None:
        """Unmount the overlay on ``rootfs``."""
        await self.client.request(RemoveCombinedLayers(rootfs=rootfs))

    async def install_drivers(self, rw_path: str, disk_path: str) -> None:
        """Run ``/bin/install-drivers <rw_path> <disk_path>`` in the UVM (no host timeout)."""
        await self.client.request(InstallDrivers(rw_path=rw_path, disk_path=disk_path),
                                  timeout=None)

    async def sandbox_dir(self, sandbox_id: str, path: str) -> str:
        """Create and return the guest directory of ``sandbox://<path>``."""
        return str(await self.client.request(SandboxDir(sandbox_id=sandbox_id, path=path)))

    async def hugepages_dir(self, sandbox_id: str, path: str) -> str:
        """Create the hugetlbfs-backed guest directory of ``hugepages://<path>``."""
        return str(await self.client.request(HugepagesDir(sandbox_id=sandbox_id, path=path)))

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, stdin: bytes = b"",
                   timeout: float | None = None) -> ExecResult:
        """Run a diagnostic command in the UVM and collect its output."""
        return await self.client.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)

    async def shutdown(self) -> None:
        """Ask the guest to sync and power off (QEMU then exits, with ``-no-reboot``)."""
        await self.client.request(Shutdown(), timeout=SHUTDOWN_REQUEST_TIMEOUT)
