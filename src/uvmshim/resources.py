"""Container resources: the handles one container holds, released newest first.

This is hcsshim's ``internal/resources``, with its ``ReleaseResources`` defects fixed (see
``docs/design.md``, section 6): releasing never stops halfway (every handle is attempted and all
failures are reported together), the layers are released even when another release failed, and
a handle that was released is never released again, so a second
:meth:`ContainerResources.release` after a clean one is a no-op.
A handle whose release failed stays tracked, so releasing again retries exactly those.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from uvmshim.errors import ReleaseError

log = logging.getLogger(__name__)


class Resource(Protocol):
    """Something a container holds in the UVM (hcsshim's ``ResourceCloser``)."""

    async def release(self) -> None:
        """Give the resource back. Calling it again after it succeeded does nothing."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able description: ``kind`` plus kind-specific fields (for ``uvmshim plan``)."""


class Batch(Protocol):
    """What made several resources at once (a resource's ``batch`` attribute, if not None):
    releases a run of them together."""

    async def release_members(self, members: Sequence[Any]) -> Sequence[tuple[Any, Exception]]:
        """Release ``members`` (newest first); return those that failed, with why."""


def _batch(resource: Resource) -> Batch | None:
    batch = getattr(resource, "batch", None)
    return batch if batch is not None and hasattr(batch, "release_members") else None


async def release_newest_first(
    resources: list[Resource],
) -> tuple[list[Resource], list[BaseException]]:
    """Release ``resources`` newest first, attempting every one.

    Neighbours made by the same batch (e.g. the Plan9 shares of one container's binds) are
    released together, still newest first, by their batch: one guest request and one host
    round instead of one each.

    :returns: the resources whose release failed (in their original order, to retry later)
        and the failures.
    """
    errors: list[BaseException] = []
    kept: list[Resource] = []
    todo = list(reversed(resources))
    i = 0
    while i < len(todo):
        resource = todo[i]
        batch = _batch(resource)
        if batch is not None:
            j = i + 1
            while j < len(todo) and _batch(todo[j]) is batch:
                j += 1
            members = todo[i:j]
            i = j
            try:
                failures = await batch.release_members(members)
            except Exception as err:
                log.warning("failed to release resources: %s", err)
                errors.append(err)
                kept.extend(members)
                continue
            failed_ids = {id(m) for m, _ in failures}
            for _member, why in failures:
                log.warning("failed to release resource: %s", why)
                errors.append(why)
            kept.extend(m for m in members if id(m) in failed_ids)
            continue
        i += 1
        try:
            await resource.release()
        except Exception as err:  # keep going: every handle gets its chance
            log.warning("failed to release resource: %s", err)
            errors.append(err)
            kept.append(resource)
    return list(reversed(kept)), errors


class ContainerResources:
    """One container's resources (hcsshim's ``resources.Resources``).

    :param container_id: the container's effective id.
    """

    def __init__(self, container_id: str) -> None:
        self.id = container_id
        self.container_root_in_uvm = ""
        self.lcow_scratch_path = ""
        self.network_namespace = ""
        #: The guest network namespace the container joins ("" if the spec names none).
        self.guest_network_namespace = ""
        self._layers: Resource | None = None
        self._resources: list[Resource] = []

    @property
    def layers(self) -> Resource | None:
        return self._layers

    def set_layers(self, layers: Resource) -> None:
        self._layers = layers

    def take_layers(self) -> Resource | None:
        """Stop tracking the layers and return them (a pod sandbox hands them to its UVM)."""
        layers, self._layers = self._layers, None
        return layers

    def add(self, *resources: Resource) -> None:
        self._resources.extend(resources)

    def __iter__(self) -> Iterator[Resource]:
        """Every live handle in the order added, the layers first (they were added first)."""
        if self._layers is not None:
            yield self._layers
        yield from self._resources

    def __len__(self) -> int:
        return len(self._resources) + (self._layers is not None)

    async def release(self) -> None:
        """Release everything, newest first, then the layers.

        :raises ReleaseError: one or more releases failed; ``errors`` holds each failure.
            The failed handles stay tracked, so calling this again retries them.
        """
        self._resources, errors = await release_newest_first(self._resources)
        if self._layers is not None:
            try:
                await self._layers.release()
                self._layers = None
            except Exception as err:
                log.warning("failed to release container layers: %s", err)
                errors.append(err)
        if errors:
            raise ReleaseError("failed to release one or more container resources", errors)
