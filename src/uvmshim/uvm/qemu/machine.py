"""The QEMU process of one utility VM: launch, QMP, shutdown, and nothing left behind.

::

    async with QemuMachine(QemuConfig(kernel=..., initrd=...)) as vm:
        await vm.qmp.execute("query-status")
        ...   # vm.agent_socket_path is the guest agent's virtio-serial port

Whatever happens (launch failure, QMP error, cancellation, Ctrl-C), the machine ends with no
QEMU process, no host mount under its state directory, no socket and no state directory.
:func:`list_leftovers` finds what a crashed host process left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient, QMPError

from ... import hostpath, owners, procscan
from ...asyncutil import finish_despite_cancel
from ...errors import BackendError
from . import mountns, mounts
from .cmdline import build_argv
from .config import Accel, MachinePaths, QemuConfig
from .kvm import KvmProbe
from .sandbox import child_preexec, setpriv_prefix

#: How long QEMU gets to come up with its QMP greeting (start-up is ~40 ms; TCG hosts are slow).
QMP_CONNECT_TIMEOUT = 30.0
#: How long a killed QEMU gets to be reaped.
REAP_TIMEOUT = 10.0

_default_probe: KvmProbe | None = None


def default_kvm_probe() -> KvmProbe:
    """The process-wide probe, caching its verdict next to the default state directories."""
    global _default_probe
    if _default_probe is None:
        _default_probe = KvmProbe(hostpath.kvm_probe_cache())
    return _default_probe


class Runstate(enum.Enum):
    """Where a :class:`QemuMachine` is in its life."""

    IDLE = "idle"
    LAUNCHING = "launching"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting-down"
    STOPPED = "stopped"


class QemuLaunchError(BackendError):
    """QEMU did not come up: carries the argv, exit code and the tails of its logs."""

    def __init__(
        self, message: str, *, argv: list[str], returncode: int | None, qemu_log: str, console: str
    ) -> None:
        self.argv = argv
        self.returncode = returncode
        self.qemu_log = qemu_log
        self.console = console
        detail = [message]
        if returncode is not None:
            detail.append(f"exit code {returncode}")
        if qemu_log.strip():
            detail.append("qemu: " + " / ".join(qemu_log.strip().splitlines()[-5:]))
        if console.strip():
            detail.append("console: " + " / ".join(console.strip().splitlines()[-5:]))
        detail.append("argv: " + " ".join(argv))
        super().__init__("; ".join(detail))


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def create_state_dir(paths: MachinePaths) -> None:
    """Create a VM's private state directory with its read-only 9p export root.

    The export root (``share/``) is a read-only bind of ``exports/``: the guest can't create
    anything at the top of share0 (no planted symlinks where we later put mount points). Mount
    points are made in ``exports/`` and mounted on under ``share/``, which a read-only mount allows.
    ``share/`` is a shared mount (its own peer group), so the shares bound under it later also
    appear in QEMU's mount namespace, whose copy of it is a slave (:mod:`.mountns`); unmounting
    it (:func:`remove_state_dir`) ends that. ``root/`` is the empty directory on which QEMU's
    root is built in its namespace.

    :raise BackendError: the directory exists already, or the bind mount failed (then nothing
        is left behind).
    """
    paths.state_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        paths.state_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise BackendError(f"state directory {paths.state_dir} already exists") from None
    try:
        paths.exports_dir.mkdir(mode=0o755)
        paths.share_dir.mkdir(mode=0o755)
        (paths.state_dir / "root").mkdir(mode=0o700)
        mounts.bind_mount(paths.exports_dir, paths.share_dir, read_only=True)
        mounts.make_shared(paths.share_dir)
    except BaseException:
        shutil.rmtree(paths.state_dir, ignore_errors=True)
        raise


def remove_state_dir(paths: MachinePaths) -> list[str]:
    """Unmount everything under the state directory (lazily if busy), then delete it.

    Never raises; returns what could not be cleaned up. The directory is only deleted once no
    mount is left below it, so a stuck mount never leads ``rmtree`` into a shared host tree.
    """
    problems = [str(e) for e in mounts.unmount_all_under(paths.state_dir)]
    if mounts.mounts_under(paths.state_dir):
        problems.append(f"mounts remain under {paths.state_dir}, not removing it")
        return problems
    try:
        shutil.rmtree(paths.state_dir)
    except FileNotFoundError:
        pass
    except OSError as e:
        problems.append(f"remove {paths.state_dir}: {e}")
    return problems


class QemuMachine:
    """One QEMU utility VM process and its private state directory.

    :param config: what to run.
    :param vm_id: names the state directory; default a random id.
    :param on_shutdown: the graceful shutdown request (e.g. the agent's "power off"); without it,
        :meth:`shutdown` asks QEMU to ``quit``.
    :param kvm_probe: resolves ``accel="auto"``; default the process-wide :func:`default_kvm_probe`.
    :param ram_fd: the RAM file of a template or clone VM (``config.ram``), inherited by QEMU;
        the caller keeps it open until :meth:`launch` returns and closes it.
    :param nic_fd: the tap of the ready NIC (``config.ready_nic``), inherited by QEMU; the
        caller closes its own copy once :meth:`launch` returned.
    """

    def __init__(
        self,
        config: QemuConfig,
        *,
        vm_id: str | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        kvm_probe: KvmProbe | None = None,
        ram_fd: int | None = None,
        nic_fd: int | None = None,
    ) -> None:
        if (ram_fd is None) != (config.ram == "anonymous"):
            raise ValueError(f"ram={config.ram} and ram_fd={ram_fd} do not go together")
        if nic_fd is not None and not config.ready_nic:
            raise ValueError("a tap for the ready NIC, but the machine has none")
        self.config = config
        self._ram_fd = ram_fd
        self._nic_fd = nic_fd
        self.vm_id = vm_id or uuid.uuid4().hex[:12]
        if "/" in self.vm_id or self.vm_id in ("", ".", ".."):
            raise ValueError(f"bad vm id {self.vm_id!r}")
        self.paths = MachinePaths((config.base_dir or hostpath.vm_dir()) / self.vm_id)
        self.on_shutdown = on_shutdown
        self._probe = kvm_probe
        self._runstate = Runstate.IDLE
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._accel: Accel | None = None
        self._argv: list[str] = []
        self._returncode: int | None = None
        self._owns_state_dir = False

    # Section: public properties

    @property
    def runstate(self) -> Runstate:
        """The current :class:`Runstate`."""
        return self._runstate

    @property
    def qmp(self) -> QMPClient:
        """The connected QMP client. :raise BackendError: if the VM is not running."""
        if self._qmp is None or self._runstate is not Runstate.RUNNING:
            raise BackendError(f"VM {self.vm_id} is {self._runstate.value}: no QMP connection")
        return self._qmp

    @property
    def state_dir(self) -> Path:
        """The VM's private directory (see :mod:`.config` for its layout)."""
        return self.paths.state_dir

    @property
    def agent_socket_path(self) -> Path:
        """The unix socket of the guest agent's virtio-serial port (one client at a time)."""
        return self.paths.agent_socket

    @property
    def console_log(self) -> Path:
        """The guest serial console log (gone after :meth:`shutdown`)."""
        return self.paths.console_log

    @property
    def pid(self) -> int | None:
        """QEMU's pid while it runs."""
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def accel(self) -> Accel | None:
        """The accelerator in use, once launched."""
        return self._accel

    @property
    def argv(self) -> list[str]:
        """The full argv QEMU was started with (including the privilege-drop wrapper)."""
        return list(self._argv)

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, once it has exited."""
        return self._proc.returncode if self._proc else self._returncode

    # Section: lifecycle

    async def launch(self) -> None:
        """Create the state directory, start QEMU and connect QMP.

        :raise QemuLaunchError: QEMU failed to start (everything is cleaned up first).
        :raise BackendError: the state directory or share export could not be set up.
        """
        if self._runstate is not Runstate.IDLE:
            raise BackendError(f"VM {self.vm_id} is {self._runstate.value}; launch needs idle")
        self._runstate = Runstate.LAUNCHING
        try:
            await self._launch()
        except BaseException:
            await finish_despite_cancel(self._cleanup())
            raise
        self._runstate = Runstate.RUNNING

    async def _launch(self) -> None:
        cfg, paths = self.config, self.paths
        if cfg.accel == "auto":
            accel = await (self._probe or default_kvm_probe()).accel()
        else:
            accel = cfg.accel
        self._accel = accel
        for boot_file in (cfg.kernel, cfg.initrd):
            if not os.path.isfile(boot_file):
                raise BackendError(f"boot file {boot_file} does not exist")
        owners.acquire(owners.VM, paths.state_dir)  # before: a SIGKILL leaves a record
        try:
            create_state_dir(paths)
        except BaseException:
            owners.release(owners.VM, paths.state_dir)
            raise
        self._owns_state_dir = True

        # QMP over a socketpair and the agent port on a listening socket we bound: no race with
        # QEMU creating socket files, and no QMP socket file anyone else could connect to.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._spawn(ours, theirs, accel)
        except BaseException:
            ours.close()
            raise

    async def _spawn(self, ours: socket.socket, theirs: socket.socket, accel: Accel) -> None:
        cfg, paths = self.config, self.paths
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(paths.agent_socket))
            listener.listen(1)
            self._argv = build_argv(
                cfg, paths, accel=accel, qmp_fd=theirs.fileno(), agent_fd=listener.fileno(),
                ram_fd=self._ram_fd, nic_fd=self._nic_fd,
            )
            if cfg.run_as is not None:
                self._argv = setpriv_prefix(*cfg.run_as) + self._argv
            root = None
            if cfg.private_root:
                # QEMU can't create it in its read-only root: it gets this file bound there.
                fd = os.open(paths.console_log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    if cfg.run_as is not None:
                        os.fchown(fd, *cfg.run_as)
                finally:
                    os.close(fd)
                root = mountns.plan(cfg, paths, accel=accel)
            with open(paths.qemu_log, "wb") as log:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *self._argv,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        pass_fds=(theirs.fileno(), listener.fileno(),
                                  *(fd for fd in (self._ram_fd, self._nic_fd) if fd is not None)),
                        preexec_fn=child_preexec(die_with_parent=cfg.die_with_parent, root=root),
                        # Own session: a terminal's Ctrl-C goes to us, and we stop QEMU in order.
                        start_new_session=True,
                    )
                except (OSError, subprocess.SubprocessError) as e:
                    raise self._launch_error(f"cannot start {self._argv[0]}: {e}") from e
                self._proc = proc
        finally:
            theirs.close()
            listener.close()
        start = procscan.start_time(proc.pid)
        paths.pid_file.write_text(f"{proc.pid} {start}\n")
        await self._connect_qmp(ours, proc)

    async def _connect_qmp(self, sock: socket.socket, proc: asyncio.subprocess.Process) -> None:
        qmp = QMPClient(f"uvm-{self.vm_id}")
        self._qmp = qmp
        connect = asyncio.ensure_future(qmp.connect(sock))
        exited = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait(
                {connect, exited}, timeout=QMP_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (connect, exited):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t
        if connect in done and connect.exception() is None:
            try:
                status = await qmp.execute("query-status")
            except (QMPError, OSError, EOFError) as e:
                raise self._launch_error(f"QMP query-status failed: {e}") from e
            # A clone waits for its device state (-incoming defer): "inmigrate", not running.
            expected = "inmigrate" if self.config.ram == "clone" else "running"
            if not isinstance(status, dict) or status.get("status") != expected:
                raise self._launch_error(f"QEMU is not running after start: {status}")
            return
        if not done:
            raise self._launch_error(f"no QMP greeting within {QMP_CONNECT_TIMEOUT:.0f} s")
        err = connect.exception() if connect in done else None
        if exited not in done:
            # QMP broke first; usually QEMU is exiting. Give it a moment, for its exit code.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()
        if proc.returncode is not None:
            raise self._launch_error("QEMU exited during start-up") from err
        raise self._launch_error(f"QMP connection failed: {err}") from err

    def _launch_error(self, message: str) -> QemuLaunchError:
        return QemuLaunchError(
            message,
            argv=self._argv,
            returncode=self._proc.returncode if self._proc else None,
            qemu_log=_tail(self.paths.qemu_log),
            console=_tail(self.paths.console_log),
        )

    async def wait(self) -> int:
        """Wait until QEMU exits (e.g. the guest powered off); return its exit status."""
        if self._proc is None:
            raise BackendError(f"VM {self.vm_id} was never started")
        return await self._proc.wait()

    async def shutdown(self, timeout: float = 10.0, *, graceful: bool = True) -> None:
        """Stop the VM and remove every trace of it.

        Graceful first: ``on_shutdown`` (e.g. the agent powers the guest off) or QMP ``quit``,
        waiting up to ``timeout`` seconds for QEMU to exit; then SIGKILL. With ``graceful``
        False, QMP ``quit`` at once (hcsshim terminates its UVMs so): for a guest that holds
        nothing it must write back. Always: close QMP, reap QEMU, unmount every bind under the
        share (lazily if busy), remove the state directory. Calling it again, or on a machine
        that never launched, is a no-op.

        :raise BackendError: cleanup left something behind (the message says what).
        """
        if self._runstate in (Runstate.IDLE, Runstate.STOPPED):
            return
        self._runstate = Runstate.SHUTTING_DOWN
        try:
            await self._graceful(timeout, graceful)
        finally:
            await finish_despite_cancel(self._cleanup(check=True))

    async def _graceful(self, timeout: float, graceful: bool = True) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        # Any failure of the graceful path just means we go on to the forced kill.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                if graceful and self.on_shutdown is not None:
                    await self.on_shutdown()
                elif self._qmp is not None:
                    with contextlib.suppress(Exception):
                        await self._qmp.execute("quit")
                await proc.wait()

    async def _cleanup(self, check: bool = False) -> None:
        """Tear everything down; with ``check``, raise if something stayed behind."""
        problems: list[str] = []
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._qmp.disconnect()
            self._qmp = None
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            try:
                async with asyncio.timeout(REAP_TIMEOUT):
                    self._returncode = await proc.wait()
            except TimeoutError:
                problems.append(f"QEMU pid {proc.pid} did not exit after SIGKILL")
        if not self._owns_state_dir:
            self._runstate = Runstate.STOPPED
            return
        problems += remove_state_dir(self.paths)
        if not problems:
            owners.release(owners.VM, self.paths.state_dir)
        self._runstate = Runstate.STOPPED
        if check and problems:
            raise BackendError(f"VM {self.vm_id} cleanup: " + "; ".join(problems))

    async def __aenter__(self) -> QemuMachine:
        await self.launch()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


# Section: leak inventory


@dataclass
class Leftover:
    """A state directory found under a base directory, and what is still alive in it."""

    state_dir: Path
    #: The QEMU pid recorded in the directory, if that process is still alive.
    live_pid: int | None = None
    #: Mount points at or under the state directory.
    mounts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for ``uvmshim leaks``)."""
        return {"state_dir": str(self.state_dir), "live_pid": self.live_pid, "mounts": self.mounts}


def list_leftovers(base_dir: Path | None = None) -> list[Leftover]:
    """Every VM state directory under ``base_dir`` (default :func:`uvmshim.hostpath.vm_dir`).

    A running VM's directory is listed too: callers compare against the VMs they know.
    The live pid comes from ``qemu.pid`` (checked against the process start time), or else from
    a process whose command line names the directory (a crash before the pid file was written).
    Mounts under ``base_dir`` outside any directory are reported under their own path.
    """
    base = Path(os.path.realpath(base_dir or hostpath.vm_dir()))
    found: dict[Path, Leftover] = {}
    if base.is_dir():
        by_cmdline = _pids_naming(base)
        for d in sorted(base.iterdir()):
            if not d.is_dir() or d.is_symlink():
                continue
            left = Leftover(d, live_pid=by_cmdline.get(d.name))
            try:
                pid_s, start = (d / "qemu.pid").read_text().split()
                pid = int(pid_s)
                if procscan.start_time(pid) == start:  # None for a zombie
                    left.live_pid = pid
            except (OSError, ValueError):
                pass
            found[d] = left
    for m in mounts.mounts_under(base):
        rel = Path(m.mount_point).relative_to(base)
        key = base / rel.parts[0] if rel.parts else base
        found.setdefault(key, Leftover(key)).mounts.append(m.mount_point)
    return [found[k] for k in sorted(found)]


def _pids_naming(base: Path) -> dict[str, int]:
    """State directory name -> pid of a process whose argv names ``<base>/<name>/``."""
    prefix = os.fsencode(base) + b"/"
    result: dict[str, int] = {}
    for pid, argv in procscan.command_lines():
        for arg in argv:
            i = arg.find(prefix)
            if i >= 0:
                name = arg[i + len(prefix) :].split(b"/")[0].split(b",")[0]
                result.setdefault(os.fsdecode(name), pid)
                break
    return result


def reclaim(leftover: Leftover) -> list[str]:
    """Kill a leftover's QEMU (SIGKILL), unmount its mounts and delete its state directory.

    For a crashed host process's VMs; never call it on a VM another process still manages.
    Returns what could not be cleaned up (empty on success).
    """
    problems: list[str] = []
    pid = leftover.live_pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # not our child: poll until it is gone (or a zombie)
            if procscan.exited(pid):
                break
            time.sleep(0.05)
        else:
            problems.append(f"pid {pid} did not die")
    problems += remove_state_dir(MachinePaths(leftover.state_dir))
    return problems
