"""Containers in the guest, driven through crun. STDLIB ONLY.

The host sends hcsshim-style requests: ``container_create`` (write the bundle's config.json
from the rewritten OCI spec, resolving ``sandbox://`` and ``hugepages://`` mount sources the
way hcsshim's guest does), ``container_start``, ``container_exec``, ``container_signal`` and
``container_delete``.

Two phases, as runc's and crun's callers expect: ``container_create`` runs ``crun create``
(every error of the spec, hooks run in the guest included, fails the create; the init exists
and waits on crun's ``exec.fifo``), ``container_start`` runs ``crun start``. After ``crun
create`` exits, the init is re-parented to PID 1, not to the agent (becoming a child subreaper
needs prctl(2), i.e. ctypes, which the initrd does not ship): the guest's PID 1 is
:mod:`uvmshim.agent.reaper`, which writes the status of every init the agent watches
(``EXIT_WATCH_DIR``/``EXIT_STATUS_DIR``); the agent learns of the exit through a pidfd. The
init's stdio are the pipes (or the pty) ``crun create`` was given, which the agent keeps.

A started process is named by a *process key* (``<container id>`` for the init,
``<container id>/<exec id>`` for an exec); its output and exit arrive as ``output`` and ``exit``
events carrying that key, and ``process_stdin`` feeds its stdin.

Terminals: a process with ``process.terminal`` gets a pty allocated by crun inside the
container. crun hands its master over ``--console-socket``: the agent listens on a socket of its
own for each such process, receives the master fd (``SCM_RIGHTS``), and from then on the master
*is* the process's stdio here: what it reads goes out as ``stdout`` output, ``process_stdin``
writes to it and ``process_resize`` sets its window size (``TIOCSWINSZ``: the kernel sends
``SIGWINCH`` to the pty's foreground process group). The initial size is
``process.consoleSize``, which crun sets before it executes the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading

from uvmshim.agent.confine import deny_uvm_block_devices
from uvmshim.agent.storage import Storage
from uvmshim.agent.util import AgentError, makedirs, run
from uvmshim.protocol.constants import (
    CONTAINER_NS_PREFIX,
    CRUN_ROOT,
    EXIT_STATUS_DIR,
    EXIT_WATCH_DIR,
    HUGEPAGES_MOUNT_PREFIX,
    SANDBOX_MOUNT_PREFIX,
)
from uvmshim.protocol.events import EventBody, ExitEvent, OutputEvent
from uvmshim.protocol.messages import ErrorKind
from uvmshim.protocol.requests import (
    ContainerCreate,
    ContainerDelete,
    ContainerExec,
    ContainerSignal,
    ContainerStart,
    ContainerStats,
    ContainerUpdate,
    HugepagesDir,
    ProcessResize,
    ProcessStdin,
    SandboxDir,
    process_key,
)

TYPE_CHECKING = False  # not from typing: importing typing costs guest boot time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO

    SendEvent = Callable[[EventBody], None]

OUTPUT_CHUNK = 32 * 1024

#: Where the console sockets crun connects to live (short paths: ``sun_path`` holds 108 bytes).
CONSOLE_DIR = "/run/uvmshim/console"

#: OCI namespace types → their file in ``/proc/<pid>/ns``.
_NS_FILES = {"network": "net", "mount": "mnt", "pid": "pid", "ipc": "ipc", "uts": "uts",
             "user": "user", "cgroup": "cgroup", "time": "time"}

#: How long crun may take to hand over a terminal's master.
CONSOLE_TIMEOUT = 30.0

#: How long ``crun create`` may take (hooks in the guest included).
CREATE_TIMEOUT = 50.0

#: How long PID 1 may take to record an exit status once the process is gone.
STATUS_TIMEOUT = 10.0

#: The cgroup v2 files ``container_stats`` reads (those that exist).
STATS_FILES = ("cpu.stat", "cpu.max", "memory.current", "memory.max", "memory.peak",
               "memory.stat", "memory.events", "memory.swap.current", "memory.swap.max",
               "pids.current", "pids.max")
CGROUP_MOUNT = "/sys/fs/cgroup"


class _Container:
    def __init__(self, bundle: str, stdin: bool, scratch_dir: str, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.bundle = bundle
        self.stdin = stdin
        self.scratch_dir = scratch_dir
        self.started = False
        self.terminal = False
        self.init_pid = 0  # once ``crun create`` made it


class _Console:
    """A console socket for one crun call: crun connects and sends the pty master (the way
    runc and crun hand it to conmon or containerd)."""

    _count = 0
    _count_lock = threading.Lock()

    def __init__(self) -> None:
        import socket

        with _Console._count_lock:
            _Console._count += 1
            n = _Console._count
        makedirs(CONSOLE_DIR)
        self.path = os.path.join(CONSOLE_DIR, f"{os.getpid()}-{n}.sock")
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(self.path)
            self.sock.listen(1)
        except OSError as err:
            self.close()
            raise AgentError(f"console socket {self.path}: {err.strerror or err}",
                             ErrorKind.FAILED) from None

    def receive(self, proc: Any, timeout: float = CONSOLE_TIMEOUT) -> int:
        """The master fd crun sends; -1 if crun exited first (its exit event tells why) or
        did not send one in time (then it is killed)."""
        import socket
        import time

        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.02)
        try:
            while True:
                try:
                    conn, _ = self.sock.accept()
                    break
                except TimeoutError:
                    if proc.poll() is not None:
                        return -1
                    if time.monotonic() > deadline:
                        proc.kill()
                        return -1
            with conn:
                conn.settimeout(max(deadline - time.monotonic(), 1.0))
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
        except OSError:
            return -1
        finally:
            self.close()
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else -1

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _Tty:
    """The pty master of a container process (non-blocking; closed once the process is gone)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.closing = False
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        import select

        view = memoryview(data)
        with self.lock:
            while view:
                if self.fd < 0 or self.closing:
                    raise OSError(5, "the terminal is closed")
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:  # the process does not read: wait, but not forever
                    select.select([], [self.fd], [], 0.1)

    def eof(self) -> None:
        """End of input: the EOF character (^D), if the terminal is in canonical mode."""
        import termios

        with self.lock:
            if self.fd < 0:
                return
            attrs = termios.tcgetattr(self.fd)
            if attrs[3] & termios.ICANON:
                veof = attrs[6][termios.VEOF]
                os.write(self.fd, veof if isinstance(veof, bytes) else bytes([veof]))

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        with self.lock:
            if self.fd < 0:
                raise OSError(5, "the terminal is closed")
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        self.closing = True  # a writer waiting for room gives up
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class Runtime:
    """Containers and their processes.

    :param storage: resolves ``sandbox://`` and ``hugepages://`` mount sources.
    :param send_event: sends one event to the host.
    """

    def __init__(self, storage: Storage, send_event: SendEvent) -> None:
        self._storage = storage
        self._send_event = send_event
        self._lock = threading.Lock()
        self._containers: dict[str, _Container] = {}
        self._procs: dict[str, Any] = {}  # process key -> subprocess.Popen
        self._ttys: dict[str, _Tty] = {}  # process key -> its pty master (terminal processes)
        self._crun_path = sealed_copy("crun")

    def _crun(self, *args: str) -> list[str]:
        return [self._crun_path, "--root", CRUN_ROOT, *args]

    def _crun_logged(self, log: str, *args: str) -> list[str]:
        """crun writing its own errors to ``log`` (JSON lines), apart from the process's
        output: a failure of crun is then told from the process's own exit status."""
        with contextlib.suppress(OSError):
            os.unlink(log)
        return [self._crun_path, "--root", CRUN_ROOT, f"--log=file:{log}", "--log-format=json",
                *args]

    def create(self, req: ContainerCreate) -> None:
        """Write ``<bundle>/config.json`` from ``spec`` and ``crun create`` the container (its
        init waits for :meth:`start`); a crun error fails the request and leaves nothing."""
        container_id, bundle, sandbox_id = req.container_id, req.bundle, req.sandbox_id
        _check_id(container_id)
        if not bundle:
            raise AgentError(f"container {container_id}: no bundle path", ErrorKind.INVALID)
        with self._lock:
            if container_id in self._containers:
                raise AgentError(f"container {container_id} already exists", ErrorKind.CONFLICT)
            c = _Container(bundle, req.stdin, req.scratch_dir, sandbox_id or container_id)
            self._containers[container_id] = c
        try:
            spec = dict(req.spec)
            process = dict(spec.get("process") or {})
            # A terminal: crun allocates a pty and sends its master to our console socket.
            c.terminal = process["terminal"] = bool(process.get("terminal"))
            spec["process"] = process
            spec["mounts"] = [self._resolve_mount(m, sandbox_id or container_id)
                              for m in spec.get("mounts") or []]
            spec = deny_uvm_block_devices(spec)  # whatever the host sent: see agent/confine.py
            spec = self._resolve_namespaces(spec)
            makedirs(bundle)
            with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
                json.dump(spec, f)
            self._crun_create(container_id, c)
        except BaseException:
            with self._lock:
                self._containers.pop(container_id, None)
            raise

    def _resolve_namespaces(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``container://<id>`` namespace paths → that container's init's namespace."""
        linux = spec.get("linux")
        if not isinstance(linux, dict) or not isinstance(linux.get("namespaces"), list):
            return spec
        out = []
        for ns in linux["namespaces"]:
            path = ns.get("path") if isinstance(ns, dict) else None
            if isinstance(path, str) and path.startswith(CONTAINER_NS_PREFIX):
                other = path[len(CONTAINER_NS_PREFIX):]
                with self._lock:
                    c = self._containers.get(other)
                if c is None or c.init_pid <= 0:
                    raise AgentError(f"namespace {path}: container {other} does not exist",
                                     ErrorKind.NOT_FOUND)
                name = _NS_FILES.get(str(ns.get("type")), str(ns.get("type")))
                ns = {**ns, "path": f"/proc/{c.init_pid}/ns/{name}"}
            out.append(ns)
        return {**spec, "linux": {**linux, "namespaces": out}}

    def _resolve_mount(self, mount: dict[str, Any], sandbox_id: str) -> dict[str, Any]:
        options = mount.get("options") or []
        if mount.get("type") == "none" and not {"bind", "rbind"} & set(options):
            # The host rewrote a disk mount to its guest path with type "none" (hcsshim's
            # rewrite); in the guest that path is bind mounted into the container.
            mount = {**mount, "options": ["rbind", *options]}
        source = mount.get("source")
        if not isinstance(source, str):
            return mount
        if source.startswith(SANDBOX_MOUNT_PREFIX):
            sandbox = SandboxDir(sandbox_id=sandbox_id, path=source)
            return {**mount, "source": self._storage.sandbox_dir(sandbox)}
        if source.startswith(HUGEPAGES_MOUNT_PREFIX):
            hugepages = HugepagesDir(sandbox_id=sandbox_id, path=source)
            return {**mount, "source": self._storage.hugepages_dir(hugepages)}
        return mount

    def _crun_create(self, container_id: str, c: _Container) -> None:
        """``crun create``; on success the init (process key: the container id) is watched:
        its output and exit arrive as events. On failure nothing of it is left."""
        import subprocess

        key = process_key(container_id)
        log = os.path.join(c.bundle, "crun.log")
        pid_file = os.path.join(c.bundle, "init.pid")
        with contextlib.suppress(OSError):
            os.unlink(pid_file)
        console = _Console() if c.terminal else None
        console_args = ["--console-socket", console.path] if console else []
        argv = self._crun_logged(log, "create", *console_args, "--pid-file", pid_file,
                                 "--bundle", c.bundle, container_id)
        with self._lock:
            self._check_free(key, console)
        proc = self._popen(argv, cwd=c.bundle, stdin=c.stdin, console=console)
        tty = _tty_of(console, proc)
        try:
            rc = proc.wait(timeout=CREATE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        pid = 0
        with contextlib.suppress(OSError, ValueError), open(pid_file, encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
        if rc != 0 or pid <= 0:
            error = crun_error(log) or f"crun create exited with status {rc}"
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            if tty is not None:
                tty.close()
            if os.path.isdir(os.path.join(CRUN_ROOT, container_id)):
                with contextlib.suppress(AgentError):
                    run(self._crun("delete", "--force", container_id))
            raise AgentError(f"crun: {error}", ErrorKind.CRUN)
        makedirs(EXIT_WATCH_DIR)
        with open(os.path.join(EXIT_WATCH_DIR, str(pid)), "w", encoding="ascii"):
            pass
        c.init_pid = pid
        with self._lock:
            self._procs[key] = proc
            if tty is not None:
                self._ttys[key] = tty
        threading.Thread(target=self._watch, args=(key, proc, log, tty, pid), daemon=True,
                         name=f"proc-{key}").start()

    def start(self, req: ContainerStart) -> None:
        """``crun start``: the init created by :meth:`create` runs the container's process."""
        container_id = req.container_id
        with self._lock:
            c = self._containers.get(container_id)
            if c is None:
                raise AgentError(f"container {container_id} does not exist",
                                 ErrorKind.NOT_FOUND)
            if c.started:
                raise AgentError(f"container {container_id} was already started",
                                 ErrorKind.CONFLICT)
            c.started = True
        log = os.path.join(c.bundle, "crun-start.log")
        try:
            run(self._crun_logged(log, "start", container_id))
        except AgentError as err:
            raise AgentError(f"crun: {crun_error(log) or err}", ErrorKind.CRUN) from None

    def exec(self, req: ContainerExec) -> None:
        """Run ``process`` (an OCI process object) in the running container."""
        container_id, exec_id = req.container_id, req.exec_id
        _check_id(exec_id)
        with self._lock:
            c = self._containers.get(container_id)
            if c is None or not c.started:
                raise AgentError(f"container {container_id} is not running", ErrorKind.CONFLICT)
        spec = {**req.process, "terminal": bool(req.process.get("terminal"))}
        path = os.path.join(c.bundle, f"exec-{exec_id}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        log = os.path.join(c.bundle, f"exec-{exec_id}.log")
        console = _Console() if spec["terminal"] else None
        console_args = ["--console-socket", console.path] if console else []
        self._spawn(process_key(container_id, exec_id),
                    self._crun_logged(log, "exec", *console_args, "--process", path,
                                      container_id),
                    stdin=req.stdin, cwd=c.bundle, crun_log=log, console=console)

    def signal(self, req: ContainerSignal) -> None:
        """``crun kill [--all] <id> <signal>``."""
        container_id = req.container_id
        if container_id not in self._containers:
            raise AgentError(f"container {container_id} does not exist", ErrorKind.NOT_FOUND)
        argv = self._crun("kill", *(["--all"] if req.all_processes else []), container_id,
                          str(req.signal))
        try:
            run(argv)
        except AgentError as err:
            raise AgentError(f"signal container {container_id}: {err}", ErrorKind.CRUN) from None

    def update(self, req: ContainerUpdate) -> None:
        """``crun update --resources FILE <id>``: new limits for the container's cgroup."""
        container_id = req.container_id
        c = self._existing(container_id)
        path = os.path.join(c.bundle, "resources.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(req.resources, f)
        try:
            run(self._crun("update", "--resources", path, container_id))
        except AgentError as err:
            raise AgentError(f"update container {container_id}: {err}", ErrorKind.CRUN) from None

    def stats(self, req: ContainerStats) -> dict[str, Any]:
        """The container's cgroup files (:data:`STATS_FILES`), from the cgroup its init is in
        (crun's, whatever path it chose)."""
        container_id = req.container_id
        c = self._existing(container_id)
        try:
            with open(f"/proc/{c.init_pid}/cgroup", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        path = next((line[3:] for line in lines if line.startswith("0::")), None)
        if c.init_pid <= 0 or path is None:
            raise AgentError(f"container {container_id} is not running", ErrorKind.CONFLICT)
        cgroup = os.path.normpath(CGROUP_MOUNT + "/" + path)
        files: dict[str, str] = {}
        for name in STATS_FILES:
            try:
                with open(os.path.join(cgroup, name), encoding="utf-8") as f:
                    files[name] = f.read()
            except OSError:
                pass
        if not files:
            raise AgentError(f"container {container_id}: no cgroup files in {cgroup}",
                             ErrorKind.NOT_FOUND)
        return {"cgroup": cgroup, "files": files}

    def delete(self, req: ContainerDelete) -> None:
        """Kill (if running) and delete the container; forget it."""
        container_id = req.container_id
        c = self._existing(container_id)
        # A created or stopped container is still crun's until ``crun delete`` (its init, if
        # still there, is killed: PID 1 records its status, the watcher sends its exit).
        if os.path.isdir(os.path.join(CRUN_ROOT, container_id)):
            try:
                run(self._crun("delete", "--force", container_id))
            except AgentError as err:
                if os.path.isdir(os.path.join(CRUN_ROOT, container_id)):
                    raise AgentError(f"delete container {container_id}: {err}",
                                     ErrorKind.CRUN) from None
        # What create wrote into the bundle; the bundle directory itself is a mount point (the
        # scratch disk) or the parent of one (the rootfs), which the host removes.
        for name in os.listdir(c.bundle) if os.path.isdir(c.bundle) else []:
            if name in ("config.json", "crun.log", "crun-start.log", "init.pid",
                        "resources.json") or (
                    name.startswith("exec-") and name.endswith((".json", ".log"))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(c.bundle, name))
        if c.sandbox_id == container_id:
            self._storage.remove_sandbox_dirs(container_id)
        with self._lock:
            self._containers.pop(container_id, None)

    def write_stdin(self, req: ProcessStdin) -> None:
        """Write ``data`` to a process's stdin, then close it if ``eof``."""
        key, data = req.process, req.data
        with self._lock:
            proc = self._procs.get(key)
            tty = self._ttys.get(key)
        if tty is not None:
            try:
                if data:
                    tty.write(data)
                if req.eof:
                    tty.eof()
            except OSError as err:
                raise AgentError(f"terminal of {key}: {err.strerror or err}") from None
            return
        if proc is None or proc.stdin is None:
            raise AgentError(f"process {key} has no open stdin", ErrorKind.NOT_FOUND)
        try:
            if data:
                proc.stdin.write(data)
                proc.stdin.flush()
            if req.eof:
                proc.stdin.close()
        except (OSError, ValueError) as err:
            raise AgentError(f"stdin of {key}: {err}") from None

    def resize(self, req: ProcessResize) -> None:
        """Set the window size of a terminal process's pty."""
        with self._lock:
            tty = self._ttys.get(req.process)
        if tty is None:
            raise AgentError(f"process {req.process} has no terminal", ErrorKind.NOT_FOUND)
        try:
            tty.resize(req.rows, req.cols)
        except OSError as err:
            raise AgentError(f"resize {req.process}: {err.strerror or err}") from None

    # Processes ----------------------------------------------------------------------------

    def _existing(self, container_id: str) -> _Container:
        """The container ``container_id``.

        :raises AgentError: NOT_FOUND, there is no such container.
        """
        with self._lock:
            c = self._containers.get(container_id)
        if c is None:
            raise AgentError(f"container {container_id} does not exist", ErrorKind.NOT_FOUND)
        return c

    def _check_free(self, key: str, console: _Console | None) -> None:
        """With the lock held: refuse a process key in use (closing ``console``)."""
        if key in self._procs:
            if console is not None:
                console.close()
            raise AgentError(f"process {key} already exists", ErrorKind.CONFLICT)

    @staticmethod
    def _popen(argv: list[str], *, cwd: str, stdin: bool, console: _Console | None) -> Any:
        """Start ``argv`` with piped output (stdin piped only if asked and not a terminal);
        a program that can't start closes ``console`` and is a crun error."""
        import subprocess

        try:
            return subprocess.Popen(
                argv, cwd=cwd,
                stdin=subprocess.PIPE if stdin and console is None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            if console is not None:
                console.close()
            raise AgentError(f"{argv[0]}: {err.strerror or err}", ErrorKind.CRUN) from None

    def _spawn(self, key: str, argv: list[str], *, stdin: bool, cwd: str,
               crun_log: str = "", console: _Console | None = None) -> None:
        """Start ``argv`` as process ``key``; with ``console``, once crun sent the pty master
        (or gave up), the master is the process's stdio."""
        with self._lock:
            self._check_free(key, console)
            proc = self._popen(argv, cwd=cwd, stdin=stdin, console=console)
            self._procs[key] = proc
        tty = _tty_of(console, proc)
        if tty is not None:
            with self._lock:
                self._ttys[key] = tty
        threading.Thread(target=self._watch, args=(key, proc, crun_log, tty), daemon=True,
                         name=f"proc-{key}").start()

    def _watch(self, key: str, proc: Any, crun_log: str, tty: _Tty | None = None,
               init_pid: int = 0) -> None:
        """Relay the output of ``proc`` and send its exit event; with ``init_pid``, the exit
        is that of the container's init (``proc`` is the ``crun create`` that made it)."""
        exited = threading.Event()
        pumps = [threading.Thread(target=self._pump, args=(key, name, pipe), daemon=True)
                 for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        if tty is not None:
            pumps.append(threading.Thread(target=self._pump_tty, args=(key, tty, exited),
                                          daemon=True))
        for t in pumps:
            t.start()
        rc = proc.wait()
        if init_pid:
            rc = wait_exit(init_pid)
        exited.set()
        for t in pumps:
            t.join()  # all output before the exit event
        with self._lock:
            self._procs.pop(key, None)
            self._ttys.pop(key, None)
        error = crun_error(crun_log) if crun_log and rc != 0 else ""
        self._send_event(ExitEvent(process=key, exit_code=rc, error=error))

    def _pump(self, key: str, stream: str, pipe: BinaryIO) -> None:
        fd = pipe.fileno()
        while True:
            chunk = os.read(fd, OUTPUT_CHUNK)
            if not chunk:
                break
            self._send_event(OutputEvent(process=key, stream=stream, data=chunk))
        pipe.close()

    def _pump_tty(self, key: str, tty: _Tty, exited: threading.Event) -> None:
        """Relay the pty master until every holder of the slave is gone (EIO), or, once the
        process exited, until nothing more comes (a background process may keep the slave)."""
        import select

        fd = tty.fd
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.05 if exited.is_set() else 0.5)
                if not ready:
                    if exited.is_set():
                        break
                    continue
                try:
                    chunk = os.read(fd, OUTPUT_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the slave is closed
                    break
                if not chunk:
                    break
                self._send_event(OutputEvent(process=key, stream="stdout", data=chunk))
        finally:
            tty.close()


def _tty_of(console: _Console | None, proc: Any) -> _Tty | None:
    """The pty master crun sent over ``console`` for ``proc`` (None without one)."""
    if console is None:
        return None
    master = console.receive(proc)
    return _Tty(master) if master >= 0 else None


def sealed_copy(program: str, directory: str = "/usr/bin") -> str:
    """A path that executes a sealed in-memory copy of ``program`` (``program`` itself if
    the copy cannot be made).

    crun protects itself from CVE-2019-5736 by copying its binary into a fresh memfd and
    re-executing that on every start, unless ``/proc/self/exe`` already is a fully sealed memfd.
    Under TCG that copy costs most of each crun call (~0.3 s): its code sits in new pages every
    time, so QEMU translates all of it again. One sealed copy made here (before the template is
    saved, so clones share it) is what crun accepts as already cloned: the agent keeps the memfd
    open and runs crun through ``/proc/<agent>/fd/<n>``, whose pages and translations persist.
    """
    import fcntl

    source = os.path.join(directory, program)
    try:
        fd = os.memfd_create(program, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return program
    try:
        with open(source, "rb") as f:
            data = f.read()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except OSError:
        os.close(fd)
        return program
    return f"/proc/{os.getpid()}/fd/{fd}"


def wait_exit(pid: int, status_dir: str = EXIT_STATUS_DIR,
              timeout: float = STATUS_TIMEOUT) -> int:
    """Wait until process ``pid`` (not our child: re-parented to PID 1) has exited; return its
    exit status as runc and the shells report it (128 + the signal for a process killed by one),
    from what PID 1 recorded, or 255 if nothing came."""
    import select
    import time

    try:
        fd = os.pidfd_open(pid)
    except OSError:  # already reaped
        fd = -1
    if fd >= 0:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll():
                pass
        finally:
            os.close(fd)
    path = os.path.join(status_dir, str(pid))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="ascii") as f:
                code = int(f.read().strip())  # os.waitstatus_to_exitcode: -N for signal N
            os.unlink(path)
            return 128 - code if code < 0 else code
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return 255
            time.sleep(0.005)


def crun_error(log: str) -> str:
    """crun's own error messages in its JSON log ``log`` (one per line), joined; empty if
    crun logged none (the log is missing or holds only warnings)."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    errors = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"level": "error", "msg": line}
        if isinstance(entry, dict) and entry.get("level") == "error" and entry.get("msg"):
            errors.append(str(entry["msg"]).strip())
    return "; ".join(errors)


def _check_id(value: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise AgentError(f"invalid id {value!r}", ErrorKind.INVALID)
