"""Host-side client of the guest agent, over QEMU's virtio-serial chardev socket.

QEMU is started with ``-chardev socket,id=agent,path=<sock>,server=on,wait=off`` and
``-device virtserialport,chardev=agent,name=agent``: QEMU listens on ``<sock>`` and serves
**one** client at a time (a second connection is accepted but never served). Bytes the host
writes before the guest opens its port wait in the socket, so :meth:`AgentClient.connect` can
send ``hello`` at once and simply wait for the answer.

Usage::

    client = await AgentClient.connect(sock, timeout=30)
    await client.request("ping")
    proc = await client.start_exec(["cat", "/proc/mounts"])
    async for stream, data in proc.output():
        ...
    rc = await proc.wait()
    await client.close()

:class:`AgentGuestBackend` implements :class:`uvmshim.uvm.backend.GuestBackend` on top.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from uvmshim.errors import BackendError
from uvmshim.protocol import (
    PROTOCOL_VERSION,
    Event,
    EventKind,
    Op,
    ProtocolError,
    Request,
    Response,
    encode_frame,
    parse_message,
    read_frame,
)
from uvmshim.uvm.backend import LayerRef

log = logging.getLogger(__name__)

#: Default time a single request may take (mounts wait up to 5 s for a hot-plugged disk).
DEFAULT_REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True)
class ExecResult:
    """What a finished ``exec`` produced."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


async def _drain(
    queue: asyncio.Queue[tuple[str, bytes] | None],
) -> AsyncIterator[tuple[str, bytes]]:
    """The items of a process's output queue, up to the ``None`` that ends it."""
    while (item := await queue.get()) is not None:
        yield item


class ExecProcess:
    """A command running in the guest; iterate :meth:`output`, then :meth:`wait`."""

    def __init__(self, argv: Sequence[str], queue: asyncio.Queue[tuple[str, bytes] | None],
                 done: asyncio.Future[Any]) -> None:
        self.argv = list(argv)
        self._queue = queue
        self._done = done
        self.timed_out = False

    def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(stream, data)`` chunks (``stream`` is ``stdout`` or ``stderr``) as they come.

        Ends when the process has exited and all of its output was delivered.
        """
        return _drain(self._queue)

    async def wait(self) -> int:
        """Return the exit status (negative: killed by that signal).

        :raises BackendError: if the guest could not start the command.
        """
        result = await self._done
        self.timed_out = bool(result.get("timed_out"))
        return int(result["exit_code"])


class ContainerProcess:
    """A process in a guest container (its init, or an exec), named by a process key.

    Its output and exit arrive as events; iterate :meth:`output`, then :meth:`wait`.
    """

    def __init__(self, client: AgentClient, key: str) -> None:
        self.client = client
        self.key = key
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(stream, data)`` chunks as they come; ends when the process has exited."""
        return _drain(self._queue)

    async def wait(self) -> int:
        """Return the exit status (crun reports 128+N for a process killed by signal N).

        :raises BackendError: if the connection to the agent was lost first.
        """
        return await self._exit

    async def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the process's stdin (the process must have been given one)."""
        await self.client.request(Op.PROCESS_STDIN, process=self.key,
                                  data=base64.b64encode(data).decode("ascii"), eof=False)

    async def close_stdin(self) -> None:
        """Close the process's stdin (it reads EOF)."""
        await self.client.request(Op.PROCESS_STDIN, process=self.key, data="", eof=True)

    def _output(self, stream: str, data: bytes) -> None:
        self._queue.put_nowait((stream, data))

    def _exited(self, code: int | BackendError) -> None:
        self._queue.put_nowait(None)
        if self._exit.done():
            return
        if isinstance(code, BackendError):
            self._exit.set_exception(code)
            self._exit.exception()  # mark retrieved: nobody may be waiting
        else:
            self._exit.set_result(code)


