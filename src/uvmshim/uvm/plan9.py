"""Plan9 shares (hcsshim's ``uvm/plan9.go``).

Each call makes a new share, named from a per-UVM counter that starts at ``"0"``; names are
never reused and there is no de-duplication (hcsshim behaves the same). A restricted share
exposes only ``allowed_names`` inside the shared directory: the single-file bind mount.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from uvmshim.errors import UvmError, UvmshimError
from uvmshim.uvm.backend import GuestBackend, HostBackend, host_then_guest

log = logging.getLogger(__name__)

#: hcsshim's Plan9 port; kept in requests and descriptions so they read like LCOW's.
PLAN9_PORT = 564
FLAG_READ_ONLY = 0x1
FLAG_LINUX_METADATA = 0x4
FLAG_RESTRICT_FILE_ACCESS = 0x80


class Plan9Share:
    """A handle on one share (hcsshim's ``*Plan9Share``)."""

    kind = "plan9"

    def __init__(self, manager: Plan9Manager, name: str, host_path: str, guest_path: str,
                 read_only: bool, allowed_names: tuple[str, ...]) -> None:
        self._manager = manager
        self.name = name
        self.host_path = host_path
        self.guest_path = guest_path
        self.read_only = read_only
        self.allowed_names = allowed_names
        self._guest_released = False
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @property
    def flags(self) -> int:
        flags = FLAG_LINUX_METADATA
        if self.read_only:
            flags |= FLAG_READ_ONLY
        if self.allowed_names:
            flags |= FLAG_RESTRICT_FILE_ACCESS
        return flags

    async def release(self) -> None:
        """Unmount in the guest, then stop sharing. A second call after success does nothing.

        :raises UvmError: a step failed; the share stays tracked and a new call retries it.
        """
        if self._released:
            return
        await self._manager.remove(self)
        self._released = True

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "plan9", "name": self.name, "host_path": self.host_path,
            "guest_path": self.guest_path, "read_only": self.read_only,
            "allowed_files": list(self.allowed_names), "flags": self.flags,
            "port": PLAN9_PORT,
        }


class Plan9Manager:
    """Names and tracks Plan9 shares."""

    def __init__(self, host: HostBackend, guest: GuestBackend, vm_id: str, *,
                 no_writable_file_shares: bool = False) -> None:
        self._host = host
        self._guest = guest
        self._vm_id = vm_id
        self._no_writable_file_shares = no_writable_file_shares
        self._counter = 0
        self._shares: dict[str, Plan9Share] = {}

    def shares(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._shares.values()]

    async def add(self, host_path: str, guest_path: str, *, read_only: bool, restrict: bool,
                  allowed_names: Sequence[str] | None) -> Plan9Share:
        """Share ``host_path`` and mount it at ``guest_path``.

        :raises UvmError: ``guest_path`` is empty, writable shares are disabled, or the
            host or guest step failed.
        """
        if not guest_path:
            raise UvmError("uvmPath must be passed to AddPlan9")
        if not read_only and self._no_writable_file_shares:
            raise UvmError("adding writable shares is denied: operation denied",
                           hint="mount it read-only (option \"ro\")")
        name = str(self._counter)
        self._counter += 1
        allowed = tuple(allowed_names or ()) if restrict else ()
        host, guest = self._host, self._guest
        await host_then_guest(
            lambda: host.plan9_add(name, host_path, read_only=read_only, allowed_files=allowed),
            lambda: guest.mount_plan9(name, guest_path, read_only=read_only),
            lambda: host.plan9_remove(name),
        )
        share = Plan9Share(self, name, host_path, guest_path, read_only, allowed)
        self._shares[name] = share
        return share

    async def remove(self, share: Plan9Share) -> None:
        try:
            if not share._guest_released:
                await self._guest.unmount_plan9(share.name, share.guest_path)
                share._guest_released = True
            await self._host.plan9_remove(share.name)
        except UvmshimError as err:
            err.wrap(f"failed to remove plan9 share: failed to remove plan9 share {share.name} "
                     f"from {self._vm_id}")
            raise
        del self._shares[share.name]
