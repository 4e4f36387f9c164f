"""The per-container shim: the host process that *is* the container for its caller.

``create`` forks it (:func:`run_shim`); its pid goes into ``--pid-file``. It boots the utility VM,
creates the container in it, reports to ``create`` over the ready pipe, then serves the later
CLI calls on ``shim.sock`` (:mod:`uvmshim.runc.protocol`). It relays stdio between the fds
it inherited (or a pty slave) and the container, and once the container's init has exited it
deletes the container, stops the UVM, records ``stopped`` and exits with the init's status —
so that conmon or containerd's shim, which wait for this pid, see the container's exit status.

Signals sent to the shim go to the container once it runs (as they would reach runc's init);
before ``start``, a terminating signal aborts the container.

A pod sandbox's shim also hosts the pod's workload containers (``add`` requests, see
:mod:`uvmshim.runc.create`): each is a :class:`~uvmshim.runc.hosted.Hosted` in the
same UVM; when the sandbox's init exits, they are killed first.
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

from uvmshim import owners, procscan
from uvmshim.errors import ReleaseError, UvmshimError
from uvmshim.runc import protocol
from uvmshim.runc.hosted import Hosted, reply
from uvmshim.runc.state import ContainerDir
from uvmshim.runtime import terminal
from uvmshim.runtime.container import Container
from uvmshim.spec import Spec

log = logging.getLogger(__name__)

#: Signals the shim forwards to a running container.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH)
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
    #: ``linux.cgroupsPath`` below the hierarchies' roots ("" if none): the shim and its QEMU
    #: go there (:mod:`uvmshim.runc.cgroups`).
    cgroup: str = ""


class Shim:
    """The UVM, its own container and the pod members that joined it; see the module doc."""

    def __init__(self, cfg: ShimConfig) -> None:
        self.cfg = cfg
        self.id = cfg.cdir.id
        self.uvm: Any = None
        self.main: Hosted | None = None
        self.members: dict[str, Hosted] = {}
        self._member_tasks: set[asyncio.Task[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready_sent = False
        self._orphaned = False
        #: The container's ``linux.resources`` after the ``update`` requests so far.
        self._resources: dict[str, Any] | None = None

    # The life of the shim -------------------------------------------------------------------

    async def run(self) -> int:
        """Create, serve, wait for the init, tear down; return the exit status."""
        from uvmshim.runtime.vm import start_uvm
        from uvmshim.uvm.network import ready_nic_netns
        from uvmshim.uvm.options import UvmOptions

        self._install_signals()
        code = 255
        try:
            options = UvmOptions.from_annotations(self.cfg.spec.annotations)
            vm_id = self.cfg.cdir.read().get("vm_id")
            if self.cfg.cgroup:  # before QEMU starts: it inherits the cgroup
                self._join_cgroup()
            async with start_uvm(options, memory_mb=self.cfg.memory_mb, cpus=self.cfg.cpus,
                                 vm_id=vm_id,
                                 netns=ready_nic_netns(self.cfg.spec.linux)) as uvm:
                self.uvm = uvm
                container = Container(uvm.vm, uvm.agent, self.id,
                                      guest_spec(self.cfg.spec, console=self.cfg.stdin))
                await container.create(stdin=True)
                cfg = self.cfg
                self.main = Hosted(container, uvm, (cfg.stdin, cfg.stdout, cfg.stderr),
                                   self._spawn, lambda st: cfg.cdir.update(status=st))
                try:
                    code = await self._serve(self.main)
                finally:
                    await self._stop_members()
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
                owners.release(owners.DIR, self.cfg.cdir.path)
            else:
                with contextlib.suppress(UvmshimError, OSError):
                    self.cfg.cdir.update(status="stopped", exit_code=code)
            for fd in (self.cfg.stdin, self.cfg.stdout, self.cfg.stderr):
                with contextlib.suppress(OSError):
                    os.close(fd)
        return code

    def _join_cgroup(self) -> None:
        from uvmshim.runc import cgroups

        resources = (self.cfg.spec.linux or {}).get("resources")
        limits = cgroups.bounds(resources if isinstance(resources, dict) else None,
                                self.cfg.memory_mb)
        dirs = cgroups.place(os.getpid(), self.cfg.cgroup, limits)
        self.cfg.cdir.update(cgroups=dirs)  # ``delete`` removes them
        log.info("cgroup %s, bounds %s", self.cfg.cgroup, limits)

    async def _serve(self, main: Hosted) -> int:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(os.fspath(self.cfg.cdir.socket))
        listener.listen(16)
        listener.setblocking(False)
        accept = asyncio.create_task(self._accept_loop(listener))
        try:
            pid = os.getpid()
            await self._create_hooks(self.cfg.spec, pid)
            main.poststart = lambda: self._poststart(self.cfg.spec, self.id, pid)
            self.cfg.cdir.update(status="created", pid=pid, shim_start=procscan.start_time(pid))
            if not self._ready({"ok": True, "pid": pid}):
                return 255  # create's caller is gone: nobody will ever start this container
            return await main.wait()
        finally:
            accept.cancel()
            listener.close()
            with contextlib.suppress(asyncio.CancelledError):
                await accept

    async def _stop_members(self) -> None:
        """The sandbox is going away: kill the pod's other containers and wait for them."""
        for member in list(self.members.values()):
            with contextlib.suppress(UvmshimError):
                await member.shutdown({})
        if self._member_tasks:
            await asyncio.wait(list(self._member_tasks), timeout=30)

    def _ready(self, message: dict[str, Any]) -> bool:
        """Tell ``create`` how it went (once); False if ``create`` is no longer there."""
        if self._ready_sent:
            return True
        self._ready_sent = True
        try:
            os.write(self.cfg.ready_fd, json.dumps(message).encode() + b"\n")
            # Created: the state stays until ``delete``; failed: ``create`` removes it.
            owners.release(owners.DIR, self.cfg.cdir.path)
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
        main = self.main
        if main is not None and main.status == "running":
            self._spawn(main.signal(signum), "signal")
        elif signum == signal.SIGWINCH:
            return
        elif main is not None:
            if not main.abort.done() and main.status == "created":
                main.abort.set_result(128 + signum)
        else:  # still booting: stop that
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
            op = str(request.get("op"))
            if op == "add":
                fds, taken = [], fds
                await self._add(conn, request, taken)
                return
            target = self._target(str(request.get("id") or self.id))
            if op == "exec":
                fds, taken = [], fds
                await target.exec(conn, request, taken)
                return
            if op == "guest-exec":
                answer = await self._guest_exec(request)
            elif op == "update" and target is self.main:
                answer = await self._update(target, request)
            else:
                answer = await target.handle(op, request)
            reply(conn, {"ok": True, **answer})
        except UvmshimError as err:
            reply(conn, {"error": str(err)})
        except (OSError, ValueError) as err:
            log.warning("request: %s", err)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    def _target(self, container_id: str) -> Hosted:
        if container_id == self.id and self.main is not None:
            return self.main
        member = self.members.get(container_id)
        if member is None:
            raise UvmshimError(f"container does not exist: {container_id}")
        return member

    async def _add(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        """A pod member joins this UVM; answer when created and again when its init exits."""
        hosted: Hosted | None = None
        try:
            member_id = str(request.get("id"))
            if len(fds) != 3:
                raise UvmshimError("a pod member needs its stdin, stdout and stderr")
            if self.main is None or self.main.status not in ("created", "running"):
                raise UvmshimError(f"the pod sandbox {self.id} is not running")
            if member_id in self.members or member_id == self.id:
                raise UvmshimError(f"container with id exists: {member_id}")
            spec = guest_spec(Spec.from_json(request.get("spec")), console=fds[0])
            container = Container(self.uvm.vm, self.uvm.agent, member_id, spec)
            await container.create(stdin=True)
            member_dir = ContainerDir(self.cfg.cdir.root, member_id)
            hosted = Hosted(container, self.uvm, (fds[0], fds[1], fds[2]), self._spawn,
                            lambda st: member_dir.update(status=st))
            self.members[member_id] = hosted
            member_spec = Spec.from_json(request.get("spec"))
            # The member's own pid exists once it is created: its hooks get the sandbox's shim
            # (the process that holds the UVM and the container)
            await self._create_hooks(member_spec, os.getpid(), member_dir)
            hosted.poststart = lambda: self._poststart(member_spec, member_id, os.getpid(),
                                                       member_dir)
            task = asyncio.current_task()
            if task is not None:  # always, in a coroutine run by a task
                self._member_tasks.add(task)
            reply(conn, {"ok": True})
            code = await hosted.wait()
            reply(conn, {"exit": code})
        except UvmshimError as err:
            reply(conn, {"error": str(err)})
        finally:
            if hosted is not None:
                self.members.pop(hosted.id, None)
                try:
                    await hosted.container.delete()
                except ReleaseError as err:
                    log.warning("%s", err)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._member_tasks.discard(asyncio.current_task())

    async def _create_hooks(self, spec: Spec, pid: int, cdir: ContainerDir | None = None
                            ) -> None:
        """``prestart`` then ``createRuntime`` hooks (:mod:`uvmshim.runtime.hooks`): the
        container exists in the guest and waits; a failure fails ``create``."""
        if not spec.hooks:
            return
        from uvmshim.runtime.hooks import run_create_hooks

        await run_create_hooks(spec.hooks, {**(cdir or self.cfg.cdir).read(), "pid": pid})

    async def _poststart(self, spec: Spec, container_id: str, pid: int,
                         cdir: ContainerDir | None = None) -> None:
        if not spec.hooks or not spec.hooks.get("poststart"):
            return
        from uvmshim.runtime.hooks import run_hooks

        state = {**(cdir or self.cfg.cdir).read(), "id": container_id, "pid": pid}
        await run_hooks(spec.hooks, "poststart", state, "running")

    async def _update(self, main: Hosted, request: dict[str, Any]) -> dict[str, Any]:
        """``update`` of the shim's own container: the limits in the guest, then the UVM's
        bounds in the host cgroup the shim and QEMU were placed in (see
        :mod:`uvmshim.runc.cgroups`). A memory limit the UVM cannot hold, or a bound below
        what QEMU uses, is refused before anything changes."""
        from uvmshim.runc import cgroups
        from uvmshim.uvm.sizing import ANNOTATION_MEMORY_MB

        changes = request.get("resources")
        if not isinstance(changes, dict):
            raise UvmshimError("update needs resources")
        if self._resources is None:
            spec_resources = (self.cfg.spec.linux or {}).get("resources")
            self._resources = dict(spec_resources) if isinstance(spec_resources, dict) else {}
        merged = cgroups.merge_resources(self._resources, changes)
        cgroups.check_fits(changes, self.cfg.memory_mb,
                           exact=ANNOTATION_MEMORY_MB in self.cfg.spec.annotations)
        dirs = [str(d) for d in self.cfg.cdir.read().get("cgroups") or []]
        limits = cgroups.update_limits(changes, merged, self.cfg.memory_mb) if dirs else {}
        cgroups.check_room(dirs, limits)
        cpu = changes.get("cpu")
        if isinstance(cpu, dict) and isinstance(cpu.get("quota"), int) and cpu["quota"] < 0 \
                and not cpu.get("period"):
            # runc writes "max <period>"; the guest's crun writes nothing without a period
            period = merged["cpu"].get("period")
            cpu = {**cpu, "period": period if isinstance(period, int) and period > 0
                   else 100000}
            request = {**request, "resources": {**changes, "cpu": cpu}}
        answer = await main.update(request)
        self._resources = merged
        if limits:
            cgroups.apply(dirs, limits)
            log.info("update: cgroup bounds %s", limits)
        return answer

    async def _guest_exec(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a command in the UVM itself (diagnostics)."""
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or self.uvm is None:
            raise UvmshimError("guest-exec needs argv")
        res = await self.uvm.agent.exec([str(a) for a in argv], timeout=60)
        return {"exit": res.exit_code, "stdout": res.stdout.decode(errors="replace"),
                "stderr": res.stderr.decode(errors="replace")}


def guest_spec(spec: Spec, *, console: int = -1) -> Spec:
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
    # A terminal starts with the size of the pty the caller holds (``console``: its slave),
    # unless the spec gives one.
    return terminal.spec_with_console_size(spec, terminal.window_size(console))


def run_shim(cfg: ShimConfig, log_path: str | None, debug: bool) -> int:
    """The shim's main (in the forked child): run the shim's event loop; return the status."""
    # Held until the container is created: if both the shim and ``create`` are killed
    # before that, the next command reclaims it.
    owners.acquire(owners.DIR, cfg.cdir.path)
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
