"""SCSI disks: slots, refcounted attachments and their guest mounts (hcsshim's ``uvm/scsi.go``).

A UVM has 1–4 controllers × 64 LUNs. A disk takes the first free slot, in controller order and
then LUN order. Attachments are refcounted by the *resolved* host path (symlinks followed), so
the same disk reached through two names is attached once. Reuse returns the first attacher's
guest path, as hcsshim does, but (unlike the seed-era code) reuse with a different read-only
setting, attachment type or mount options is an error, and a failed detach keeps the disk in
its slot, tracked and retryable, instead of leaving a refcount to underflow.

The order of host and guest steps is hcsshim's ``modify``: on add, attach on the host, then
mount in the guest (and detach again if the mount fails); on remove, guest first, then host.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uvmshim.errors import (
    ConflictingAttachment,
    NoAvailableLocation,
    NotAttached,
    UvmError,
    UvmshimError,
    os_error_text,
)
from uvmshim.protocol.verity import Verity
from uvmshim.uvm.backend import GuestBackend, HostBackend, host_then_guest
from uvmshim.uvm.options import LUNS_PER_CONTROLLER

log = logging.getLogger(__name__)


class VMAccess(enum.Enum):
    """hcsshim's ``VMAccessType``: which access check runs before attaching."""

    NOOP = 0  # layers: access was granted when the layer was made
    GROUP = 1
    INDIVIDUAL = 2


class _State(enum.Enum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACH_FAILED = "detach-failed"


@dataclass(eq=False)
class _Attachment:
    controller: int
    lun: int
    host_path: str  # resolved
    read_only: bool
    passthrough: bool
    options: tuple[str, ...]
    guest_path: str
    verity: Verity | None = None
    refcount: int = 1
    state: _State = _State.ATTACHING
    guest_mounted: bool = False
    guest_released: bool = False
    done: asyncio.Future[None] | None = field(default=None, repr=False)


class ScsiMount:
    """A handle on one reference to an attached disk (hcsshim's ``*SCSIMount``)."""

    kind = "scsi"

    def __init__(self, manager: ScsiManager, attachment: _Attachment, requested_path: str) -> None:
        self._manager = manager
        self._attachment = attachment
        self.requested_host_path = requested_path
        self._released = False

    @property
    def host_path(self) -> str:
        return self._attachment.host_path

    @property
    def guest_path(self) -> str:
        """Where the disk is mounted in the guest: the *first* attacher's path ("" if none)."""
        return self._attachment.guest_path

    @property
    def controller(self) -> int:
        return self._attachment.controller

    @property
    def lun(self) -> int:
        return self._attachment.lun

    @property
    def read_only(self) -> bool:
        return self._attachment.read_only

    @property
    def verity(self) -> Verity | None:
        """The dm-verity parameters the guest mounted the disk with, if any."""
        return self._attachment.verity

    @property
    def released(self) -> bool:
        return self._released

    async def release(self) -> None:
        """Drop this reference; the last one unmounts in the guest and detaches.

        :raises UvmError: the detach failed. The disk stays in its slot; call again to retry.
        """
        if self._released:
            return
        await self._manager.remove(self._attachment)
        self._released = True

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "scsi",
            "controller": self.controller,
            "lun": self.lun,
            "host_path": self.host_path,
            "guest_path": self.guest_path,
            "read_only": self.read_only,
            "type": "PassThru" if self._attachment.passthrough else "VirtualDisk",
            "options": list(self._attachment.options),
        }


