"""A real UVM shared by the tests of one module, driven from a private event loop thread.

pytest tests are synchronous; the UVM is asyncio. The session runs one event loop in a thread
for the module's lifetime (QEMU is tied to the thread that launched it), boots the UVM there,
and :meth:`UvmSession.run` runs a coroutine on it and returns the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from uvmshim.runtime.container import Container
from uvmshim.runtime.leaks import Holdings, find_holdings
from uvmshim.runtime.vm import QemuUvm, start_uvm
from uvmshim.spec import Spec
from uvmshim.uvm.options import UvmOptions

T = TypeVar("T")


class UvmSession:
    def __init__(self, options: UvmOptions | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="uvm-session")
        self._thread.start()
        self._stack = contextlib.AsyncExitStack()
        self.uvm: QemuUvm = self.run(self._start(options))
        self.state_dir = self.uvm.machine.state_dir
        self.pid = self.uvm.machine.pid

    async def _start(self, options: UvmOptions | None) -> QemuUvm:
        return await self._stack.enter_async_context(start_uvm(options))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def sh(self, script: str) -> tuple[int, str, str]:
        """Run ``sh -c script`` in the UVM (not in a container)."""
        res = self.run(self.uvm.agent.exec(["sh", "-c", script]))
        return res.exit_code, res.stdout.decode(), res.stderr.decode()

    def close(self) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()


def vm_gone(state_dir: Path, pid: int | None) -> dict[str, Any]:
    """What is left of one VM (its state dir, its QEMU process, host mounts); empty if gone."""
    now = find_holdings()
    left: dict[str, Any] = {}
    if state_dir.exists():
        left["state_dir"] = str(state_dir)
    if pid is not None and pid in now.qemu_pids:
        left["qemu_pid"] = pid
    held = [m for m in now.mounts if m.startswith(str(state_dir))]
    if held:
        left["mounts"] = held
    return left


def new_holdings(before: Holdings) -> dict[str, Any]:
    """What uvmshim holds now that it did not hold at ``before`` (empty: nothing leaked)."""
    now = find_holdings()
    old_vms = {str(v.state_dir) for v in before.vms}
    out: dict[str, Any] = {
        "vms": [v.as_dict() for v in now.vms if str(v.state_dir) not in old_vms],
        "qemu_pids": sorted(set(now.qemu_pids) - set(before.qemu_pids)),
        "mounts": sorted(set(now.mounts) - set(before.mounts)),
        "state_dirs": sorted(set(now.state_dirs) - set(before.state_dirs)),
    }
    return {k: v for k, v in out.items() if v}


async def run_to_end(c: Container) -> tuple[int, str, str]:
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    async def collect() -> None:
        async for stream, data in c.output():
            out[stream].extend(data)

    relay = asyncio.create_task(collect())
    await c.start()
    code = await c.wait()
    await relay
    return code, out["stdout"].decode(), out["stderr"].decode()


def run_spec(session: UvmSession, cid: str, spec: Spec) -> tuple[int, str, str]:
    c = Container(session.uvm.vm, session.uvm.agent, cid, spec)

    async def go() -> tuple[int, str, str]:
        await c.create()
        try:
            return await run_to_end(c)
        finally:
            await c.delete()

    return session.run(go())
