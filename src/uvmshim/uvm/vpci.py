"""Assigned PCI devices (hcsshim's ``uvm/virtual_device.go``), keyed by (instance id, function).

Unlike the seed-era code, a device stays tracked until its removal succeeded, and a VMBus GUID
is only made for a device that is really new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvmshim.errors import UvmError, UvmshimError
from uvmshim.uvm.backend import GuestBackend, HostBackend, host_then_guest


@dataclass(eq=False)
class _Assigned:
    instance_id: str
    function: int
    vmbus_guid: str
    refcount: int = 1


class VPCIDevice:
    """A handle on one reference to an assigned device."""

    kind = "vpci"

    def __init__(self, manager: VPCIManager, device: _Assigned) -> None:
        self._manager = manager
        self._device = device
        self._released = False

    @property
    def vmbus_guid(self) -> str:
        return self._device.vmbus_guid

    async def release(self) -> None:
        if self._released:
            return
        try:
            await self._manager.remove(self._device)
        except UvmshimError as err:
            err.wrap("failed to remove VPCI device")
            raise
        self._released = True

    def describe(self) -> dict[str, Any]:
        d = self._device
        return {"kind": "vpci", "instance_id": d.instance_id, "function": d.function,
                "vmbus_guid": d.vmbus_guid, "host_path": d.instance_id,
                "guest_path": d.vmbus_guid, "read_only": False}


class VPCIManager:
    def __init__(self, host: HostBackend, guest: GuestBackend, vm_id: str, *,
                 new_guid: Callable[[], str]) -> None:
        self._host = host
        self._guest = guest
        self._vm_id = vm_id
        self._new_guid = new_guid
        self._devices: dict[tuple[str, int], _Assigned] = {}

    def devices(self) -> list[dict[str, Any]]:
        return [{"instance_id": d.instance_id, "function": d.function,
                 "vmbus_guid": d.vmbus_guid, "refcount": d.refcount}
                for d in self._devices.values()]

    async def assign(self, instance_id: str, function: int, vmbus_guid: str = "") -> VPCIDevice:
        key = (instance_id, function)
        existing = self._devices.get(key)
        if existing is not None:
            existing.refcount += 1
            return VPCIDevice(self, existing)
        device = _Assigned(instance_id, function, vmbus_guid or self._new_guid())
        self._devices[key] = device
        host, guid = self._host, device.vmbus_guid
        try:
            await host_then_guest(
                lambda: host.vpci_add(guid, instance_id, function),
                lambda: self._guest.add_vpci(guid),
                lambda: host.vpci_remove(guid),
            )
        except BaseException:
            del self._devices[key]
            raise
        return VPCIDevice(self, device)

    async def remove(self, d: _Assigned) -> None:
        key = (d.instance_id, d.function)
        if self._devices.get(key) is not d:
            raise UvmError(f"no device with ID {d.instance_id} and index {d.function} is "
                           f"present on the uvm {self._vm_id}")
        if d.refcount > 1:
            d.refcount -= 1
            return
        await self._host.vpci_remove(d.vmbus_guid)
        del self._devices[key]
