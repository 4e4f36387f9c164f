"""The guest agent's operations, typed: commands in the UVM and containers, over one connection.

Usage::

    client = await AgentClient.connect(sock, timeout=30)
    await client.ping()
    proc = await client.start_exec(["cat", "/proc/mounts"])
    async for stream, data in proc.output():
        ...
    rc = await proc.wait()
    await client.close()

Every operation sends one typed request (:mod:`uvmshim.protocol.requests`) through an
:class:`~.agent_connection.AgentConnection`, which owns the socket, the run state and the event
routes. A guest failure raises :class:`~uvmshim.errors.GuestError` (``guest <op>: <reason>``,
with the guest's ``kind``); a missing answer raises :class:`~uvmshim.errors.AgentConnectionError`.
The device-manager side of the agent (mounts) is :class:`~.guest.AgentGuestBackend`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from uvmshim.errors import BackendError
from uvmshim.protocol import (
    ContainerCreate,
    ContainerDelete,
    ContainerExec,
    ContainerSignal,
    ContainerStart,
    ContainerStats,
    ContainerUpdate,
    EventBody,
    Exec,
    ExecStatus,
    ExitEvent,
    OutputEvent,
    Ping,
    ProcessResize,
    ProcessStdin,
    ProtocolError,
    RequestBody,
    process_key,
)

from .agent_connection import DEFAULT_REQUEST_TIMEOUT, AgentConnection, PendingRequest

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "AgentClient",
    "ContainerProcess",
    "ExecProcess",
    "ExecResult",
]


@dataclass(frozen=True)
class ExecResult:
    """What a finished ``exec`` produced."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class _Output:
    """An :class:`~.agent_connection.EventSink` that queues output chunks until its route ends."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

    def on_event(self, event: EventBody) -> None:
        if isinstance(event, OutputEvent):
            self._queue.put_nowait((event.stream, event.data))

    def on_end(self, error: BackendError | None) -> None:
        self._queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        """The queued ``(stream, data)`` chunks, up to the end of the route."""
        while (item := await self._queue.get()) is not None:
            yield item


class ExecProcess:
    """A command running in the guest; iterate :meth:`output`, then :meth:`wait`."""

    def __init__(self, argv: Sequence[str], output: _Output, pending: PendingRequest) -> None:
        self.argv = list(argv)
        self._output = output
        self._done = asyncio.ensure_future(pending.result(None))
        # A caller cancelled before wait() never looks at the result; don't let asyncio report
        # the failure of a command nobody waits for any more.
        self._done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.timed_out = False

    def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(stream, data)`` chunks (``stream`` is ``stdout`` or ``stderr``) as they come.

        Ends when the process has exited and all of its output was delivered.
        """
        return self._output.chunks()

    async def wait(self) -> int:
        """Return the exit status (negative: killed by that signal).

        :raises GuestError: the guest could not start the command.
        :raises BackendError: the connection went away first, or the answer was malformed.
        """
        try:
            status = ExecStatus.from_json(await self._done)
        except ProtocolError as err:
            raise BackendError(f"guest exec: malformed answer: {err}") from None
        self.timed_out = status.timed_out
        return status.exit_code


class ContainerProcess:
    """A process in a guest container (its init, or an exec), named by a process key.

    Its output and exit arrive as events; iterate :meth:`output`, then :meth:`wait`.
    """

    def __init__(self, client: AgentClient, key: str) -> None:
        self.client = client
        self.key = key
        self._output = _Output()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        #: crun's own error, when crun failed to run the process (set with the exit status).
        self.error = ""

    def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(stream, data)`` chunks as they come; ends when the process has exited."""
        return self._output.chunks()

    async def wait(self) -> int:
        """Return the exit status (crun reports 128+N for a process killed by signal N).

        :raises BackendError: if the connection to the agent was lost first.
        """
        return await self._exit

    async def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the process's stdin (the process must have been given one)."""
        await self.client.request(ProcessStdin(process=self.key, data=data))

    async def close_stdin(self) -> None:
        """Close the process's stdin (it reads EOF; on a terminal: the EOF character)."""
        await self.client.request(ProcessStdin(process=self.key, eof=True))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the process's terminal (it was started with
        ``process.terminal``); the guest's kernel sends it ``SIGWINCH``."""
        await self.client.request(ProcessResize(process=self.key, rows=rows, cols=cols))

    # EventSink: the connection routes this process's events here.

    def on_event(self, event: EventBody) -> None:
        if isinstance(event, ExitEvent):
            if not self._exit.done():
                self.error = event.error
                self._exit.set_result(event.exit_code)
        else:
            self._output.on_event(event)

    def on_end(self, error: BackendError | None) -> None:
        self._output.on_end(error)
        if self._exit.done():
            return
        self._exit.set_exception(
            error or BackendError(f"process {self.key} ended without an exit status"))
        self._exit.exception()  # mark retrieved: nobody may be waiting


