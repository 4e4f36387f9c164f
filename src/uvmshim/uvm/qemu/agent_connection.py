"""One connection to the guest agent: the socket, its run state, requests in flight, event routing.

QEMU is started with ``-chardev socket,id=agent,...,server=on,wait=off`` and
``-device virtserialport,chardev=agent,name=agent``: QEMU listens on the machine's agent socket
and serves **one** client at a time (a second connection is accepted but never served). Bytes
the host writes before the guest opens its port wait in the socket, so :meth:`open` can send
``hello`` at once and simply wait for the answer.

Run state (:class:`RunState`)::

    IDLE ──open()──▶ CONNECTING ──hello answered──▶ RUNNING ──close(), EOF, I/O error──▶ CLOSED
      │                  └──── timeout, wrong version ───────────────────────────────────▲
      └───────────────────────────── close() ────────────────────────────────────────────┘

Only ``hello`` goes out while CONNECTING; a request in any other state than RUNNING fails with
:class:`~uvmshim.errors.AgentConnectionError`. CLOSED is final: reconnecting is a new connection
(request ids start at a random point, so answers meant for an earlier connection match nothing).

Events are routed through one table, route → :class:`EventSink`. A route is a request id (the
output of an ``exec``: that request's response ends it) or a process key (a container process:
its ``exit`` event ends it). When the connection closes, every sink is ended with the reason.

The typed operations (exec, containers) are in :mod:`.agent_client`; this module knows requests
only as :class:`~uvmshim.protocol.requests.RequestBody`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
from typing import Any, Protocol

from uvmshim.errors import AgentConnectionError, BackendError, GuestError
from uvmshim.protocol import (
    PROTOCOL_VERSION,
    Event,
    EventBody,
    ExitEvent,
    Hello,
    Op,
    ProtocolError,
    Request,
    RequestBody,
    Response,
    decode_event,
    encode_frame,
    parse_message,
    read_frame,
)

log = logging.getLogger(__name__)

#: Default time a single request may take (mounts wait up to 5 s for a hot-plugged disk).
DEFAULT_REQUEST_TIMEOUT = 60.0

#: How long to wait between attempts while the socket is missing or refuses (QEMU starting).
CONNECT_RETRY_INTERVAL = 0.02


class RunState(enum.Enum):
    """Where an :class:`AgentConnection` is in its life (see the module docstring)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    CLOSED = "closed"


#: A request id (exec output) or a process key (container process events).
Route = int | str


class EventSink(Protocol):
    """Receives the events of one route, then exactly one :meth:`on_end`."""

    def on_event(self, event: EventBody) -> None:
        """One event of this route, in the order the guest sent them."""

    def on_end(self, error: BackendError | None) -> None:
        """The route ended: normally (``None``) or because the connection went away."""


class PendingRequest:
    """A request on the wire; :meth:`result` waits for the answer."""

    def __init__(self, connection: AgentConnection, rid: int, op: str,
                 future: asyncio.Future[Any]) -> None:
        self._connection = connection
        self.id = rid
        self.op = op
        self._future = future

    async def result(self, timeout: float | None) -> Any:
        """The guest's result.

        :raises GuestError: the guest refused or failed the request.
        :raises AgentConnectionError: the connection went away or ``timeout`` passed.
        """
        try:
            return await asyncio.wait_for(self._future, timeout)
        except TimeoutError:
            self._connection.forget(self.id)
            err = AgentConnectionError(f"guest {self.op}: no answer after {timeout:g} s")
            self._connection.stalled(err)
            raise err from None


