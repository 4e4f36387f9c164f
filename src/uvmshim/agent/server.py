"""The agent's request loop over the virtio-serial port. STDLIB ONLY.

Threads, not asyncio: importing asyncio costs a few hundred milliseconds under TCG at every
boot (for the same reason ``subprocess`` is imported on first use), and every request here is a
blocking syscall or child process anyway. The reader thread decodes frames and starts one worker
thread per request, so a long ``exec`` never blocks a mount; all writes go through one lock so
frames never interleave.

Each request's arguments are checked into their typed structure
(:mod:`uvmshim.protocol.requests`) before a handler sees them; every failure goes back as an
:class:`~uvmshim.protocol.messages.ErrorKind` and a message.

The port behaves like a pipe whose far end comes and goes: while no host client is connected
``read()`` returns EOF (we poll), and ``write()`` blocks until one connects.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from uvmshim.agent.kmods import MODULE_GROUPS, ModuleLoader
from uvmshim.agent.network import Network
from uvmshim.agent.runtime import Runtime
from uvmshim.agent.storage import Storage
from uvmshim.agent.util import AgentError, run
from uvmshim.protocol.events import OutputEvent
from uvmshim.protocol.framing import FrameDecoder, encode_frame
from uvmshim.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorKind,
    Op,
    ProtocolError,
    Request,
    Response,
    parse_message,
)
from uvmshim.protocol.requests import (
    REQUEST_TYPES,
    AddVpci,
    Exec,
    ExecStatus,
    FreshStart,
    Hello,
    InstallDrivers,
    LoadModules,
    Ping,
    ProcessStdin,
    Shutdown,
    decode_request,
)
from uvmshim.protocol.schema import Struct

# Not ``from typing import TYPE_CHECKING``: that imports typing (tens of ms of guest boot under
# TCG). Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings anyway
    from collections.abc import Callable
    from typing import Any

    #: Performs one operation: its typed arguments in, its JSON result out.
    Handler = Callable[[Any], object]

#: Largest chunk of process output per event.
OUTPUT_CHUNK = 32 * 1024

#: How long to sleep after EOF (no host connected) before reading again.
EOF_POLL_INTERVAL = 0.005

#: How long the port must stay closed before a partial frame is dropped (see ``serve``).
STALE_PARTIAL_FRAME = 1.0

#: ``ioctl``s of the random device (linux/random.h): ``_IOW('R', 3, int[2])``, ``_IO('R', 7)``.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

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
    :param modules: loads kernel modules for ``load_modules`` (default: the initrd's).
    """

    def __init__(self, fd: int, storage: Storage, *, eof_is_final: bool = False,
                 poweroff: Callable[[], None] | None = None,
                 modules: ModuleLoader | None = None) -> None:
        self._fd = fd
        self._modules = modules or ModuleLoader()
        self._storage = storage
        self._eof_is_final = eof_is_final
        self._poweroff = poweroff or _poweroff
        self._write_lock = threading.Lock()
        self._started = _uptime()
        self._runtime = Runtime(storage, lambda event: self.send(event.to_event().to_json()))
        rt = self._runtime
        net = self._network = Network(self._modules)
        # Every operation but exec (whose output events carry the request id; see _answer).
        self._handlers: dict[str, Handler] = {
            Op.HELLO: self._hello,
            Op.PING: self._ping,
            Op.MOUNT_SCSI: storage.mount_scsi,
            Op.UNMOUNT_SCSI: storage.unmount_scsi,
            Op.MOUNT_PLAN9: storage.mount_plan9,
            Op.UNMOUNT_PLAN9: storage.unmount_plan9,
            Op.MOUNT_PLAN9_BATCH: storage.mount_plan9_batch,
            Op.UNMOUNT_PLAN9_BATCH: storage.unmount_plan9_batch,
            Op.MOUNT_VPMEM: storage.mount_vpmem,
            Op.UNMOUNT_VPMEM: storage.unmount_vpmem,
            Op.VERITY_STATUS: storage.verity_status,
            Op.ADD_VPCI: self._add_vpci,
            Op.COMBINE_LAYERS: storage.combine_layers,
            Op.REMOVE_COMBINED_LAYERS: storage.remove_combined_layers,
            Op.SANDBOX_DIR: storage.sandbox_dir,
            Op.HUGEPAGES_DIR: storage.hugepages_dir,
            Op.INSTALL_DRIVERS: self._install_drivers,
            Op.SHUTDOWN: self._shutdown,
            Op.FRESH_START: self._fresh_start,
            Op.LOAD_MODULES: self._load_modules,
            Op.CONTAINER_CREATE: rt.create,
            Op.CONTAINER_START: rt.start,
            Op.CONTAINER_EXEC: rt.exec,
            Op.CONTAINER_SIGNAL: rt.signal,
            Op.CONTAINER_DELETE: rt.delete,
            Op.CONTAINER_UPDATE: rt.update,
            Op.CONTAINER_STATS: rt.stats,
            Op.PROCESS_STDIN: self._process_stdin,
            Op.PROCESS_RESIZE: rt.resize,
            Op.ADD_NETNS: net.add_netns,
            Op.REMOVE_NETNS: net.remove_netns,
            Op.ADD_NIC: net.add_nic,
            Op.REMOVE_NIC: net.remove_nic,
            Op.PARK_READY_NIC: net.park_bound,
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

    def _read(self) -> bytes:
        """One read of the port (b"" when no host is connected at this instant)."""
        return os.read(self._fd, 65536)

    def serve(self) -> None:
        """Read and dispatch requests until EOF (if ``eof_is_final``) or forever.

        A read of the port returns EOF whenever the guest believes no host is connected at
        that instant and nothing is queued. That is also the case for a moment after a host
        connects: its data arrives on the port's data queue, the "host connected" message on
        the control queue, handled later by a kernel worker; a frame longer than one port
        buffer (4 KiB) or written in pieces then reads as head, EOF, tail. A partial frame is
        therefore kept across EOF and dropped only when the port stays closed for
        :data:`STALE_PARTIAL_FRAME` seconds (its host is gone; the VM dies with its owner, so
        no other host comes in the meantime). Dropping it at the first EOF lost the head of
        such a frame: the request was never answered and the stream out of step.
        """
        decoder = FrameDecoder()
        eof_since: float | None = None
        while True:
            try:
                data = self._read()
            except InterruptedError:
                continue
            if not data:
                if self._eof_is_final:
                    return
                now = time.monotonic()
                if eof_since is None:
                    eof_since = now
                elif decoder.pending and now - eof_since >= STALE_PARTIAL_FRAME:
                    print(f"uvmshim-agent: dropping {decoder.pending} bytes of a partial frame "
                          "(the host went away)", file=sys.stderr)
                    decoder.reset()
                time.sleep(EOF_POLL_INTERVAL)
                continue
            eof_since = None
            try:
                frames = decoder.feed(data)
            except ProtocolError as err:
                print(f"uvmshim-agent: {err}; dropping buffered input", file=sys.stderr)
                decoder.reset()
                continue
            for frame in frames:
                try:
                    self._dispatch(frame)
                except Exception as err:  # the reader must live on: the host waits on it
                    print(f"uvmshim-agent: dispatching a request: {err!r}", file=sys.stderr)
                    rid = frame.get("id")
                    if isinstance(rid, int):
                        self._send_quietly(Response.failure(
                            rid, ErrorKind.INTERNAL, f"internal error: {err!r}").to_json())

    def _send_quietly(self, obj: dict[str, Any]) -> None:
        try:
            self.send(obj)
        except (OSError, ProtocolError) as err:
            print(f"uvmshim-agent: cannot send an answer: {err!r}", file=sys.stderr)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        try:
            msg = parse_message(frame)
        except ProtocolError as err:
            rid = frame.get("id")
            if isinstance(rid, int):
                self.send(Response.failure(rid, ErrorKind.PROTOCOL,
                                           f"bad request: {err}").to_json())
            return
        if not isinstance(msg, Request):
            return  # the host sends only requests; ignore anything else
        threading.Thread(target=self._handle, args=(msg,), daemon=True,
                         name=f"req-{msg.id}-{msg.op}").start()

    def _handle(self, req: Request) -> None:
        reply = self._answer(req)
        try:
            self.send(reply.to_json())
        except ProtocolError as err:
            self._send_quietly(Response.failure(req.id, ErrorKind.INTERNAL,
                                                f"reply not sendable: {err}").to_json())
        except OSError as err:  # the port refused the write: say so where it can be seen
            print(f"uvmshim-agent: cannot answer request {req.id} ({req.op}): {err!r}",
                  file=sys.stderr)
        if req.op == Op.SHUTDOWN and reply.ok:
            self._poweroff()

    def _answer(self, req: Request) -> Response:
        if req.version != PROTOCOL_VERSION:
            return Response.failure(req.id, ErrorKind.PROTOCOL, (
                f"protocol version mismatch: host {req.version}, guest {PROTOCOL_VERSION}"))
        if req.op not in REQUEST_TYPES:
            return Response.failure(req.id, ErrorKind.PROTOCOL, f"unknown operation {req.op!r}")
        try:
            body = decode_request(req.op, req.args)
            result: object
            if isinstance(body, Exec):
                result = self._exec(body, req.id)
            else:
                result = self._handlers[req.op](body)
        except ProtocolError as err:
            return Response.failure(req.id, ErrorKind.INVALID, str(err))
        except AgentError as err:
            return Response.failure(req.id, err.kind, str(err))
        except Exception as err:  # a bug must not kill the agent; tell the host
            return Response.failure(req.id, ErrorKind.INTERNAL, f"internal error: {err!r}")
        return Response(req.id, True, result.to_json() if isinstance(result, Struct) else result)

    # Handlers ----------------------------------------------------------------------------------

    def _hello(self, req: Hello) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "agent": "uvmshim-agent", "pid": os.getpid(),
                "uptime": _uptime(), "agent_started": self._started,
                "init_started": float(os.environ.get("UVMSHIM_T_INIT", "-1") or -1)}

    def _ping(self, req: Ping) -> dict[str, Any]:
        return {"uptime": _uptime()}

    def _shutdown(self, req: Shutdown) -> None:
        pass  # _handle powers off once the answer is out

    def _fresh_start(self, req: FreshStart) -> dict[str, Any]:
        """Fresh entropy (credited, then a forced CRNG reseed), the host's clock, a host name.

        A clone of a template resumes with the template's CRNG state: without this, every
        clone would hand its containers the same "random" bytes.
        """
        import fcntl
        import socket
        import struct

        name = req.hostname
        if not 0 < len(name.encode()) <= 64 or "/" in name or "\0" in name:
            raise AgentError(f"bad host name {name!r}", ErrorKind.INVALID)
        if len(req.entropy) < 16:
            raise AgentError("fresh_start needs at least 16 bytes of entropy", ErrorKind.INVALID)
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # struct rand_pool_info: entropy_count (bits), buf_size (bytes), buf.
            info = struct.pack("ii", 8 * len(req.entropy), len(req.entropy)) + req.entropy
            fcntl.ioctl(fd, RNDADDENTROPY, info)
            try:
                fcntl.ioctl(fd, RNDRESEEDCRNG)
                reseeded = True
            except OSError:  # ENODATA: the CRNG is not ready yet; the credit above seeds it
                reseeded = False
        except OSError as err:
            raise AgentError(f"adding entropy: {err.strerror or err}", ErrorKind.FAILED) \
                from None
        finally:
            os.close(fd)
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, req.time_ns)
            socket.sethostname(name)
        except OSError as err:
            raise AgentError(f"fresh_start: {err.strerror or err}", ErrorKind.FAILED) from None
        return {"reseeded": reseeded, "uptime": _uptime()}

    def _load_modules(self, req: LoadModules) -> None:
        unknown = [g for g in req.groups if g not in MODULE_GROUPS]
        if unknown:
            raise AgentError(f"unknown module groups {unknown}", ErrorKind.INVALID)
        self._modules.ensure_group(*req.groups)
        if "net" in req.groups:
            self._network.prepare()

    def _add_vpci(self, req: AddVpci) -> None:
        # The host side would assign a VFIO device; this guest has no mapping from a VMBus
        # GUID to a PCI function and no drivers for pass-through hardware.
        raise AgentError(f"vPCI device {req.vmbus_guid}: assigned PCI devices are not "
                         "supported by this guest", ErrorKind.UNSUPPORTED)

    def _install_drivers(self, req: InstallDrivers) -> None:
        tool = "/bin/install-drivers"
        if not os.access(tool, os.X_OK):
            raise AgentError(f"{tool} is not present in this guest", ErrorKind.UNSUPPORTED)
        rw_path, disk_path = req.rw_path, req.disk_path
        os.makedirs(rw_path, exist_ok=True)
        try:
            run([tool, rw_path, disk_path], timeout=600)
        except AgentError as err:
            raise AgentError(f"install-drivers {rw_path} {disk_path}: {err}", err.kind) from None

    def _process_stdin(self, req: ProcessStdin) -> None:
        self._runtime.write_stdin(req)

    def _exec(self, req: Exec, rid: int) -> ExecStatus:
        """Run ``req.argv``; its output goes out as events carrying ``rid``, before the answer."""
        argv = list(req.argv)
        if not argv:
            raise AgentError("exec needs a non-empty argv", ErrorKind.INVALID)
        env = dict(BASE_ENV)
        env.update(req.env or {})
        import subprocess

        try:
            proc = subprocess.Popen(
                argv, cwd=req.cwd or "/", env=env,
                stdin=subprocess.PIPE if req.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            kind = ErrorKind.NOT_FOUND if isinstance(err, FileNotFoundError) else ErrorKind.FAILED
            raise AgentError(f"exec {argv[0]}: {err.strerror or err}", kind) from None
        pumps = [threading.Thread(target=self._pump, args=(rid, name, pipe), daemon=True)
                 for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for t in pumps:
            t.start()
        if req.stdin and proc.stdin is not None:
            try:
                proc.stdin.write(req.stdin)
                proc.stdin.close()
            except OSError:
                pass  # the process did not read its input; its exit status tells the story
        timed_out = False
        try:
            rc = proc.wait(timeout=req.timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            rc = proc.wait()
        # Every output event must be on the wire before the response, which ends the stream.
        for t in pumps:
            t.join()
        return ExecStatus(exit_code=rc, timed_out=timed_out)

    def _pump(self, rid: int, stream: str, pipe: Any) -> None:
        fd = pipe.fileno()
        while True:
            chunk = os.read(fd, OUTPUT_CHUNK)
            if not chunk:
                break
            self.send(OutputEvent(id=rid, stream=stream, data=chunk).to_event().to_json())
        pipe.close()


def _poweroff() -> None:
    import subprocess

    os.sync()
    # -f: straight to the reboot(2) syscall; QEMU (with -no-reboot) then exits.
    subprocess.run(["poweroff", "-f"], check=False)


def make_server(fd: int, **kw: Any) -> Server:
    """A :class:`Server` with the real guest storage and module loader."""
    modules = ModuleLoader()
    return Server(fd, Storage(modules), modules=modules, **kw)
