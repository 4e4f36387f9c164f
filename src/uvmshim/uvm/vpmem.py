"""vPMEM layers, in hcsshim's default one-image-per-device mode (``uvm/vpmem.go``).

Off unless the UVM was given devices. A layer goes to the first free device below the count,
unless it is larger than the maximum size (:class:`VPMemTooLarge`) or no device is free
(:class:`NoAvailableLocation`); the layer code falls back to SCSI on exactly those two errors.
Devices are refcounted by the resolved host path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from uvmshim import guestpath
from uvmshim.errors import (
    ConflictingAttachment,
    NoAvailableLocation,
    UvmError,
    UvmshimError,
    VPMemTooLarge,
    os_error_text,
)
from uvmshim.protocol.verity import Verity
from uvmshim.uvm.backend import GuestBackend, HostBackend, host_then_guest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Device:
    number: int
    host_path: str
    guest_path: str
    size: int
    verity: Verity | None = None
    refcount: int = 1
    guest_released: bool = False


class VPMemMount:
    """A handle on one reference to a vPMEM layer (hcsshim's ``*VPMEMMount``)."""

    kind = "vpmem"

    def __init__(self, manager: VPMemManager, device: _Device) -> None:
        self._manager = manager
        self._device = device
        self._released = False

    @property
    def guest_path(self) -> str:
        return self._device.guest_path

    @property
    def device_number(self) -> int:
        return self._device.number

    @property
    def verity(self) -> Verity | None:
        """The dm-verity parameters the guest mounted the layer with, if any."""
        return self._device.verity

    async def release(self) -> None:
        if self._released:
            return
        await self._manager.remove(self._device)
        self._released = True

    def describe(self) -> dict[str, Any]:
        d = self._device
        return {"kind": "vpmem", "device": d.number, "host_path": d.host_path,
                "guest_path": d.guest_path, "read_only": True, "size": d.size}


class VPMemManager:
    def __init__(self, host: HostBackend, guest: GuestBackend, vm_id: str, count: int,
                 max_size: int) -> None:
        self._host = host
        self._guest = guest
        self._vm_id = vm_id
        self.count = count
        self.max_size = max_size
        self._devices: list[_Device | None] = [None] * count

    def devices(self) -> list[dict[str, Any]]:
        return [{"device": d.number, "host_path": d.host_path, "guest_path": d.guest_path,
                 "refcount": d.refcount} for d in self._devices if d is not None]

    async def add(self, host_path: str, *, verity: Verity | None = None) -> VPMemMount:
        """Expose a layer file as a vPMEM device and mount it at ``/run/layers/p<n>`` (through
        dm-verity, with ``verity``).

        :raises VPMemTooLarge: the file is larger than the maximum size.
        :raises NoAvailableLocation: every device is in use.
        :raises UvmError: the file is missing, or the host or guest step failed.
        """
        try:
            resolved = os.path.realpath(host_path, strict=True)
            size = os.stat(resolved).st_size
        except OSError as err:
            raise UvmError(os_error_text("stat", err, host_path)) from err
        for d in self._devices:
            if d is not None and d.host_path == resolved:
                if d.verity != verity:
                    raise ConflictingAttachment(
                        f"{resolved} is already mounted at {d.guest_path} with other dm-verity "
                        "settings",
                        hint="the layer folder's verity.json changed while the layer was in use")
                d.refcount += 1
                return VPMemMount(self, d)
        if size > self.max_size:
            raise VPMemTooLarge()
        number = next((i for i, d in enumerate(self._devices) if d is None), None)
        if number is None:
            raise NoAvailableLocation()
        device = _Device(number, resolved, guestpath.vpmem_layer_path(number), size, verity)
        self._devices[number] = device  # reserve the slot across the awaits below
        host, guest = self._host, self._guest
        try:
            await host_then_guest(
                lambda: host.vpmem_add(number, resolved),
                lambda: guest.mount_vpmem(number, device.guest_path, verity=verity),
                lambda: host.vpmem_remove(number),
            )
        except UvmshimError as err:
            self._devices[number] = None
            err.wrap("uvm::addVPMemDefault: failed to modify utility VM configuration")
            raise
        except BaseException:
            self._devices[number] = None
            raise
        return VPMemMount(self, device)

    async def remove(self, d: _Device) -> None:
        if self._devices[d.number] is not d:
            raise UvmError("not attached")
        if d.refcount > 1:
            d.refcount -= 1
            return
        try:
            if not d.guest_released:
                await self._guest.unmount_vpmem(d.number, d.guest_path)
                d.guest_released = True
            await self._host.vpmem_remove(d.number)
        except UvmshimError as err:
            err.wrap(f"failed to remove VPMEM {d.host_path} from utility VM {self._vm_id}")
            raise
        d.refcount = 0
        self._devices[d.number] = None