class AgentConnection:
    """One connection to the guest agent at the chardev socket ``path``; :meth:`open` it once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._state = RunState.IDLE
        self._closed_because: AgentConnectionError | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._next_id = secrets.randbelow(1 << 30) + 1
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._routes: dict[Route, EventSink] = {}
        #: Set when a request went unanswered, cleared by the next frame from the guest.
        self._stalled: AgentConnectionError | None = None
        #: The guest's answer to ``hello`` (version, pid, boot time stamps).
        self.guest_info: dict[str, Any] = {}

    @property
    def state(self) -> RunState:
        """The run state."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once the connection is gone (closed, lost, or never came up)."""
        return self._state is RunState.CLOSED

    # Section: life cycle -----------------------------------------------------------------------

    async def open(self, timeout: float = 30.0) -> None:
        """Connect and complete the ``hello`` exchange: IDLE → CONNECTING → RUNNING.

        Retries while the socket does not exist or refuses connections (QEMU starting up),
        then waits for the guest agent to answer (the guest boots meanwhile). On failure the
        connection is CLOSED.

        :raises AgentConnectionError: not IDLE, or no socket or no answer within ``timeout``.
        :raises BackendError: the guest speaks another protocol version.
        """
        if self._state is not RunState.IDLE:
            raise AgentConnectionError(
                f"agent connection {self.path} is {self._state.value}: open it only once")
        self._state = RunState.CONNECTING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                try:
                    self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                    break
                except (FileNotFoundError, ConnectionRefusedError) as err:
                    if loop.time() >= deadline:
                        raise AgentConnectionError(f"agent socket {self.path}: {err}") from err
                    await asyncio.sleep(CONNECT_RETRY_INTERVAL)
            self._reader_task = asyncio.create_task(self._read_loop(self._reader),
                                                    name="agent-reader")
            remaining = max(deadline - loop.time(), 0.1)
            info = await self.request(Hello(), timeout=remaining)
            if not isinstance(info, dict) or info.get("version") != PROTOCOL_VERSION:
                raise BackendError(
                    f"guest agent speaks protocol {info!r}, not {PROTOCOL_VERSION}")
        except BaseException:
            await self.close()
            raise
        self.guest_info = info
        self._state = RunState.RUNNING

    async def close(self) -> None:
        """Close the connection (any state → CLOSED); requests in flight fail, routes end."""
        self._fail(AgentConnectionError("agent connection closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()

    def _fail(self, reason: AgentConnectionError) -> None:
        """Go to CLOSED (keeping the first reason); fail what is in flight, end every route."""
        if self._state is not RunState.CLOSED:
            self._state = RunState.CLOSED
            self._closed_because = reason
        pending, self._pending = self._pending, {}
        for op, fut in pending.values():
            if not fut.done():
                fut.set_exception(AgentConnectionError(f"guest {op}: {reason.message}"))
        routes, self._routes = self._routes, {}
        for sink in routes.values():
            sink.on_end(reason)

    def stalled(self, err: AgentConnectionError) -> None:
        """A request got no answer in time: until the guest sends anything again, further
        requests fail at once instead of each waiting out its timeout (a teardown releasing
        many resources must not wait a minute for each)."""
        self._stalled = err

    def _check_can_send(self, op: str) -> None:
        if self._state is RunState.RUNNING:
            if self._stalled is not None:
                raise AgentConnectionError(
                    f"guest {op}: not sent, the agent stopped answering ({self._stalled})")
            return
        if self._state is RunState.CONNECTING and op == Op.HELLO:
            return
        if self._state is RunState.CLOSED:
            why = self._closed_because.message if self._closed_because else "connection closed"
            raise AgentConnectionError(f"guest {op}: {why}")
        raise AgentConnectionError(
            f"guest {op}: the agent connection is {self._state.value}, not running")

    # Section: requests --------------------------------------------------------------------------

    async def send(self, body: RequestBody, *, events: EventSink | None = None) -> PendingRequest:
        """Send one request; route the events that carry its id to ``events`` until it is
        answered (registered before sending: the first event may beat this call's return).

        :raises AgentConnectionError: the connection is not RUNNING or the write failed.
        """
        op = str(body.OP)
        self._check_can_send(op)
        writer = self._writer
        if writer is None:  # RUNNING/CONNECTING always have a writer; say so if not
            raise AgentConnectionError(f"guest {op}: the agent connection has no socket")
        rid = self._next_id
        self._next_id += 1
        args = body.to_json()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("agent request %d: %s %s", rid, op, _brief(args))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (op, fut)
        if events is not None:
            self._routes[rid] = events
        try:
            frame = encode_frame(Request(rid, op, args).to_json())
            async with self._write_lock:
                writer.write(frame)
                await writer.drain()
        except (ProtocolError, OSError, ConnectionError) as err:
            self.forget(rid)
            raise AgentConnectionError(f"guest {op}: cannot send request: {err}") from err
        return PendingRequest(self, rid, op, fut)

    async def request(self, body: RequestBody, *,
                      timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> Any:
        """Send ``body`` and return the guest's result.

        :raises GuestError: ``guest <op>: <guest's reason>``, with the guest's ``kind``.
        :raises AgentConnectionError: the connection is not running, broke, or ``timeout``
            passed.
        """
        pending = await self.send(body)
        return await pending.result(timeout)

    def forget(self, rid: int) -> None:
        """Drop request ``rid`` (the caller gave up): its late answer and events match nothing."""
        self._pending.pop(rid, None)
        sink = self._routes.pop(rid, None)
        if sink is not None:
            sink.on_end(None)

    # Section: process routes --------------------------------------------------------------------

    def watch(self, key: str, sink: EventSink) -> None:
        """Route the events of container process ``key`` to ``sink`` until its exit event.

        On a CLOSED connection the sink is ended at once, with the reason it closed.

        :raises BackendError: ``key`` is already routed somewhere.
        """
        if key in self._routes:
            raise BackendError(f"process {key} is already running")
        if self._state is RunState.CLOSED:
            sink.on_end(self._closed_because or AgentConnectionError("agent connection closed"))
            return
        self._routes[key] = sink

    def unwatch(self, key: str) -> EventSink | None:
        """Stop routing process ``key``; return its sink (not ended) if it had one."""
        return self._routes.pop(key, None)

    def watching(self, key: str) -> bool:
        """True if events of process ``key`` are routed somewhere."""
        return key in self._routes

    def watched_processes(self) -> list[str]:
        """The process keys routed now."""
        return [k for k in self._routes if isinstance(k, str)]

    # Section: reading ---------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    self._fail(AgentConnectionError("guest agent closed the connection"))
                    return
                self._stalled = None  # it answers again
                try:
                    msg = parse_message(frame)
                except ProtocolError as err:
                    log.warning("ignoring malformed message from the guest: %s", err)
                    continue
                if isinstance(msg, Response):
                    self._on_response(msg)
                elif isinstance(msg, Event):
                    self._on_event(msg)
        except (ProtocolError, OSError, ConnectionError) as err:
            self._fail(AgentConnectionError(f"agent connection lost: {err}"))
        except Exception as err:
            # A bug here must not leave the connection RUNNING with nobody reading: every
            # request would then wait out its timeout.
            log.exception("agent connection reader failed")
            self._fail(AgentConnectionError(f"agent connection lost: internal error: {err!r}"))

    def _on_response(self, msg: Response) -> None:
        sink = self._routes.pop(msg.id, None)
        if sink is not None:
            sink.on_end(None)  # every event of the request came before its response
        entry = self._pending.pop(msg.id, None)
        if entry is None:
            return  # left over from an earlier connection, or the caller gave up
        op, fut = entry
        if fut.done():
            return
        if msg.ok:
            fut.set_result(msg.result)
        else:
            fut.set_exception(GuestError(op, msg.kind, msg.error))

    def _on_event(self, msg: Event) -> None:
        try:
            event = decode_event(msg)
        except ProtocolError as err:
            log.debug("ignoring event from the guest: %s", err)
            return
        route = event.route
        sink = self._routes.get(route) if route is not None else None
        if sink is None:
            return
        sink.on_event(event)
        if isinstance(event, ExitEvent):
            del self._routes[event.process]  # the exit event is a process's last
            sink.on_end(None)


def _brief(args: dict[str, Any], limit: int = 300) -> str:
    """``args`` for a debug line, cut short (a spec or stdin chunk can be large)."""
    text = repr(args)
    return text if len(text) <= limit else text[:limit] + "…"