class AgentClient:
    """The guest agent's operations over one :class:`AgentConnection`. Create with
    :meth:`connect`."""

    def __init__(self, connection: AgentConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> AgentClient:
        """Connect to the chardev socket at ``path`` and complete the ``hello`` exchange.

        :raises AgentConnectionError: on timeout (no socket, or no answer).
        :raises BackendError: the guest speaks another protocol version.
        """
        connection = AgentConnection(path)
        await connection.open(timeout)
        return cls(connection)

    @property
    def guest_info(self) -> dict[str, Any]:
        """The guest's answer to ``hello`` (version, pid, boot time stamps)."""
        return self.connection.guest_info

    @property
    def closed(self) -> bool:
        """True once the connection is gone."""
        return self.connection.closed

    async def close(self) -> None:
        """Close the connection; requests in flight fail with AgentConnectionError."""
        await self.connection.close()

    async def request(self, body: RequestBody, *,
                      timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> Any:
        """Send one typed request and return the guest's result.

        :raises GuestError: ``guest <op>: <guest's reason>`` if the guest refused or failed.
        :raises AgentConnectionError: the connection broke or ``timeout`` passed.
        """
        return await self.connection.request(body, timeout=timeout)

    async def ping(self) -> dict[str, Any]:
        """Ask the agent whether it is there; returns ``{"uptime": s}``."""
        result = await self.request(Ping())
        return result if isinstance(result, dict) else {}

    # Section: commands in the UVM ---------------------------------------------------------------

    async def start_exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                         cwd: str | None = None, stdin: bytes = b"",
                         timeout: float | None = None) -> ExecProcess:
        """Start ``argv`` in the utility VM (not in a container); stream its output.

        :param env: variables added to the guest's default environment (PATH).
        :param timeout: the guest kills the command after this many seconds.
        """
        output = _Output()
        body = Exec(argv=tuple(argv), env=dict(env or {}), cwd=cwd or "/", stdin=stdin,
                    timeout=timeout)
        pending = await self.connection.send(body, events=output)
        return ExecProcess(argv, output, pending)

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, stdin: bytes = b"",
                   timeout: float | None = None) -> ExecResult:
        """Run ``argv`` in the utility VM and collect its output."""
        proc = await self.start_exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        async for stream, data in proc.output():
            out.setdefault(stream, bytearray()).extend(data)
        rc = await proc.wait()
        return ExecResult(rc, bytes(out["stdout"]), bytes(out["stderr"]), proc.timed_out)

    # Section: containers ------------------------------------------------------------------------

    async def container_create(self, container_id: str, bundle: str, spec: Mapping[str, Any],
                               *, sandbox_id: str = "", scratch_dir: str = "",
                               stdin: bool = False) -> ContainerProcess:
        """Create container ``container_id`` in the guest (``crun create``: its init waits).

        :param spec: the rewritten (guest-path) OCI spec; ``sandbox://``/``hugepages://``
            mount sources are resolved by the guest for ``sandbox_id``.
        :param stdin: give the init process a stdin (see :meth:`ContainerProcess.write_stdin`).
        :returns: the init process; its output starts after :meth:`container_start`.
        :raises GuestError: crun refused the spec (``crun: ...``); nothing is left in the guest.
        """
        key = process_key(container_id)
        if self.connection.watching(key):
            raise BackendError(f"guest container_create: {container_id} already has an init")
        proc = ContainerProcess(self, key)
        # Routed before the request goes out: ``crun create`` makes the init, whose events
        # may come before the response.
        self.connection.watch(key, proc)
        try:
            await self.request(ContainerCreate(
                container_id=container_id, bundle=bundle, spec=dict(spec),
                sandbox_id=sandbox_id, scratch_dir=scratch_dir, stdin=stdin))
        except BaseException:
            self.connection.unwatch(key)
            raise
        return proc

    async def container_start(self, container_id: str) -> None:
        """Start the container's init process (``crun start`` in the guest)."""
        await self.request(ContainerStart(container_id=container_id))

    async def container_exec(self, container_id: str, exec_id: str,
                             process: Mapping[str, Any], *,
                             stdin: bool = False) -> ContainerProcess:
        """Run ``process`` (an OCI process object) in the running container."""
        key = process_key(container_id, exec_id)
        if self.connection.watching(key):
            raise BackendError(f"guest container_exec: process {key} is already running")
        # Routed before the request goes out: output may arrive before the response.
        proc = ContainerProcess(self, key)
        self.connection.watch(key, proc)
        try:
            await self.request(ContainerExec(container_id=container_id, exec_id=exec_id,
                                             process=dict(process), stdin=stdin))
        except BaseException:
            self.connection.unwatch(key)
            raise
        return proc

    async def container_signal(self, container_id: str, signal: int, *,
                               all_processes: bool = False) -> None:
        """Send ``signal`` to the container's init (or all its processes)."""
        await self.request(ContainerSignal(container_id=container_id, signal=signal,
                                           all_processes=all_processes))

    async def container_update(self, container_id: str, resources: Mapping[str, Any]) -> None:
        """New cgroup limits (OCI ``linux.resources``) for the running container."""
        await self.request(ContainerUpdate(container_id=container_id, resources=dict(resources)))

    async def container_stats(self, container_id: str) -> dict[str, str]:
        """The container's cgroup files in the guest (name → text; see
        :class:`~uvmshim.protocol.requests.ContainerStats`)."""
        result = await self.request(ContainerStats(container_id=container_id))
        files = result.get("files") if isinstance(result, dict) else None
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}

    async def container_delete(self, container_id: str) -> None:
        """Kill (if needed) and delete the container in the guest.

        Its processes that never reported an exit (e.g. an init that was never started) are
        forgotten, so the id can be used again.
        """
        await self.request(ContainerDelete(container_id=container_id))
        for key in self.connection.watched_processes():
            if key == container_id or key.startswith(container_id + "/"):
                sink = self.connection.unwatch(key)
                if sink is not None:
                    sink.on_end(BackendError(
                        f"container {container_id} was deleted before {key} exited"))
