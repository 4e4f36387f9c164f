"""One container a shim hosts in its UVM: its state machine, stdio relay and requests.

A shim hosts its own container and, for a pod sandbox, the pod's workload containers that joined
its UVM. Each is a :class:`Hosted`: created → running (↔ paused) → stopped, or aborted before
``start`` (a kill or ``delete --force`` of a created container).

A process with ``process.terminal`` (the init or an exec) has a pty in the guest; its host fds
are then the slave of the pty whose master went to the caller over ``--console-socket`` (or the
caller's own terminal): that slave is put in raw mode while the process runs, so that bytes pass
through it untouched, and every size the caller gives its master is passed on to the guest's
pty (:mod:`uvmshim.runtime.terminal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import termios
from collections.abc import Callable, Coroutine
from typing import Any

from uvmshim.errors import UvmshimError
from uvmshim.protocol.constants import CRUN_ROOT
from uvmshim.runc.state import NotRunning
from uvmshim.runc.stdio import relay_input, relay_output
from uvmshim.runtime import terminal
from uvmshim.runtime.container import Container
from uvmshim.uvm.qemu.agent_client import ContainerProcess

log = logging.getLogger(__name__)

#: crun as the agent runs it in the guest (same state root).
GUEST_CRUN = ("crun", "--root", CRUN_ROOT)

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class Hosted:
    """A container in the shim's UVM and the host fds its stdio goes to.

    :param on_status: called with each new status (the owner records it in ``state.json``).
    """

    def __init__(self, container: Container, uvm: Any, stdio: tuple[int, int, int],
                 spawn: Spawn, on_status: Callable[[str], object]) -> None:
        self.container = container
        self.id = container.id
        self.uvm = uvm
        self.stdio = stdio
        self.status = "created"
        self._spawn = spawn
        self._on_status = on_status
        self.running = asyncio.Event()
        self.abort: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._out: asyncio.Task[Any] | None = None
        self._in: asyncio.Task[Any] | None = None
        self._terminal = contextlib.ExitStack()  # the slave's raw mode, the size watcher
        #: The ``poststart`` hooks (set by the owner): run once the init runs; a failure fails
        #: ``start`` and kills the container, as runc does.
        self.poststart: Callable[[], Coroutine[Any, Any, None]] | None = None

    def _set(self, status: str) -> None:
        self.status = status
        with contextlib.suppress(UvmshimError, OSError):
            self._on_status(status)

    async def wait(self) -> int:
        """Until the init exits (or the container is aborted before start); its status."""
        running: asyncio.Future[Any] = asyncio.ensure_future(self.running.wait())
        abort: asyncio.Future[Any] = self.abort
        await asyncio.wait([running, abort], return_when=asyncio.FIRST_COMPLETED)
        if self.abort.done():
            running.cancel()
            self.status = "stopped"
            return self.abort.result()
        code = await self.container.wait()
        self.status = "stopped"
        if self.container.integrity_error is not None:  # the engine only sees the status
            log.error("%s", self.container.integrity_error)
        if self._out is not None:  # its last output, then the exit
            await asyncio.wait([self._out], timeout=5)
        if self._in is not None:
            self._in.cancel()
        self._terminal.close()
        return code

    def close_stdio(self) -> None:
        for fd in set(self.stdio):
            with contextlib.suppress(OSError):
                os.close(fd)

    # Requests -------------------------------------------------------------------------------

    async def handle(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        handler = {"start": self.start, "kill": self.kill, "ps": self.ps, "pause": self.pause,
                   "resume": self.resume, "shutdown": self.shutdown,
                   "state": self.state, "update": self.update, "stats": self.stats}.get(op)
        if handler is None:
            raise UvmshimError(f"unknown request {op!r}")
        return await handler(request)

    async def state(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status}

    async def start(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status != "created":
            what = {"running": "an already running", "paused": "a paused",
                    "starting": "an already running"}.get(self.status, "a stopped")
            raise UvmshimError(f"cannot start {what} container")
        self.status = "starting"
        c = self.container
        if c.terminal:
            enter_terminal(self._terminal, self.stdio[0])
        self._out = self._spawn(relay_output(c.output(), self.stdio[1], self.stdio[2]),
                                f"{self.id}-out")
        self._in = self._spawn(relay_input(self.stdio[0], c.write_stdin, c.close_stdin),
                               f"{self.id}-in")
        try:
            await c.start()
        except BaseException:
            self.status = "stopped"
            if not self.abort.done():
                self.abort.set_result(255)
            self._terminal.close()
            raise
        if c.terminal and terminal.is_terminal(self.stdio[0]) and c.init is not None:
            follow_terminal(self._terminal, self._spawn, self.stdio[0], c.init,
                            terminal.console_size_of(c.spec.raw.get("process")))
        self._set("running")
        self.running.set()
        if self.poststart is not None:
            try:
                await self.poststart()
            except UvmshimError:
                with contextlib.suppress(UvmshimError):
                    await self.signal(signal.SIGKILL, True)
                raise
        return {}

    async def kill(self, request: dict[str, Any]) -> dict[str, Any]:
        signum = int(request.get("signal", signal.SIGTERM))
        if self.status == "created":
            if signum and not self.abort.done():
                self.abort.set_result(128 + signum)
            return {}
        if self.status not in ("running", "paused"):
            raise UvmshimError("container not running")
        await self.signal(signum, bool(request.get("all")))
        return {}

    async def signal(self, signum: int, all_processes: bool = False) -> None:
        try:
            await self.container.kill(signum, all_processes=all_processes)
        except UvmshimError as err:
            if self.status == "stopped":
                raise UvmshimError("container not running") from None
            raise UvmshimError(f"kill: {err}") from None

    async def guest_crun(self, *args: str) -> str:
        result = await self.uvm.agent.exec([*GUEST_CRUN, *args])
        if result.exit_code != 0:
            raise UvmshimError(f"crun {args[0]}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return str(result.stdout.decode(errors="replace"))

    async def ps(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status not in ("running", "paused"):
            return {"pids": []}
        pids = json.loads(await self.guest_crun("ps", "--format", "json", self.id) or "[]")
        return {"pids": pids if isinstance(pids, list) else []}

    async def pause(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status != "running":
            raise UvmshimError("container not running")
        await self.guest_crun("pause", self.id)
        self._set("paused")
        return {}

    async def resume(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status != "paused":
            raise UvmshimError("container not paused")
        await self.guest_crun("resume", self.id)
        self._set("running")
        return {}

    async def update(self, request: dict[str, Any]) -> dict[str, Any]:
        """``update``: the guest's crun applies the new limits to the container's cgroup."""
        resources = request.get("resources")
        if not isinstance(resources, dict):
            raise UvmshimError("update needs resources")
        if self.status not in ("created", "running", "paused"):
            raise UvmshimError("container not running")
        await self.container.update(resources)
        return {}

    async def stats(self, _request: dict[str, Any]) -> dict[str, Any]:
        """``events``: the container's cgroup files in the guest (the caller maps them)."""
        if self.status not in ("created", "starting", "running", "paused"):
            raise NotRunning(self.id)
        try:
            return {"files": await self.container.stats()}
        except UvmshimError:
            if self.status == "stopped":
                raise NotRunning(self.id) from None
            raise

    async def shutdown(self, _request: dict[str, Any]) -> dict[str, Any]:
        """``delete --force``: kill whatever runs (the owner then removes the container)."""
        if self.status == "paused":
            with contextlib.suppress(UvmshimError):
                await self.guest_crun("resume", self.id)
            self.status = "running"
        if self.status in ("running", "starting"):
            with contextlib.suppress(UvmshimError):
                await self.signal(signal.SIGKILL, True)
        elif not self.abort.done():
            self.abort.set_result(128 + signal.SIGKILL)
        return {}

    async def exec(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        """Run a process in the container; answer when it started and again when it exits."""
        term = contextlib.ExitStack()
        try:
            if len(fds) != 3:
                raise UvmshimError("exec needs the process's stdin, stdout and stderr")
            if self.status != "running":
                raise UvmshimError("cannot exec in a stopped container"
                                   if self.status == "stopped" else
                                   f"cannot exec in a {self.status} container")
            process = request.get("process")
            if not isinstance(process, dict) or not process.get("args"):
                raise UvmshimError("exec: the process has no args")
            tty = bool(process.get("terminal"))
            if tty:
                process = terminal.with_console_size(process, terminal.window_size(fds[0]))
                enter_terminal(term, fds[0])
            proc = await self.container.exec(process, stdin=True)
            reply(conn, {"ok": True})
            out = self._spawn(relay_output(proc.output(), fds[1], fds[2]), "exec-out")
            feed = self._spawn(relay_input(fds[0], proc.write_stdin, proc.close_stdin),
                               "exec-in")
            if tty and terminal.is_terminal(fds[0]):
                follow_terminal(term, self._spawn, fds[0], proc,
                                terminal.console_size_of(process))
            code = await proc.wait()
            await asyncio.wait([out], timeout=5)
            feed.cancel()
            term.close()
            reply(conn, {"exit": code if code >= 0 else 128 - code})
        except UvmshimError as err:
            reply(conn, {"error": str(err)})
        finally:
            term.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    """Send one answer line (the client may be gone: nothing to do then)."""
    with contextlib.suppress(OSError):
        conn.settimeout(10)
        conn.sendall(json.dumps(answer).encode() + b"\n")


def enter_terminal(stack: contextlib.ExitStack, fd: int) -> None:
    """Raw mode on ``fd`` (if it is a terminal) until ``stack`` closes."""
    if terminal.is_terminal(fd):
        try:
            stack.enter_context(terminal.raw_mode(fd))
        except (OSError, termios.error) as err:
            log.warning("terminal %d: cannot set raw mode: %s", fd, err)


def follow_terminal(stack: contextlib.ExitStack, spawn: Spawn, fd: int,
                    proc: ContainerProcess, size: terminal.Size | None) -> None:
    """Pass the size changes of terminal ``fd`` to ``proc`` until ``stack`` closes."""
    task = spawn(terminal.follow_window(fd, proc.resize, size), f"{proc.key}-winch")
    stack.callback(task.cancel)
