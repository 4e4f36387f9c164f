"""A pod removes each container once, however many ask at the same time: the pod daemon's
client going away and ``pod stop`` used to release one container's resources twice (the second
unmount failed) and then fail the whole stop on the vanished container."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from uvmshim.errors import ReleaseError, UvmshimError
from uvmshim.runtime.pod import Pod


class SlowContainer:
    """Stands in for a Container: ``delete`` takes a while and is counted."""

    def __init__(self, fail_first: bool = False) -> None:
        self.deletes = 0
        self.fail_first = fail_first

    async def delete(self) -> None:
        self.deletes += 1
        await asyncio.sleep(0.05)
        if self.fail_first and self.deletes == 1:
            raise ReleaseError("failed to delete container", [UvmshimError("busy")])


def _pod(**containers: SlowContainer) -> Pod:
    async def release_owned() -> None:
        return None

    uvm = SimpleNamespace(vm=SimpleNamespace(release_owned=release_owned))
    pod = Pod(cast(Any, uvm), "p")
    pod.containers.update(cast(Any, containers))
    return pod


def test_concurrent_removals_delete_once() -> None:
    c = SlowContainer()
    pod = _pod(a=c)

    async def go() -> None:
        await asyncio.gather(pod.remove_container("a"), pod.remove_container("a"))

    asyncio.run(go())
    assert c.deletes == 1 and pod.containers == {}
    with pytest.raises(UvmshimError, match="has no container a"):
        asyncio.run(pod.remove_container("a"))


def test_stop_while_a_client_removes_its_container() -> None:
    a, b = SlowContainer(), SlowContainer()
    pod = _pod(a=a, b=b)

    async def go() -> None:
        removal = asyncio.create_task(pod.remove_container("a"))
        await asyncio.sleep(0)  # under way
        await pod.stop()
        await removal

    asyncio.run(go())
    assert (a.deletes, b.deletes) == (1, 1) and pod.containers == {}


def test_a_failed_removal_can_be_retried() -> None:
    c = SlowContainer(fail_first=True)
    pod = _pod(a=c)
    with pytest.raises(ReleaseError):
        asyncio.run(pod.remove_container("a"))
    assert "a" in pod.containers  # still tracked
    asyncio.run(pod.remove_container("a"))
    assert c.deletes == 2 and pod.containers == {}
