"""AgentConnection, AgentClient and AgentGuestBackend against the real agent server (or a scripted
fake guest), on a unix socket."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from uvmshim.agent import kmods
from uvmshim.agent.server import Server
from uvmshim.agent.storage import Storage
from uvmshim.errors import AgentConnectionError, BackendError, GuestError
from uvmshim.protocol import (
    PROTOCOL_VERSION,
    ErrorKind,
    ExitEvent,
    FrameDecoder,
    OutputEvent,
    Ping,
    encode_frame,
)
from uvmshim.uvm.backend import GuestBackend
from uvmshim.uvm.qemu.agent_client import AgentClient
from uvmshim.uvm.qemu.agent_connection import AgentConnection, RunState
from uvmshim.uvm.qemu.guest import AgentGuestBackend


class _NoModules(kmods.ModuleLoader):
    def ensure(self, *names: str) -> None:
        pass


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket served by the real agent Server (like QEMU's chardev, one client)."""
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                Server(conn.fileno(), Storage(_NoModules(), sysfs=str(tmp_path)),
                       eof_is_final=True, poweroff=lambda: None).serve()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    stop.set()
    listener.close()


def test_requests_exec_and_errors(agent_socket: Path) -> None:
    async def main() -> None:
        client = await AgentClient.connect(agent_socket, timeout=5)
        assert client.guest_info["version"] == PROTOCOL_VERSION
        assert client.connection.state is RunState.RUNNING
        backend = AgentGuestBackend(client)
        _typed: GuestBackend = backend  # mypy checks the Protocol is implemented
        try:
            assert "uptime" in await client.ping()

            proc = await client.start_exec(["sh", "-c", "echo a; sleep 0.2; echo b >&2"])
            chunks = [c async for c in proc.output()]
            assert await proc.wait() == 0
            assert b"".join(d for s, d in chunks if s == "stdout") == b"a\n"
            assert b"".join(d for s, d in chunks if s == "stderr") == b"b\n"

            res = await backend.exec(["cat"], stdin=b"xyz", env={"A": "1"})
            assert (res.exit_code, res.stdout) == (0, b"xyz")
            res = await backend.exec(["sh", "-c", 'echo "$A"; pwd'], env={"A": "1"}, cwd="/tmp")
            assert res.stdout == b"1\n/tmp\n"
            res = await backend.exec(["sleep", "10"], timeout=0.2)
            assert res.timed_out and res.exit_code != 0

            # Guest failures come back typed: the guest's kind, the user's text unchanged.
            with pytest.raises(GuestError, match=r"^guest add_vpci: vPCI device g: ") as err:
                await backend.add_vpci("g")
            assert (err.value.op, err.value.kind) == ("add_vpci", ErrorKind.UNSUPPORTED)
            with pytest.raises(GuestError, match=r"^guest exec: exec /nope: ") as err:
                await backend.exec(["/nope"])
            assert err.value.kind is ErrorKind.NOT_FOUND
            with pytest.raises(GuestError, match="container nope does not exist") as err:
                await client.container_start("nope")
            assert err.value.kind is ErrorKind.NOT_FOUND
            with pytest.raises(GuestError, match="outside") as err:
                await backend.sandbox_dir("sb", "../../etc")
            assert err.value.kind is ErrorKind.INVALID

            # Many concurrent requests, each gets its own answer.
            results = await asyncio.gather(*(backend.exec(["echo", str(i)]) for i in range(20)))
            assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]

            await backend.shutdown()
        finally:
            await client.close()
        assert client.closed
        assert _state(client.connection) is RunState.CLOSED
        with pytest.raises(AgentConnectionError, match="^guest ping: agent connection closed"):
            await client.ping()

    asyncio.run(main())