class ScsiManager:
    """Hands out (controller, LUN) slots and keeps one refcounted attachment per disk."""

    def __init__(self, host: HostBackend, guest: GuestBackend, vm_id: str,
                 controllers: int) -> None:
        self._host = host
        self._guest = guest
        self._vm_id = vm_id
        self.controllers = controllers
        self._slots: list[list[_Attachment | None]] = [
            [None] * LUNS_PER_CONTROLLER for _ in range(controllers)
        ]

    def attachments(self) -> list[dict[str, Any]]:
        """What is in the slots now, in slot order (for inventories and leak checks)."""
        return [
            {"controller": a.controller, "lun": a.lun, "host_path": a.host_path,
             "guest_path": a.guest_path, "read_only": a.read_only, "refcount": a.refcount,
             "state": a.state.value}
            for row in self._slots for a in row if a is not None
        ]

    def _find(self, host_path: str) -> _Attachment | None:
        for row in self._slots:
            for a in row:
                if a is not None and a.host_path == host_path:
                    return a
        return None

    def _free_slot(self) -> tuple[int, int]:
        for c, row in enumerate(self._slots):
            for lun, a in enumerate(row):
                if a is None:
                    return c, lun
        raise NoAvailableLocation(
            hint=f"the UVM has {self.controllers * LUNS_PER_CONTROLLER} SCSI slots "
                 f"({self.controllers} controllers × {LUNS_PER_CONTROLLER} LUNs); use fewer disks"
        )

    def _check_access(self, path: str, read_only: bool, access: VMAccess) -> None:
        # hcsshim grants the VM's account access to the file; on Linux the equivalent is a
        # check that the hypervisor process can open it the way it will be opened.
        if access is VMAccess.NOOP:
            return
        mode = os.R_OK if read_only else os.R_OK | os.W_OK
        if not os.access(path, mode):
            what = "read" if read_only else "read and write"
            raise UvmError(
                f"failed to grant VM access for SCSI mount: the VM cannot {what} {path}",
                hint="check the file's permissions",
            )

    async def add(
        self,
        host_path: str,
        guest_path: str,
        *,
        read_only: bool,
        options: Sequence[str] = (),
        passthrough: bool = False,
        access: VMAccess = VMAccess.INDIVIDUAL,
        verity: Verity | None = None,
    ) -> ScsiMount:
        """Attach ``host_path`` (or take another reference to it) and mount it at ``guest_path``.

        An empty ``guest_path`` attaches without mounting. If the disk is already attached,
        its existing guest path is returned. With ``verity`` (read-only disks only) the guest
        mounts the disk through dm-verity.

        :raises UvmError: the file is missing or unreadable, every slot is taken
            (:class:`NoAvailableLocation`), the disk is attached with other settings
            (:class:`ConflictingAttachment`), or the host or guest step failed.
        """
        try:
            resolved = os.path.realpath(host_path, strict=True)
        except OSError as err:
            raise UvmError(os_error_text("stat", err, host_path),
                           hint="the disk or layer file must exist on the host") from err
        self._check_access(resolved, read_only, access)
        if verity is not None and not read_only:
            raise UvmError(f"{host_path}: dm-verity needs a read-only disk")
        opts = tuple(options)
        existing = self._find(resolved)
        if existing is not None:
            return await self._reuse(existing, host_path, guest_path, read_only, opts, passthrough,
                                     verity)
        controller, lun = self._free_slot()
        attachment = _Attachment(
            controller=controller, lun=lun, host_path=resolved, read_only=read_only,
            passthrough=passthrough, options=opts, guest_path=guest_path, verity=verity,
            done=asyncio.get_running_loop().create_future(),
        )
        self._slots[controller][lun] = attachment
        try:
            await self._attach_and_mount(attachment)
        except UvmshimError as err:
            self._slots[controller][lun] = None
            self._settle(attachment, err)
            err.wrap("failed to modify UVM with new SCSI mount")
            raise
        except BaseException as err:
            self._slots[controller][lun] = None
            self._settle(attachment, err)
            raise
        attachment.state = _State.ATTACHED
        self._settle(attachment, None)
        return ScsiMount(self, attachment, host_path)

    @staticmethod
    def _settle(attachment: _Attachment, err: BaseException | None) -> None:
        done = attachment.done
        if done is None or done.done():
            return
        if err is None:
            done.set_result(None)
        else:
            done.set_exception(err)
            # Waiters may not exist; don't let asyncio report an unretrieved exception.
            done.exception()

    async def _attach_and_mount(self, a: _Attachment) -> None:
        host, guest = self._host, self._guest
        await host_then_guest(
            lambda: host.scsi_attach(a.controller, a.lun, a.host_path, read_only=a.read_only,
                                     passthrough=a.passthrough),
            (lambda: guest.mount_scsi(a.controller, a.lun, a.guest_path,
                                      read_only=a.read_only, options=a.options,
                                      verity=a.verity))
            if a.guest_path else None,
            lambda: host.scsi_detach(a.controller, a.lun),
        )
        a.guest_mounted = bool(a.guest_path)

    async def _reuse(
        self, a: _Attachment, requested: str, guest_path: str, read_only: bool,
        options: tuple[str, ...], passthrough: bool, verity: Verity | None = None,
    ) -> ScsiMount:
        where = f"controller {a.controller}, LUN {a.lun}"
        if a.state is _State.DETACH_FAILED:
            raise UvmError(
                f"{a.host_path} is still attached at {where} after a failed detach",
                hint="release the earlier container's resources again before reusing the disk",
            )
        if read_only != a.read_only or passthrough != a.passthrough:
            def mode(ro: bool, pt: bool) -> str:
                return ("read-only" if ro else "read-write") + (" pass-through" if pt else "")
            raise ConflictingAttachment(
                f"{a.host_path} is already attached {mode(a.read_only, a.passthrough)} at "
                f"{where}; it cannot also be attached {mode(read_only, passthrough)}",
                hint="use the same read-only setting for every mount of one disk",
            )
        if guest_path and a.guest_path and sorted(set(options)) != sorted(set(a.options)):
            raise ConflictingAttachment(
                f"{a.host_path} is already mounted at {a.guest_path} with options "
                f"{list(a.options)}; it cannot also be mounted with {list(options)}",
                hint="use the same mount options for every mount of one disk",
            )
        if guest_path and a.guest_path and verity != a.verity:
            raise ConflictingAttachment(
                f"{a.host_path} is already mounted at {a.guest_path} with other dm-verity "
                "settings",
                hint="the layer folder's verity.json changed while the layer was in use",
            )
        a.refcount += 1
        try:
            if a.state is _State.ATTACHING and a.done is not None:
                await asyncio.shield(a.done)
            if guest_path and not a.guest_path:
                # Attached without a mount so far: this caller is the first to need one.
                a.guest_path, a.options, a.verity = guest_path, options, verity
                await self._guest.mount_scsi(a.controller, a.lun, guest_path,
                                                read_only=a.read_only, options=options,
                                                verity=verity)
                a.guest_mounted = True
        except BaseException:
            a.refcount -= 1
            if not a.guest_mounted and guest_path and a.guest_path == guest_path:
                a.guest_path = ""
            raise
        return ScsiMount(self, a, requested)

    async def remove(self, a: _Attachment) -> None:
        """Drop one reference to ``a``; at zero, unmount in the guest and detach on the host."""
        if self._slots[a.controller][a.lun] is not a:
            raise NotAttached()
        if a.state is not _State.DETACH_FAILED:
            a.refcount -= 1
            if a.refcount > 0:
                return
        try:
            # hcsshim always sends the guest eject, even for attach-only disks, so the guest
            # lets go of the device before the LUN can be reused. A retry after a failed
            # detach skips it if it already succeeded.
            if not a.guest_released:
                await self._guest.unmount_scsi(a.controller, a.lun, a.guest_path)
                a.guest_mounted = False
                a.guest_released = True
            await self._host.scsi_detach(a.controller, a.lun)
        except UvmshimError as err:
            a.state = _State.DETACH_FAILED
            err.wrap(f"failed to remove SCSI device: failed to remove SCSI disk {a.host_path} "
                     f"from container {self._vm_id}")
            raise
        except BaseException:
            a.state = _State.DETACH_FAILED
            raise
        self._slots[a.controller][a.lun] = None
