"""Plan9 shares (hcsshim's ``uvm/plan9.go``).

Each call makes a new share, named from a per-UVM counter that starts at ``"0"``; names are
never reused and there is no de-duplication (hcsshim behaves the same). A restricted share
exposes only ``allowed_names`` inside the shared directory: the single-file bind mount.

Batches: :meth:`Plan9Manager.add_batch` makes N shares with one host round and one guest
request (all or none), with the same names, guest paths and handles as N calls of
:meth:`Plan9Manager.add` would give. Releasing such shares newest first, together
(:func:`uvmshim.resources.release_newest_first` hands a run of them to their
:class:`Plan9Batch`), is again one guest request and one host round. hcsshim makes one share
per mount (a guest mount each); this is Kata's model instead: the guest mounts the export once
and each batched share's guest path is a link into it (measured in ``bench/bench_binds.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from uvmshim.errors import BatchError, UvmError, UvmshimError
from uvmshim.uvm.backend import GuestBackend, HostBackend, Plan9Add, host_then_guest

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
        #: The batch this share was made in (released together with its neighbours).
        self.batch: Plan9Batch | None = None
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


@dataclass(frozen=True)
class Plan9Request:
    """One share of :meth:`Plan9Manager.add_batch` (the arguments of ``add``)."""

    host_path: str
    guest_path: str
    read_only: bool
    restrict: bool = False
    allowed_names: tuple[str, ...] = ()


class Plan9Batch:
    """The shares made by one :meth:`Plan9Manager.add_batch`."""

    def __init__(self, manager: Plan9Manager) -> None:
        self._manager = manager

    async def release_members(
        self, shares: Sequence[Plan9Share]
    ) -> list[tuple[Plan9Share, UvmshimError]]:
        """Release ``shares`` (some of this batch, newest first) in one guest request and one
        host round; return the ones that failed with why (they stay tracked)."""
        return await self._manager.remove_batch(shares)


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

    async def add_batch(self, requests: Sequence[Plan9Request]) -> list[Plan9Share]:
        """:meth:`add` for each of ``requests``, in one host round and one guest request, all
        or none. Names come from the counter in order, as from successive :meth:`add` calls.

        :raises BatchError: (a :class:`UvmError` context is added by the caller) naming the
            request that failed on the host; a guest failure is raised as the guest said.
        """
        for k, req in enumerate(requests):
            if not req.guest_path:
                raise BatchError("uvmPath must be passed to AddPlan9", k)
            if not req.read_only and self._no_writable_file_shares:
                err = BatchError("adding writable shares is denied: operation denied", k)
                err.hint = "mount it read-only (option \"ro\")"
                raise err
        if not requests:
            return []
        first = self._counter
        self._counter += len(requests)
        names = [str(first + k) for k in range(len(requests))]
        adds = [Plan9Add(name, req.host_path, req.read_only,
                         tuple(req.allowed_names or ()) if req.restrict else ())
                for name, req in zip(names, requests, strict=True)]
        host, guest = self._host, self._guest

        async def undo() -> None:
            failed = await host.plan9_remove_batch(list(reversed(names)))
            if failed:
                raise UvmError("; ".join(failed.values()))

        await host_then_guest(
            lambda: host.plan9_add_batch(adds),
            lambda: guest.mount_plan9_batch(
                [(a.name, r.guest_path, r.read_only)
                 for a, r in zip(adds, requests, strict=True)]),
            undo,
        )
        batch = Plan9Batch(self)
        shares = []
        for a, req in zip(adds, requests, strict=True):
            share = Plan9Share(self, a.name, a.host_path, req.guest_path, req.read_only,
                               a.allowed_files)
            share.batch = batch
            self._shares[a.name] = share
            shares.append(share)
        return shares

    async def remove_batch(
        self, shares: Sequence[Plan9Share]
    ) -> list[tuple[Plan9Share, UvmshimError]]:
        """Release ``shares`` in the order given (newest first): the guest step of all in one
        request, then the host step of those the guest let go, in one round. Returns the shares
        that failed, with why; they stay tracked (a retry releases exactly those)."""
        failures: dict[str, UvmshimError] = {}
        pending = [s for s in shares if not s._released]
        in_guest = [s for s in pending if not s._guest_released]
        if in_guest:
            unmounted = await _batch_step(in_guest, failures, lambda: (
                self._guest.unmount_plan9_batch([(s.name, s.guest_path) for s in in_guest])))
            for s in unmounted:
                s._guest_released = True
        on_host = [s for s in pending if s._guest_released]
        if on_host:
            removed = await _batch_step(on_host, failures, lambda: (
                self._host.plan9_remove_batch([s.name for s in on_host])))
            for s in removed:
                s._released = True
                del self._shares[s.name]
        out: list[tuple[Plan9Share, UvmshimError]] = []
        for s in pending:
            why = failures.get(s.name)
            if why is not None:
                why.wrap(f"failed to remove plan9 share: failed to remove plan9 share {s.name} "
                         f"from {self._vm_id}")
                out.append((s, why))
        return out

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


async def _batch_step(shares: list[Plan9Share], failures: dict[str, UvmshimError],
                      step: Callable[[], Awaitable[dict[str, str]]]) -> list[Plan9Share]:
    """Run ``step``, one batch request for ``shares`` that returns why, per name, for those it
    failed (all of them when it raises); add those to ``failures`` and return the others."""
    try:
        failed = await step()
    except UvmshimError as err:
        failed = {s.name: str(err) for s in shares}
    done: list[Plan9Share] = []
    for s in shares:
        if s.name in failed:
            failures[s.name] = UvmError(failed[s.name])
        else:
            done.append(s)
    return done
