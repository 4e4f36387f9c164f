"""Image layers and scratch combined into a container root (hcsshim's ``internal/layers``).

``layer_folders`` is top-most read-only layer first and the scratch folder last. Each layer's
``layer.vhd`` is attached read-only (vPMEM first if the UVM has it, falling back to SCSI), the
scratch's ``sandbox.vhdx`` is attached read-write at the container root, and the guest is asked
to combine them into an overlay at ``<root>/rootfs`` with upper/work under
``<scratch mount>/scratch/<id>``.

A layer folder that also holds a ``verity.json`` (every layer ``uvmshim image import`` makes,
unless ``--no-verity``) is mounted by the guest through dm-verity with that root hash: a layer
disk changed on the host since then cannot be read in the guest.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from uvmshim import guestpath
from uvmshim.errors import (
    GuestError,
    LayerIntegrityError,
    NoAvailableLocation,
    ReleaseError,
    UvmError,
    UvmshimError,
    VPMemTooLarge,
    error_context,
    os_error_text,
)
from uvmshim.protocol.messages import ErrorKind, ProtocolError
from uvmshim.protocol.verity import VERITY_FILE, Verity
from uvmshim.resources import Resource
from uvmshim.uvm.scsi import ScsiMount, VMAccess
from uvmshim.uvm.utilityvm import UtilityVM

log = logging.getLogger(__name__)

LAYER_FILE = "layer.vhd"
SCRATCH_FILE = "sandbox.vhdx"


class LayersHandle:
    """Undoes :func:`mount_lcow_layers`: overlay, then scratch, then each layer (top-most first).

    Every step runs even if an earlier one failed; all failures are reported together, and a
    step that succeeded is not run again by a later call.
    """

    kind = "layers"

    def __init__(self, vm: UtilityVM, rootfs: str, scratch_dir: str, scratch: ScsiMount,
                 layers: list[tuple[str, Resource]]) -> None:
        self._vm = vm
        self.rootfs = rootfs
        self.scratch_dir = scratch_dir
        self._scratch = scratch
        self._layers = layers
        self._combined = True

    async def release(self) -> None:
        errors: list[BaseException] = []
        if self._combined:
            try:
                await self._vm.remove_combined_layers(self.rootfs)
                self._combined = False
            except Exception as err:
                errors.append(err)
        try:
            await self._scratch.release()
        except Exception as err:
            errors.append(err)
        for _, layer in self._layers:
            try:
                await layer.release()
            except Exception as err:
                errors.append(err)
        if errors:
            raise ReleaseError("failed to release container layers", errors)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "layers",
            "host_path": self._scratch.requested_host_path,
            "guest_path": self.rootfs,
            "read_only": False,
            "scratch_dir": self.scratch_dir,
            "layers": [p for p, _ in self._layers],
        }

    def parts(self) -> list[Resource]:
        """The layer and scratch handles (for inventories), top-most layer first."""
        return [r for _, r in self._layers] + [self._scratch]

    def verified_layers(self) -> dict[str, str]:
        """``{guest path: host layer disk}`` of the layers mounted through dm-verity."""
        return {p: _host_path(r) for p, r in self._layers if getattr(r, "verity", None)}


def _host_path(r: Resource) -> str:
    return str(getattr(r, "requested_host_path", None) or r.describe().get("host_path", ""))


def layer_verity(folder: str) -> Verity | None:
    """The dm-verity parameters in ``folder/verity.json``, or None if there is no such file.

    :raises UvmError: the file is unreadable or malformed.
    """
    path = os.path.join(folder, VERITY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read(1 << 16)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UvmError(os_error_text("open", err, path)) from err
    try:
        return Verity.from_json(json.loads(raw)).check()
    except (ValueError, ProtocolError) as err:
        raise UvmError(f"malformed dm-verity parameters: {err}", where=path,
                       hint="import the image again (or remove the file to mount the layer "
                            "unverified)") from None


async def add_lcow_layer(vm: UtilityVM, vhd_path: str) -> tuple[str, Resource]:
    """Attach one read-only layer; return its guest path and handle.

    :raises LayerIntegrityError: the guest found the layer's dm-verity data corrupt.
    """
    verity = layer_verity(os.path.dirname(vhd_path))
    try:
        return await _add_lcow_layer(vm, vhd_path, verity)
    except GuestError as err:
        if err.kind is not ErrorKind.CORRUPT:
            raise
        raise LayerIntegrityError(
            f"layer {vhd_path} failed dm-verity verification in the guest: {err.reason}",
            hint="the layer disk was changed after import: remove the image and import or "
                 "pull it again") from None


async def _add_lcow_layer(vm: UtilityVM, vhd_path: str,
                          verity: Verity | None) -> tuple[str, Resource]:
    if not vm.devices_physically_backed and vm.vpmem.count > 0:
        try:
            mount = await vm.add_vpmem(vhd_path, verity=verity)
            return mount.guest_path, mount
        except (NoAvailableLocation, VPMemTooLarge):
            pass  # fall back to SCSI, exactly on these two
        except UvmshimError as err:
            err.wrap("failed to add VPMEM layer")
            raise
    uvm_path = guestpath.global_mount_path(vm.mount_counter())
    with error_context("failed to add SCSI layer"):
        sm = await vm.add_scsi(vhd_path, uvm_path, read_only=True, options=("ro",),
                               access=VMAccess.NOOP, verity=verity)
    return sm.guest_path, sm


async def mount_lcow_layers(
    vm: UtilityVM, container_id: str, layer_folders: tuple[str, ...], guest_root: str
) -> tuple[str, str, LayersHandle]:
    """Mount the layers and scratch; return ``(rootfs, scratch_dir, handle)``.

    On failure everything this call attached is released before the error is raised.
    """
    if not layer_folders:
        raise UvmError("at least one layer folder (the scratch folder) is required",
                       where="windows.layerFolders")
    added: list[tuple[str, Resource]] = []
    scratch: ScsiMount | None = None
    try:
        for folder in layer_folders[:-1]:
            try:
                added.append(await add_lcow_layer(vm, os.path.join(folder, LAYER_FILE)))
            except UvmshimError as err:
                err.wrap("failed to add LCOW layer")
                if err.hint is None:
                    err.hint = f"each layer folder must hold a {LAYER_FILE}"
                raise
        scratch_file = os.path.join(layer_folders[-1], SCRATCH_FILE)
        try:
            scratch_host = os.path.realpath(scratch_file, strict=True)
        except OSError as err:
            raise UvmError(
                "failed to eval symlinks on scratch path: failed to resolve path: "
                + os_error_text("open", err, scratch_file),
                hint=f"the last layer folder is the scratch folder; it must hold {SCRATCH_FILE}",
            ) from err
        with error_context("failed to add SCSI scratch VHD"):
            scratch = await vm.add_scsi(scratch_host, guest_root, read_only=False,
                                        access=VMAccess.INDIVIDUAL)
        scratch_dir = guestpath.scratch_dir(scratch.guest_path, container_id)
        rootfs = guestpath.rootfs_path(guest_root)
        await vm.combine_layers(container_id, [p for p, _ in added], scratch_dir, rootfs)
    except BaseException:
        # Scratch first, then the layers in the order they were added (hcsshim's order).
        for _, r in ([("", scratch)] if scratch is not None else []) + added:
            try:
                await r.release()
            except Exception as cleanup_err:
                log.warning("failed to remove lcow layer on cleanup: %s", cleanup_err)
        raise
    return rootfs, scratch_dir, LayersHandle(vm, rootfs, scratch_dir, scratch, added)
