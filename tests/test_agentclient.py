"""AgentClient and AgentGuestBackend against the real agent server, on a unix socket."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmshim.agent import kmods
from uvmshim.agent.server import Server
from uvmshim.agent.storage import Storage
from uvmshim.agentclient import AgentClient, AgentGuestBackend
from uvmshim.errors import BackendError
from uvmshim.uvm.backend import GuestBackend


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
        assert client.guest_info["version"] == 1
        backend = AgentGuestBackend(client)
        _typed: GuestBackend = backend  # mypy checks the Protocol is implemented
        try:
            assert "uptime" in await client.request("ping")

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

            with pytest.raises(BackendError, match=r"^guest add_vpci: vPCI device g: "):
                await backend.add_vpci("g")
            with pytest.raises(BackendError, match=r"^guest exec: exec /nope: "):
                await backend.exec(["/nope"])
            with pytest.raises(BackendError, match="unknown operation"):
                await client.request("frobnicate")

            # Many concurrent requests, each gets its own answer.
            results = await asyncio.gather(*(backend.exec(["echo", str(i)]) for i in range(20)))
            assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]

            await backend.shutdown()
        finally:
            await client.close()
        assert client.closed
        with pytest.raises(BackendError, match="closed"):
            await client.request("ping")

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
        from uvmshim.protocol import FrameDecoder, encode_frame

        conn, _ = listener.accept()
        dec = FrameDecoder()
        hello: list[dict[str, object]] = []
        while not hello:
            hello = dec.feed(conn.recv(4096))
        conn.sendall(encode_frame({"id": hello[0]["id"], "ok": True,
                                   "result": {"version": 1}}))
        dec.feed(conn.recv(4096))  # the next request: never answered
        conn.close()

    t = threading.Thread(target=fake_guest, daemon=True)
    t.start()

    async def main() -> None:
        client = await AgentClient.connect(path, timeout=5)
        with pytest.raises(BackendError, match="guest ping: .*closed the connection"):
            await client.request("ping")
        await client.close()

    try:
        asyncio.run(main())
    finally:
        t.join(5)
        listener.close()
