"""Assigned devices and guest drivers (hcsshim's ``hcsoci/devices.go`` and ``internal/devices``)."""

from __future__ import annotations

import logging
import ntpath
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace

from uvmshim import guestpath
from uvmshim.errors import AllocationError, UvmshimError, error_context, os_error_text
from uvmshim.resources import Resource
from uvmshim.spec import WindowsDevice
from uvmshim.uvm.scsi import VMAccess
from uvmshim.uvm.utilityvm import UtilityVM

log = logging.getLogger(__name__)

LCOW_DEVICE_TYPES = ("vpci-instance-id", "vpci", "gpu")
ANNOTATION_GPU_VHD = "io.microsoft.lcow.gpuvhdpath"
ANNOTATION_KERNEL_DRIVERS = "io.microsoft.virtualmachine.kerneldrivers"
_DRIVER_NAMESPACE = uuid.UUID("914aadc8-f700-4365-8016-ddad0a9d406d")


def device_info_from_path(raw: str) -> tuple[str, int]:
    """Split ``<instance id>/<function>`` (either separator) into the id and the function.

    Like hcsshim, a last element that parses as a decimal uint16 is taken as the virtual
    function index, and the rest (cleaned) as the instance id; otherwise the index is 0.
    """
    base = ntpath.basename(raw.rstrip("\\/")) if raw.rstrip("\\/") else raw
    if base.isdecimal() and base.isascii():
        index = int(base)
        if index <= 0xFFFF:
            parent = ntpath.dirname(raw.rstrip("\\/"))
            return ntpath.normpath(parent) if parent else ".", index
    return raw, 0


async def release_all(resources: Sequence[Resource]) -> None:
    """Release in forward order, logging failures (hcsshim's cleanup on a failed add)."""
    for r in resources:
        try:
            await r.release()
        except Exception as err:
            log.warning("failed to release device on cleanup: %s", err)


async def install_drivers(vm: UtilityVM, share: str, *, gpu: bool) -> Resource:
    """Attach a driver disk read-only and run ``install-drivers`` on it in the UVM."""
    uvm_path = guestpath.global_mount_path(vm.mount_counter())
    with error_context(f"failed to add SCSI disk to utility VM for path {share}"):
        mount = await vm.add_scsi(share, uvm_path, read_only=True, access=VMAccess.INDIVIDUAL)
    if gpu:
        rw_path = guestpath.LCOW_NVIDIA_MOUNT_PATH
    else:
        guid = uuid.uuid5(_DRIVER_NAMESPACE, share)
        rw_path = guestpath.LCOW_GLOBAL_DRIVER_PREFIX_FMT % guid
    try:
        await vm.guest.install_drivers(rw_path, mount.guest_path)
    except BaseException as err:
        await release_all([mount])
        if isinstance(err, UvmshimError):
            err.wrap(f"failed to install driver {rw_path} in uvm")
        raise
    return mount


async def add_spec_guest_drivers(vm: UtilityVM, annotations: Mapping[str, str]) -> list[Resource]:
    """Install the drivers named by the ``kerneldrivers`` annotation (comma separated)."""
    value = annotations.get(ANNOTATION_KERNEL_DRIVERS)
    if not value:
        return []
    closers: list[Resource] = []
    try:
        for d in value.split(","):
            try:
                os.stat(d)
            except OSError as err:
                raise AllocationError(
                    f"failed to find path to drivers at {d}: {os_error_text('stat', err)}",
                    where=f"annotations[{ANNOTATION_KERNEL_DRIVERS!r}]",
                ) from err
            closers.append(await install_drivers(vm, d, gpu=False))
    except BaseException:
        await release_all(closers)
        raise
    return closers


async def handle_assigned_devices(
    vm: UtilityVM, annotations: Mapping[str, str], devices: Sequence[WindowsDevice]
) -> tuple[tuple[WindowsDevice, ...], list[Resource]]:
    """Assign each device; return the devices with ``id`` replaced by the VMBus GUID."""
    result: list[WindowsDevice] = []
    closers: list[Resource] = []
    gpu = False
    try:
        for i, d in enumerate(devices):
            if d.id_type not in LCOW_DEVICE_TYPES:
                raise AllocationError(
                    f"specified device {d.id} has unsupported type {d.id_type}",
                    where=f"windows.devices[{i}].idType",
                    hint="Linux containers take devices of type " + ", ".join(LCOW_DEVICE_TYPES),
                )
            gpu = gpu or d.id_type == "gpu"
            pci_id, index = device_info_from_path(d.id)
            with error_context(f"failed to assign device {pci_id}, function {index} to pod "
                               f"{vm.id}", where=f"windows.devices[{i}]"):
                vpci = await vm.assign_device(pci_id, index)
            closers.append(vpci)
            result.append(replace(d, id=vpci.vmbus_guid))
        if gpu:
            gpu_vhd = annotations.get(ANNOTATION_GPU_VHD, "")
            context = f"failed to add gpu vhd to {vm.id}"
            if not gpu_vhd:
                raise AllocationError(f"{context}: no gpu vhd specified",
                                      where=f"annotations[{ANNOTATION_GPU_VHD!r}]")
            try:
                os.stat(gpu_vhd)
            except OSError as err:
                raise AllocationError(
                    f"{context}: failed to find gpu support vhd {gpu_vhd}: "
                    f"{os_error_text('stat', err)}",
                    where=f"annotations[{ANNOTATION_GPU_VHD!r}]",
                ) from err
            closers.append(await install_drivers(vm, gpu_vhd, gpu=True))
    except BaseException:
        await release_all(closers)
        raise
    return tuple(result), closers
