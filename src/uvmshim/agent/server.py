"""The agent's request loop over the virtio-serial port. STDLIB ONLY.

Threads, not asyncio: importing asyncio costs a few hundred milliseconds under TCG at every
boot (for the same reason ``subprocess`` and ``base64`` are imported on first use), and every
request here is a blocking syscall or child process anyway. The reader thread decodes frames
and starts one worker thread per request, so a long ``exec`` never blocks a mount; all writes
go through one lock so frames never interleave.

The port behaves like a pipe whose far end comes and goes: while no host client is connected
``read()`` returns EOF (we poll), and ``write()`` blocks until one connects.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from uvmshim.agent.kmods import ModuleLoader
from uvmshim.agent.runtime import Runtime
from uvmshim.agent.storage import Storage
from uvmshim.agent.util import AgentError, run
from uvmshim.protocol.framing import FrameDecoder, encode_frame
from uvmshim.protocol.messages import (
    PROTOCOL_VERSION,
    Event,
    EventKind,
    Op,
    ProtocolError,
    Request,
    Response,
    parse_message,
)

# Not ``from typing import TYPE_CHECKING``: that imports typing (tens of ms of guest boot under
# TCG). Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings anyway
    from collections.abc import Callable
    from typing import Any

    Handler = Callable[[Request], Any]

#: Largest chunk of process output per event.
OUTPUT_CHUNK = 32 * 1024

#: How long to sleep after EOF (no host connected) before reading again.
EOF_POLL_INTERVAL = 0.02

#: The default environment of ``exec``'d processes.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return -1.0


class Server:
    """Serve requests on the file descriptor ``fd`` (opened O_RDWR).

    :param fd: the port (or, in tests, one end of a socketpair).
    :param storage: performs the mount requests.
    :param eof_is_final: stop at EOF instead of waiting for a host to (re)connect.
    :param poweroff: called after a ``shutdown`` response was sent.
    """

    def __init__(self, fd: int, storage: Storage, *, eof_is_final: bool = False,
                 poweroff: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._storage = storage
        self._eof_is_final = eof_is_final
        self._poweroff = poweroff or _poweroff
        self._write_lock = threading.Lock()
        self._started = _uptime()
        self._runtime = Runtime(storage, lambda name, fields: self.send(
            Event(name, fields).to_json()))
        rt = self._runtime
        self._handlers: dict[str, Handler] = {
            Op.HELLO: self._hello,
            Op.PING: lambda _r: {"uptime": _uptime()},
            Op.MOUNT_SCSI: lambda r: storage.mount_scsi(
                _i(r, "controller"), _i(r, "lun"), _s(r, "guest_path"),
                read_only=bool(r.args.get("read_only")), options=_strs(r, "options")),
            Op.UNMOUNT_SCSI: lambda r: storage.unmount_scsi(
                _i(r, "controller"), _i(r, "lun"), _s(r, "guest_path")),
            Op.MOUNT_PLAN9: lambda r: storage.mount_plan9(
                _s(r, "name"), _s(r, "guest_path"), read_only=bool(r.args.get("read_only"))),
            Op.UNMOUNT_PLAN9: lambda r: storage.unmount_plan9(_s(r, "name"),
                                                              _s(r, "guest_path")),
            Op.MOUNT_VPMEM: lambda r: storage.mount_vpmem(_i(r, "device"), _s(r, "guest_path")),
            Op.UNMOUNT_VPMEM: lambda r: storage.unmount_vpmem(_i(r, "device"),
                                                              _s(r, "guest_path")),
            Op.ADD_VPCI: self._add_vpci,
            Op.COMBINE_LAYERS: lambda r: storage.combine_layers(
                _s(r, "container_id"), _s(r, "rootfs"), _strs(r, "layers"),
                _s(r, "scratch_dir")),
            Op.REMOVE_COMBINED_LAYERS: lambda r: storage.remove_combined_layers(_s(r, "rootfs")),
            Op.SANDBOX_DIR: lambda r: storage.sandbox_dir(_s(r, "sandbox_id"), _s(r, "path")),
            Op.HUGEPAGES_DIR: lambda r: storage.hugepages_dir(_s(r, "sandbox_id"),
                                                              _s(r, "path")),
            Op.INSTALL_DRIVERS: self._install_drivers,
            Op.EXEC: self._exec,
            Op.SHUTDOWN: lambda _r: None,
            Op.CONTAINER_CREATE: lambda r: rt.create(
                _s(r, "container_id"), _s(r, "bundle"), _obj(r, "spec"),
                sandbox_id=_s(r, "sandbox_id"), scratch_dir=_s(r, "scratch_dir"),
                stdin=bool(r.args.get("stdin"))),
            Op.CONTAINER_START: lambda r: rt.start(_s(r, "container_id")),
            Op.CONTAINER_EXEC: lambda r: rt.exec(
                _s(r, "container_id"), _s(r, "exec_id"), _obj(r, "process"),
                stdin=bool(r.args.get("stdin"))),
            Op.CONTAINER_SIGNAL: lambda r: rt.signal(
                _s(r, "container_id"), _i(r, "signal"),
                all_processes=bool(r.args.get("all_processes"))),
            Op.CONTAINER_DELETE: lambda r: rt.delete(_s(r, "container_id")),
            Op.PROCESS_STDIN: self._process_stdin,
        }

    # I/O ---------------------------------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        """Write one frame (thread-safe)."""
        data = encode_frame(obj)
        with self._write_lock:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    def serve(self) -> None:
        """Read and dispatch requests until EOF (if ``eof_is_final``) or forever."""
        decoder = FrameDecoder()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except InterruptedError:
                continue
            if not data:
                if self._eof_is_final:
                    return
                # No host client right now. Whatever partial frame the last client left is
                # garbage for the next one.
                decoder.reset()
                time.sleep(EOF_POLL_INTERVAL)
                continue
            try:
                frames = decoder.feed(data)
            except ProtocolError as err:
                print(f"uvmshim-agent: {err}; dropping buffered input", file=sys.stderr)
                decoder.reset()
                continue
            for frame in frames:
                self._dispatch(frame)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        try:
            msg = parse_message(frame)
        except ProtocolError as err:
            rid = frame.get("id")
            if isinstance(rid, int):
                self.send(Response(rid, False, error=f"bad request: {err}").to_json())
            return
        if not isinstance(msg, Request):
            return  # the host sends only requests; ignore anything else
        threading.Thread(target=self._handle, args=(msg,), daemon=True,
                         name=f"req-{msg.id}-{msg.op}").start()

    def _handle(self, req: Request) -> None:
        if req.version != PROTOCOL_VERSION:
            reply = Response(req.id, False, error=(
                f"protocol version mismatch: host {req.version}, guest {PROTOCOL_VERSION}"))
        elif req.op not in self._handlers:
            reply = Response(req.id, False, error=f"unknown operation {req.op!r}")
        else:
            try:
                reply = Response(req.id, True, self._handlers[req.op](req))
            except AgentError as err:
                reply = Response(req.id, False, error=str(err))
            except Exception as err:  # a bug must not kill the agent; tell the host
                reply = Response(req.id, False, error=f"internal error: {err!r}")
        try:
            self.send(reply.to_json())
        except ProtocolError as err:
            self.send(Response(req.id, False, error=f"reply not sendable: {err}").to_json())
        if req.op == Op.SHUTDOWN and reply.ok:
            self._poweroff()

    # Handlers ----------------------------------------------------------------------------------

    def _hello(self, req: Request) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "agent": "uvmshim-agent", "pid": os.getpid(),
                "uptime": _uptime(), "agent_started": self._started,
                "init_started": float(os.environ.get("UVMSHIM_T_INIT", "-1") or -1)}

    def _add_vpci(self, req: Request) -> None:
        # The host side would assign a VFIO device; this guest has no mapping from a VMBus
        # GUID to a PCI function and no drivers for pass-through hardware.
        raise AgentError(f"vPCI device {_s(req, 'vmbus_guid')}: assigned PCI devices are not "
                         "supported by this guest")

    def _install_drivers(self, req: Request) -> None:
        tool = "/bin/install-drivers"
        if not os.access(tool, os.X_OK):
            raise AgentError(f"{tool} is not present in this guest")
        rw_path, disk_path = _s(req, "rw_path"), _s(req, "disk_path")
        os.makedirs(rw_path, exist_ok=True)
        try:
            run([tool, rw_path, disk_path], timeout=600)
        except AgentError as err:
            raise AgentError(f"install-drivers {rw_path} {disk_path}: {err}") from None

    def _process_stdin(self, req: Request) -> None:
        import base64

        self._runtime.write_stdin(_s(req, "process"), base64.b64decode(_s(req, "data")),
                                  eof=bool(req.args.get("eof")))

    def _exec(self, req: Request) -> dict[str, Any]:
        argv = _strs(req, "argv")
        if not argv:
            raise AgentError("exec needs a non-empty argv")
        env = dict(BASE_ENV)
        raw_env = req.args.get("env") or {}
        if not isinstance(raw_env, dict):
            raise AgentError("exec env must be an object")
        env.update({str(k): str(v) for k, v in raw_env.items()})
        import base64
        import subprocess

        cwd = req.args.get("cwd") or "/"
        stdin_data = base64.b64decode(req.args.get("stdin") or "")
        timeout = req.args.get("timeout")
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin_data else
                subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError as err:
            raise AgentError(f"exec {argv[0]}: {err.strerror or err}") from None
        pumps = [threading.Thread(target=self._pump, args=(req.id, name, pipe), daemon=True)
                 for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for t in pumps:
            t.start()
        if stdin_data and proc.stdin is not None:
            try:
                proc.stdin.write(stdin_data)
                proc.stdin.close()
            except OSError:
                pass  # the process did not read its input; its exit status tells the story
        timed_out = False
        try:
            rc = proc.wait(timeout=float(timeout) if timeout else None)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            rc = proc.wait()
        # Every output event must be on the wire before the response, which ends the stream.
        for t in pumps:
            t.join()
        return {"exit_code": rc, "timed_out": timed_out}

    def _pump(self, rid: int, stream: str, pipe: Any) -> None:
        import base64

        fd = pipe.fileno()
        while True:
            chunk = os.read(fd, OUTPUT_CHUNK)
            if not chunk:
                break
            self.send(Event(EventKind.OUTPUT, {
                "id": rid, "stream": stream, "data": base64.b64encode(chunk).decode("ascii"),
            }).to_json())
        pipe.close()


def _poweroff() -> None:
    import subprocess

    os.sync()
    # -f: straight to the reboot(2) syscall; QEMU (with -no-reboot) then exits.
    subprocess.run(["poweroff", "-f"], check=False)


def _s(req: Request, key: str) -> str:
    value = req.args.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AgentError(f"{req.op}: {key} must be a string")
    return value


def _i(req: Request, key: str) -> int:
    value = req.args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AgentError(f"{req.op}: {key} must be a non-negative integer")
    return value


def _obj(req: Request, key: str) -> dict[str, Any]:
    value = req.args.get(key)
    if not isinstance(value, dict):
        raise AgentError(f"{req.op}: {key} must be an object")
    return value


def _strs(req: Request, key: str) -> list[str]:
    value = req.args.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AgentError(f"{req.op}: {key} must be a list of strings")
    return list(value)


def make_server(fd: int, **kw: Any) -> Server:
    """A :class:`Server` with the real guest storage and module loader."""
    return Server(fd, Storage(ModuleLoader()), **kw)