def test_connect_times_out_without_socket(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(BackendError, match="agent socket"):
            await AgentClient.connect(tmp_path / "missing.sock", timeout=0.2)

    asyncio.run(main())


def test_connect_times_out_without_answer(tmp_path: Path) -> None:
    """QEMU accepts the connection long before the guest answers; give up at the deadline."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    async def main() -> None:
        with pytest.raises(BackendError, match="guest hello: no answer"):
            await AgentClient.connect(path, timeout=0.3)

    try:
        asyncio.run(main())
    finally:
        listener.close()


def test_connection_loss_fails_pending_requests(tmp_path: Path) -> None:
    path = tmp_path / "dying.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def fake_guest() -> None:
        conn, _ = listener.accept()
        dec = FrameDecoder()
        hello: list[dict[str, object]] = []
        while not hello:
            hello = dec.feed(conn.recv(4096))
        conn.sendall(encode_frame({"id": hello[0]["id"], "ok": True,
                                   "result": {"version": PROTOCOL_VERSION}}))
        dec.feed(conn.recv(4096))  # the next request: never answered
        conn.close()

    t = threading.Thread(target=fake_guest, daemon=True)
    t.start()

    async def main() -> None:
        client = await AgentClient.connect(path, timeout=5)
        with pytest.raises(AgentConnectionError, match="guest ping: .*closed the connection"):
            await client.ping()
        await client.close()

    try:
        asyncio.run(main())
    finally:
        t.join(5)
        listener.close()


def _state(conn: AgentConnection) -> RunState:
    return conn.state  # (a call: the type checker does not carry narrowing across it)


def test_run_state_guards(tmp_path: Path) -> None:
    """Requests outside RUNNING fail with a project error (not an assert); CLOSED is final."""
    async def main() -> None:
        conn = AgentConnection(tmp_path / "never.sock")
        assert conn.state is RunState.IDLE
        with pytest.raises(AgentConnectionError, match="guest ping: .* is idle, not running"):
            await conn.request(Ping())
        with pytest.raises(AgentConnectionError, match="agent socket"):
            await conn.open(timeout=0.1)
        assert _state(conn) is RunState.CLOSED
        with pytest.raises(AgentConnectionError, match="open it only once"):
            await conn.open(timeout=0.1)
        await conn.close()  # closing twice is fine

    asyncio.run(main())


def test_open_twice_is_refused(agent_socket: Path) -> None:
    async def main() -> None:
        conn = AgentConnection(agent_socket)
        await conn.open(timeout=5)
        try:
            with pytest.raises(AgentConnectionError, match="is running: open it only once"):
                await conn.open(timeout=5)
        finally:
            await conn.close()

    asyncio.run(main())


class _FakeGuest:
    """A scripted guest: answers hello, then runs ``script(conn, request)`` per request."""

    def __init__(self, path: Path,
                 script: Callable[[socket.socket, dict[str, Any]], None]) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.script = script
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            dec = FrameDecoder()
            while chunk := conn.recv(65536):
                for req in dec.feed(chunk):
                    if req["op"] == "hello":
                        conn.sendall(encode_frame({"id": req["id"], "ok": True,
                                                   "result": {"version": PROTOCOL_VERSION}}))
                    else:
                        self.script(conn, req)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def _with_fake_guest(tmp_path: Path, script: Callable[[socket.socket, dict[str, Any]], None],
                     check: Callable[[AgentClient], Awaitable[None]]) -> None:
    """Run ``check`` with a client connected to a :class:`_FakeGuest` answering by ``script``;
    close both afterwards."""
    guest = _FakeGuest(tmp_path / "fake.sock", script)

    async def main() -> None:
        client = await AgentClient.connect(tmp_path / "fake.sock", timeout=5)
        try:
            await check(client)
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        guest.close()


def test_one_routing_table_for_requests_and_processes(tmp_path: Path) -> None:
    """Exec output is routed by request id (ended by the response), container output by process
    key (ended by the exit event); events for nobody are dropped."""
    def script(conn: socket.socket, req: dict[str, Any]) -> None:
        rid = req["id"]

        def send(obj: dict[str, Any]) -> None:
            conn.sendall(encode_frame(obj))

        if req["op"] == "exec":
            send(OutputEvent(id=rid, stream="stdout", data=b"by id").to_event().to_json())
            send(OutputEvent(id=rid + 1000, stream="stdout", data=b"nobody").to_event().to_json())
            send({"id": rid, "ok": True, "result": {"exit_code": 3, "timed_out": False}})
        elif req["op"] == "container_exec":
            key = f"{req['args']['container_id']}/{req['args']['exec_id']}"
            send({"id": rid, "ok": True, "result": None})
            send(OutputEvent(process=key, stream="stderr", data=b"by key").to_event().to_json())
            send(ExitEvent(process=key, exit_code=9).to_event().to_json())
        elif req["op"] in ("container_create", "container_delete"):
            send({"id": rid, "ok": True, "result": None})
        else:
            send({"id": rid, "ok": False, "error": {"kind": "busy", "message": "in use"}})

    async def check(client: AgentClient) -> None:
        res = await client.exec(["x"])
        assert (res.exit_code, res.stdout) == (3, b"by id")
        proc = await client.container_exec("c", "e1", {"args": ["x"]})
        assert [c async for c in proc.output()] == [("stderr", b"by key")]
        assert await proc.wait() == 9
        assert not client.connection.watching("c/e1")
        with pytest.raises(GuestError, match="^guest container_start: in use$") as err:
            await client.container_start("c")
        assert err.value.kind is ErrorKind.BUSY
        # An init that never started is forgotten when its container is deleted.
        init = await client.container_create("c", "/b", {})
        with pytest.raises(BackendError, match="already has an init"):
            await client.container_create("c", "/b", {})
        await client.container_delete("c")
        with pytest.raises(BackendError, match="deleted before c exited"):
            await init.wait()

    _with_fake_guest(tmp_path, script, check)


def test_connection_loss_ends_process_routes(tmp_path: Path) -> None:
    def script(conn: socket.socket, req: dict[str, Any]) -> None:
        conn.sendall(encode_frame({"id": req["id"], "ok": True, "result": None}))
        if req["op"] == "container_start":
            conn.shutdown(socket.SHUT_RDWR)

    async def check(client: AgentClient) -> None:
        init = await client.container_create("c", "/b", {})
        await client.container_start("c")
        with pytest.raises(AgentConnectionError, match="closed the connection"):
            await init.wait()
        assert [c async for c in init.output()] == []
        assert client.connection.state is RunState.CLOSED

    _with_fake_guest(tmp_path, script, check)
