"""The per-container shim: the host process that *is* the container for its caller.

``create`` forks it (:func:`run_shim`); its pid goes into ``--pid-file``. It boots the utility VM,
creates the container in it, reports to ``create`` over the ready pipe, then serves the later
CLI calls on ``shim.sock`` (:mod:`uvmshim.oci_runtime.protocol`). It relays stdio between the fds
it inherited (or a pty slave) and the container, and once the container's init has exited it
deletes the container, stops the UVM, records ``stopped`` and exits with the init's status —
so that conmon or containerd's shim, which wait for this pid, see the container's exit status.

Signals sent to the shim go to the container once it runs (as they would reach runc's init);
before ``start``, a terminating signal aborts the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from uvmshim.errors import ReleaseError, UvmshimError
from uvmshim.oci.spec import Spec
from uvmshim.oci_runtime import protocol
from uvmshim.oci_runtime.state import ContainerDir, proc_start_time
from uvmshim.oci_runtime.stdio import relay_input, relay_output
from uvmshim.runtime.container import Container

log = logging.getLogger(__name__)

#: Signals the shim forwards to a running container.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH)
#: crun's state root in the guest (see uvmshim.agent.runtime).
GUEST_CRUN = ("crun", "--root", "/run/crun")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class ShimConfig:
    """What ``create`` hands the shim."""

    cdir: ContainerDir
    spec: Spec
    stdin: int
    stdout: int
    stderr: int
    ready_fd: int
    memory_mb: int = 512
    cpus: int = 2


class Shim:
    """One container and its UVM; see the module docstring."""

    def __init__(self, cfg: ShimConfig) -> None:
        self.cfg = cfg
        self.id = cfg.cdir.id
        self.status = "creating"
        self.container: Container | None = None
        self.uvm: Any = None
        self._running = asyncio.Event()
        self._abort: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready_sent = False
        self._orphaned = False
        self._init_out: asyncio.Task[Any] | None = None
        self._init_in: asyncio.Task[Any] | None = None

    # The life of the shim -------------------------------------------------------------------

    async def run(self) -> int:
        """Create, serve, wait for the init, tear down; return the exit status."""
        from uvmshim.uvm.options import UvmOptions
        from uvmshim.uvm.qemu_uvm import start_uvm

        self._install_signals()
        code = 255
        try:
            options = UvmOptions.from_annotations(self.cfg.spec.annotations)
            vm_id = self.cfg.cdir.read().get("vm_id")
            async with start_uvm(options, memory_mb=self.cfg.memory_mb, cpus=self.cfg.cpus,
                                 vm_id=vm_id) as uvm:
                self.uvm = uvm
                container = Container(uvm.vm, uvm.agent, self.id, guest_spec(self.cfg.spec))
                await container.create(stdin=True)
                self.container = container
                try:
                    code = await self._serve(container)
                finally:
                    self.status = "stopped"
                    try:
                        await container.delete()
                    except ReleaseError as err:
                        log.warning("%s", err)
        except UvmshimError as err:
            log.error("%s", err)
            self._ready({"error": str(err)})
        except asyncio.CancelledError:
            self._ready({"error": "container creation was aborted"})
        finally:
            with contextlib.suppress(OSError):
                self.cfg.cdir.socket.unlink()
            if self._orphaned:  # nobody knows about this container: leave nothing behind
                import shutil

                shutil.rmtree(self.cfg.cdir.path, ignore_errors=True)
            else:
                with contextlib.suppress(UvmshimError, OSError):
                    self.cfg.cdir.update(status="stopped", exit_code=code)
            for fd in (self.cfg.stdin, self.cfg.stdout, self.cfg.stderr):
                with contextlib.suppress(OSError):
                    os.close(fd)
        return code

    async def _serve(self, container: Container) -> int:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(os.fspath(self.cfg.cdir.socket))
        listener.listen(16)
        listener.setblocking(False)
        accept = asyncio.create_task(self._accept_loop(listener))
        try:
            self.status = "created"
            pid = os.getpid()
            self.cfg.cdir.update(status="created", pid=pid, shim_start=proc_start_time(pid))
            if not self._ready({"ok": True, "pid": pid}):
                return 255  # create's caller is gone: nobody will ever start this container
            running: asyncio.Future[Any] = asyncio.ensure_future(self._running.wait())
            abort: asyncio.Future[Any] = self._abort
            await asyncio.wait([running, abort], return_when=asyncio.FIRST_COMPLETED)
            if self._abort.done():
                running.cancel()
                return self._abort.result()
            return await self._wait_init(container)
        finally:
            accept.cancel()
            listener.close()
            with contextlib.suppress(asyncio.CancelledError):
                await accept

    async def _wait_init(self, container: Container) -> int:
        code = await container.wait()
        self.status = "stopped"
        # The output relay ends with the init's last output; give it a moment to drain.
        if self._init_out is not None:
            await asyncio.wait([self._init_out], timeout=5)
        if self._init_in is not None:
            self._init_in.cancel()
        return code

    def _ready(self, message: dict[str, Any]) -> bool:
        """Tell ``create`` how it went (once); False if ``create`` is no longer there."""
        if self._ready_sent:
            return True
        self._ready_sent = True
        try:
            os.write(self.cfg.ready_fd, json.dumps(message).encode() + b"\n")
            return True
        except OSError:
            log.warning("create's caller went away; removing the container")
            self._orphaned = True
            return False
        finally:
            os.close(self.cfg.ready_fd)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in FORWARDED:
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        if self._running.is_set() and self.status == "running":
            self._spawn(self._kill(signum, False), "signal")
        elif signum != signal.SIGWINCH and not self._abort.done():
            self._abort.set_result(128 + signum)
            if self.container is None:  # still booting: stop that
                for t in asyncio.all_tasks():
                    if t.get_name() == "shim-main":
                        t.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Requests -------------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._spawn(self._handle(conn), "request")

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            conn.settimeout(10)
            line, fds = await loop.run_in_executor(None, protocol.recv_line_with_fds, conn)
            request = json.loads(line)
            op = request.get("op")
            if op == "exec":
                await self._exec(conn, request, fds)
                fds = []  # _exec closes them
                return
            handler = {"start": self._op_start, "kill": self._op_kill, "ps": self._op_ps,
                       "pause": self._op_pause, "resume": self._op_resume,
                       "shutdown": self._op_shutdown, "state": self._op_state,
                       "guest-exec": self._op_guest_exec}.get(str(op))
            if handler is None:
                raise UvmshimError(f"unknown request {op!r}")
            answer = await handler(request)
            _reply(conn, {"ok": True, **answer})
        except UvmshimError as err:
            _reply(conn, {"error": str(err)})
        except (OSError, ValueError) as err:
            log.warning("request: %s", err)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    async def _op_guest_exec(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a command in the UVM itself (diagnostics: ``uvmshim-runc guest-exec``)."""
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or self.uvm is None:
            raise UvmshimError("guest-exec needs argv")
        res = await self.uvm.agent.exec([str(a) for a in argv], timeout=60)
        return {"exit": res.exit_code, "stdout": res.stdout.decode(errors="replace"),
                "stderr": res.stderr.decode(errors="replace")}

    async def _op_state(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status}

    async def _op_start(self, _request: dict[str, Any]) -> dict[str, Any]:
        container = self.container
        if self.status != "created" or container is None:
            what = {"running": "an already running", "paused": "a paused",
                    "starting": "an already running"}.get(self.status, "a stopped")
            raise UvmshimError(f"cannot start {what} container")
        self.status = "starting"
        cfg = self.cfg
        self._init_out = self._spawn(relay_output(container.output(), cfg.stdout, cfg.stderr),
                                     "init-out")
        self._init_in = self._spawn(
            relay_input(cfg.stdin, container.write_stdin, container.close_stdin), "init-in")
        try:
            await container.start()
        except BaseException:
            self.status = "stopped"
            if not self._abort.done():
                self._abort.set_result(255)
            raise
        self.status = "running"
        self.cfg.cdir.update(status="running")
        self._running.set()
        return {}

    async def _op_kill(self, request: dict[str, Any]) -> dict[str, Any]:
        signum = int(request.get("signal", signal.SIGTERM))
        if self.status == "created":
            if signum and not self._abort.done():
                self._abort.set_result(128 + signum)
            return {}
        if self.status not in ("running", "paused"):
            raise UvmshimError("container not running")
        await self._kill(signum, bool(request.get("all")))
        return {}

    async def _kill(self, signum: int, all_processes: bool) -> None:
        assert self.container is not None
        try:
            await self.container.kill(signum, all_processes=all_processes)
        except UvmshimError as err:
            if self.status == "stopped":
                raise UvmshimError("container not running") from None
            raise UvmshimError(f"kill: {err}") from None

    async def _guest_crun(self, *args: str) -> str:
        result = await self.uvm.agent.exec([*GUEST_CRUN, *args])
        if result.exit_code != 0:
            raise UvmshimError(f"crun {args[0]}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return str(result.stdout.decode(errors="replace"))

    async def _op_ps(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status not in ("running", "paused"):
            return {"pids": []}
        out = await self._guest_crun("ps", "--format", "json", self.id)
        pids = json.loads(out or "[]")
        return {"pids": pids if isinstance(pids, list) else []}

    async def _op_pause(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status != "running":
            raise UvmshimError("container not running")
        await self._guest_crun("pause", self.id)
        self.status = "paused"
        self.cfg.cdir.update(status="paused")
        return {}

    async def _op_resume(self, _request: dict[str, Any]) -> dict[str, Any]:
        if self.status != "paused":
            raise UvmshimError("container not paused")
        await self._guest_crun("resume", self.id)
        self.status = "running"
        self.cfg.cdir.update(status="running")
        return {}

    async def _op_shutdown(self, _request: dict[str, Any]) -> dict[str, Any]:
        """``delete --force``: kill whatever runs; the shim then tears down and exits."""
        if self.status == "paused":
            with contextlib.suppress(UvmshimError):
                await self._guest_crun("resume", self.id)
            self.status = "running"
        if self.status in ("running", "starting"):
            with contextlib.suppress(UvmshimError):
                await self._kill(signal.SIGKILL, True)
        elif not self._abort.done():
            self._abort.set_result(128 + signal.SIGKILL)
        return {}

    async def _exec(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        """Run a process in the container; answer when it started and again when it exits."""
        try:
            if len(fds) != 3:
                raise UvmshimError("exec needs the process's stdin, stdout and stderr")
            if self.status != "running" or self.container is None:
                raise UvmshimError("cannot exec in a stopped container"
                                   if self.status == "stopped" else
                                   f"cannot exec in a {self.status} container")
            process = request.get("process")
            if not isinstance(process, dict) or not process.get("args"):
                raise UvmshimError("exec: the process has no args")
            proc = await self.container.exec(process, stdin=True)
            _reply(conn, {"ok": True})
            out = self._spawn(relay_output(proc.output(), fds[1], fds[2]), "exec-out")
            feed = self._spawn(relay_input(fds[0], proc.write_stdin, proc.close_stdin),
                               "exec-in")
            code = await proc.wait()
            await asyncio.wait([out], timeout=5)
            feed.cancel()
            _reply(conn, {"exit": code if code >= 0 else 128 - code})
        except UvmshimError as err:
            _reply(conn, {"error": str(err)})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def guest_spec(spec: Spec) -> Spec:
    """The spec as the guest's crun gets it: without the host's ``linux.cgroupsPath``.

    The path names a cgroup of the *host* (podman: ``/libpod_parent/libpod-<id>``); in the UVM
    it means nothing, and with it the guest's crun hangs when the container exits (seen with
    podman's specs). Without it crun uses its default cgroup for the container. A process
    without ``PATH`` gets the default one.
    """
    from dataclasses import replace

    if spec.linux and "cgroupsPath" in spec.linux:
        linux = {k: v for k, v in spec.linux.items() if k != "cgroupsPath"}
        spec = replace(spec, linux=linux)
    process = spec.raw.get("process")
    if isinstance(process, dict):
        env = process.get("env") or []
        if not any(isinstance(e, str) and e.startswith("PATH=") for e in env):
            # runc resolves a bare command with its own PATH; crun needs one in the
            # container's environment (ctr run --rootfs gives none).
            raw = dict(spec.raw)
            raw["process"] = {**process, "env": [*env, f"PATH={DEFAULT_PATH}"]}
            spec = replace(spec, raw=raw)
    return spec


def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(10)
        conn.sendall(json.dumps(answer).encode() + b"\n")


def run_shim(cfg: ShimConfig, log_path: str | None, debug: bool) -> int:
    """The shim's main (in the forked child): run the shim's event loop; return the status."""
    handlers: list[logging.Handler] = []
    if log_path:
        handlers.append(logging.FileHandler(log_path))
    else:
        handlers.append(logging.FileHandler(cfg.cdir.path / "shim.log"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=handlers,
                        format="%(asctime)s shim[%(process)d] %(levelname)s %(name)s: "
                               "%(message)s", force=True)

    async def main() -> int:
        asyncio.current_task().set_name("shim-main")  # type: ignore[union-attr]
        return await Shim(cfg).run()

    try:
        return asyncio.run(main())
    except BaseException:
        log.exception("shim failed")
        return 255