class AgentClient:
    """One connection to the guest agent. Create with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        # Ids start at a random point: after a reconnect, responses and events left over from
        # the previous connection must not match a new request.
        self._next_id = secrets.randbelow(1 << 30) + 1
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[tuple[str, bytes] | None]] = {}
        self._procs: dict[str, ContainerProcess] = {}
        self._write_lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None
        self._closed: BackendError | None = None
        self.guest_info: dict[str, Any] = {}

    # Section: connection ----------------------------------------------------------------------

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> AgentClient:
        """Connect to the chardev socket at ``path`` and complete the ``hello`` exchange.

        Retries while the socket does not exist or refuses connections (QEMU starting up),
        then waits for the guest agent to answer (the guest boots meanwhile).

        :raises BackendError: on timeout or a protocol version mismatch.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(os.fspath(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if loop.time() >= deadline:
                    raise BackendError(f"agent socket {os.fspath(path)}: {err}") from err
                await asyncio.sleep(0.02)
        client = cls(reader, writer)
        client._reader_task = asyncio.create_task(client._read_loop(), name="agent-reader")
        try:
            remaining = max(deadline - loop.time(), 0.1)
            info = await client.request(Op.HELLO, timeout=remaining, version=PROTOCOL_VERSION)
        except BaseException:
            await client.close()
            raise
        if not isinstance(info, dict) or info.get("version") != PROTOCOL_VERSION:
            await client.close()
            raise BackendError(f"guest agent speaks protocol {info!r}, not {PROTOCOL_VERSION}")
        client.guest_info = info
        return client

    async def close(self) -> None:
        """Close the connection; pending requests fail with BackendError."""
        self._fail_all(BackendError("agent connection closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    @property
    def closed(self) -> bool:
        """True once the connection is gone."""
        return self._closed is not None

    def _fail_all(self, err: BackendError) -> None:
        if self._closed is None:
            self._closed = err
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for q in self._streams.values():
            q.put_nowait(None)
        self._streams.clear()
        for proc in self._procs.values():
            proc._exited(err)
        self._procs.clear()

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader)
                if frame is None:
                    self._fail_all(BackendError("guest agent closed the connection"))
                    return
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
            self._fail_all(BackendError(f"agent connection lost: {err}"))

    def _on_response(self, msg: Response) -> None:
        fut = self._pending.pop(msg.id, None)
        if fut is None or fut.done():
            return  # left over from an earlier connection, or the caller gave up
        if msg.ok:
            fut.set_result(msg.result)
        else:
            fut.set_exception(_GuestFailure(msg.error))

    def _on_event(self, msg: Event) -> None:
        key = msg.fields.get("process")
        if isinstance(key, str):
            self._on_process_event(key, msg)
            return
        if msg.event != EventKind.OUTPUT:
            log.debug("guest event %s: %s", msg.event, msg.fields)
            return
        rid = msg.fields.get("id")
        q = self._streams.get(rid) if isinstance(rid, int) else None
        if q is None:
            return
        try:
            data = base64.b64decode(msg.fields.get("data", ""))
        except ValueError:
            return
        q.put_nowait((str(msg.fields.get("stream", "stdout")), data))

    def _on_process_event(self, key: str, msg: Event) -> None:
        proc = self._procs.get(key)
        if proc is None:
            return
        if msg.event == EventKind.OUTPUT:
            try:
                data = base64.b64decode(msg.fields.get("data", ""))
            except ValueError:
                return
            proc._output(str(msg.fields.get("stream", "stdout")), data)
        elif msg.event == EventKind.EXIT:
            del self._procs[key]
            code = msg.fields.get("exit_code")
            proc._exited(code if isinstance(code, int) else -1)

    # Section: requests -------------------------------------------------------------------------

    async def _send(self, op: str, args: Mapping[str, Any]) -> tuple[int, asyncio.Future[Any]]:
        if self._closed is not None:
            raise BackendError(f"guest {op}: {self._closed}")
        rid = self._next_id
        self._next_id += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("agent request %d: %s %s", rid, op, _brief(args))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            frame = encode_frame(Request(rid, op, dict(args)).to_json())
            async with self._write_lock:
                self._writer.write(frame)
                await self._writer.drain()
        except (ProtocolError, OSError, ConnectionError) as err:
            self._pending.pop(rid, None)
            raise BackendError(f"guest {op}: cannot send request: {err}") from err
        return rid, fut

    async def request(self, op: str, *, timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                      **args: Any) -> Any:
        """Send request ``op`` with ``args`` and return the guest's result.

        :raises BackendError: ``guest <op>: <guest's reason>`` if the guest refused or failed,
            or if the connection broke or ``timeout`` passed.
        """
        rid, fut = await self._send(op, args)
        try:
            return await asyncio.wait_for(fut, timeout)
        except _GuestFailure as err:
            raise BackendError(f"guest {op}: {err}") from None
        except TimeoutError:
            self._pending.pop(rid, None)
            raise BackendError(f"guest {op}: no answer after {timeout:g} s") from None
        except BackendError as err:
            raise BackendError(f"guest {op}: {err}") from None

    async def start_exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                         cwd: str | None = None, stdin: bytes = b"",
                         timeout: float | None = None) -> ExecProcess:
        """Start ``argv`` in the utility VM (not in a container); stream its output.

        :param env: variables added to the guest's default environment (PATH).
        :param timeout: the guest kills the command after this many seconds.
        """
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        args: dict[str, Any] = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd or "/",
                                "stdin": base64.b64encode(stdin).decode("ascii")}
        if timeout is not None:
            args["timeout"] = timeout
        # Register the stream before sending: the first output event may beat the await.
        rid = self._next_id
        self._streams[rid] = queue
        try:
            sent_id, fut = await self._send(Op.EXEC, args)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        assert sent_id == rid

        async def finish() -> Any:
            try:
                return await fut
            except _GuestFailure as err:
                raise BackendError(f"guest exec: {err}") from None
            finally:
                # The response follows every output event, so the stream is complete.
                q = self._streams.pop(rid, None)
                if q is not None:
                    q.put_nowait(None)

        done = asyncio.ensure_future(finish())
        # A caller cancelled before wait() never looks at the result; don't let asyncio report
        # the failure of a command nobody waits for any more.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return ExecProcess(argv, queue, done)

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


    # Section: containers ------------------------------------------------------------------

    async def _start_process(self, key: str, op: str, **args: Any) -> ContainerProcess:
        # Registered before the request goes out: output may arrive before the response.
        if key in self._procs:
            raise BackendError(f"guest {op}: process {key} is already running")
        proc = ContainerProcess(self, key)
        self._procs[key] = proc
        try:
            await self.request(op, **args)
        except BaseException:
            self._procs.pop(key, None)
            raise
        return proc

    async def container_create(self, container_id: str, bundle: str, spec: Mapping[str, Any],
                               *, sandbox_id: str = "", scratch_dir: str = "",
                               stdin: bool = False) -> ContainerProcess:
        """Prepare container ``container_id`` in the guest: write ``<bundle>/config.json``.

        :param spec: the rewritten (guest-path) OCI spec; ``sandbox://``/``hugepages://``
            mount sources are resolved by the guest for ``sandbox_id``.
        :param stdin: give the init process a stdin (see :meth:`ContainerProcess.write_stdin`).
        :returns: the init process; its output starts after :meth:`container_start`.
        """
        proc = ContainerProcess(self, container_id)
        if container_id in self._procs:
            raise BackendError(f"guest container_create: {container_id} already has an init")
        await self.request(Op.CONTAINER_CREATE, container_id=container_id, bundle=bundle,
                           spec=dict(spec), sandbox_id=sandbox_id, scratch_dir=scratch_dir,
                           stdin=stdin)
        self._procs[container_id] = proc
        return proc

    async def container_start(self, container_id: str) -> None:
        """Start the container's init process (``crun run`` in the guest)."""
        await self.request(Op.CONTAINER_START, container_id=container_id)

    async def container_exec(self, container_id: str, exec_id: str,
                             process: Mapping[str, Any], *,
                             stdin: bool = False) -> ContainerProcess:
        """Run ``process`` (an OCI process object) in the running container."""
        return await self._start_process(f"{container_id}/{exec_id}", Op.CONTAINER_EXEC,
                                         container_id=container_id, exec_id=exec_id,
                                         process=dict(process), stdin=stdin)

    async def container_signal(self, container_id: str, signal: int, *,
                               all_processes: bool = False) -> None:
        """Send ``signal`` to the container's init (or all its processes)."""
        await self.request(Op.CONTAINER_SIGNAL, container_id=container_id, signal=signal,
                           all_processes=all_processes)

    async def container_delete(self, container_id: str) -> None:
        """Kill (if needed) and delete the container in the guest.

        Its processes that never reported an exit (e.g. an init that was never started) are
        forgotten, so the id can be used again.
        """
        await self.request(Op.CONTAINER_DELETE, container_id=container_id)
        for key in [k for k in self._procs if k == container_id or
                    k.startswith(container_id + "/")]:
            self._procs.pop(key)._exited(
                BackendError(f"container {container_id} was deleted before {key} exited"))


class _GuestFailure(Exception):
    """The guest answered ``ok: false`` (internal; surfaced as BackendError)."""


class AgentGuestBackend:
    """:class:`uvmshim.uvm.backend.GuestBackend` over an :class:`AgentClient`."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    async def mount_scsi(self, controller: int, lun: int, guest_path: str, *, read_only: bool,
                         options: Sequence[str]) -> None:
        """Mount the disk at (controller, LUN) on ``guest_path`` (attach only if empty)."""
        await self.client.request(Op.MOUNT_SCSI, controller=controller, lun=lun,
                                  guest_path=guest_path, read_only=read_only,
                                  options=list(options))

    async def unmount_scsi(self, controller: int, lun: int, guest_path: str) -> None:
        """Unmount ``guest_path`` (if non-empty) and let go of the disk."""
        await self.client.request(Op.UNMOUNT_SCSI, controller=controller, lun=lun,
                                  guest_path=guest_path)

    async def mount_plan9(self, name: str, guest_path: str, *, read_only: bool) -> None:
        """Mount share ``name`` on ``guest_path``."""
        await self.client.request(Op.MOUNT_PLAN9, name=name, guest_path=guest_path,
                                  read_only=read_only)

    async def unmount_plan9(self, name: str, guest_path: str) -> None:
        """Unmount share ``name`` from ``guest_path``."""
        await self.client.request(Op.UNMOUNT_PLAN9, name=name, guest_path=guest_path)

    async def mount_vpmem(self, device: int, guest_path: str) -> None:
        """Mount ``/dev/pmem<device>`` read-only on ``guest_path``."""
        await self.client.request(Op.MOUNT_VPMEM, device=device, guest_path=guest_path)

    async def unmount_vpmem(self, device: int, guest_path: str) -> None:
        """Unmount vPMEM device ``device``."""
        await self.client.request(Op.UNMOUNT_VPMEM, device=device, guest_path=guest_path)

    async def add_vpci(self, vmbus_guid: str) -> None:
        """Wait for an assigned PCI device (this guest refuses: no VFIO support)."""
        await self.client.request(Op.ADD_VPCI, vmbus_guid=vmbus_guid)

    async def combine_layers(self, container_id: str, rootfs: str, layers: Sequence[LayerRef],
                             scratch_dir: str) -> None:
        """Overlay ``layers`` (top-most first) on ``rootfs`` with upper/work in ``scratch_dir``."""
        await self.client.request(Op.COMBINE_LAYERS, container_id=container_id, rootfs=rootfs,
                                  layers=[layer.path for layer in layers],
                                  scratch_dir=scratch_dir)

    async def remove_combined_layers(self, rootfs: str) -> None:
        """Unmount the overlay on ``rootfs``."""
        await self.client.request(Op.REMOVE_COMBINED_LAYERS, rootfs=rootfs)

    async def install_drivers(self, rw_path: str, disk_path: str) -> None:
        """Run ``/bin/install-drivers <rw_path> <disk_path>`` in the UVM."""
        await self.client.request(Op.INSTALL_DRIVERS, rw_path=rw_path, disk_path=disk_path,
                                  timeout=None)

    async def sandbox_dir(self, sandbox_id: str, path: str) -> str:
        """Create and return the guest directory of ``sandbox://<path>``."""
        return str(await self.client.request(Op.SANDBOX_DIR, sandbox_id=sandbox_id, path=path))

    async def hugepages_dir(self, sandbox_id: str, path: str) -> str:
        """Create the hugetlbfs-backed guest directory of ``hugepages://<path>``."""
        return str(await self.client.request(Op.HUGEPAGES_DIR, sandbox_id=sandbox_id,
                                             path=path))

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, stdin: bytes = b"",
                   timeout: float | None = None) -> ExecResult:
        """Run a diagnostic command in the UVM and collect its output."""
        return await self.client.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)

    async def shutdown(self) -> None:
        """Ask the guest to sync and power off (QEMU then exits, with ``-no-reboot``)."""
        await self.client.request(Op.SHUTDOWN, timeout=10.0)


def _brief(args: Mapping[str, Any], limit: int = 300) -> str:
    """``args`` for a debug line, cut short (a spec or stdin chunk can be large)."""
    text = repr(dict(args))
    return text if len(text) <= limit else text[:limit] + "…"
