"""The runc commands after ``create``: each one reads the state and/or asks the shim.

Messages follow runc's where its callers match on them: containerd's runc shim treats
``does not exist`` as not-found and ``container not running`` as already exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvmshim.errors import UvmshimError
from uvmshim.runc import protocol
from uvmshim.runc.state import (
    ContainerDir,
    NotFound,
    NotRunning,
    list_ids,
    public,
    shim_alive,
)


def _existing(root: str, container_id: str) -> ContainerDir:
    cdir = ContainerDir.of(root, container_id)
    if not cdir.state_file.exists():
        raise NotFound(f"container does not exist: {container_id}")
    return cdir


def _socket(root: str, cdir: ContainerDir, st: dict[str, Any]) -> Path:
    """Where the container's requests go: its shim, or its pod sandbox's shim."""
    sandbox = st.get("sandbox")
    return ContainerDir.of(root, str(sandbox)).socket if sandbox else cdir.socket


def state(root: str, container_id: str) -> dict[str, Any]:
    """The OCI state; a container whose shim died is ``stopped``."""
    return public(_existing(root, container_id).current())


def start(root: str, container_id: str) -> None:
    cdir = _existing(root, container_id)
    with cdir.locked():
        st = cdir.current()
        if st["status"] == "stopped":
            raise UvmshimError("cannot start a container that has stopped")
        if st["status"] in ("running", "paused"):
            raise UvmshimError("cannot start an already running container")
        protocol.call(_socket(root, cdir, st), {"op": "start", "id": container_id})


def parse_signal(value: str) -> int:
    """``9``, ``KILL``, ``SIGKILL``, ``sigkill`` → 9 (runc accepts names and numbers)."""
    value = value.strip()
    if value.isdigit():
        num = int(value)
        if 0 < num < 65:
            return num
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name.startswith("SIGRTMIN+") and name[9:].isdigit():
            return int(signal.SIGRTMIN) + int(name[9:])
        with contextlib.suppress(KeyError):
            return int(signal.Signals[name])
    raise UvmshimError(f"unknown signal {value!r}")


def kill(root: str, container_id: str, signum: int, all_processes: bool = False) -> None:
    cdir = _existing(root, container_id)
    st = cdir.current()
    if st["status"] == "stopped":
        raise UvmshimError("container not running")
    try:
        protocol.call(_socket(root, cdir, st), {"op": "kill", "id": container_id,
                                               "signal": signum, "all": all_processes})
    except protocol.ShimGone:
        raise UvmshimError("container not running") from None


def _wait_gone(st: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while shim_alive(st):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def delete(root: str, container_id: str, force: bool) -> None:
    """Remove a stopped (or, with ``force``, any) container and everything it held."""
    from uvmshim.runc.create import cleanup

    cdir = ContainerDir.of(root, container_id)
    if not cdir.exists():
        if force:
            return  # runc: delete --force of a missing container succeeds
        raise NotFound(f"container does not exist: {container_id}")
    with cdir.locked():
        try:
            st = cdir.current()
        except NotFound:
            st = {"status": "stopped"}  # a create that died before writing its state
        if st["status"] == "creating":
            if not force:
                raise UvmshimError(f"container {container_id} is being created")
        elif st["status"] not in ("stopped", "created") and not force:
            raise UvmshimError(f"cannot delete container {container_id} that is not stopped: "
                               f"{st['status']}")
        if st.get("sandbox"):
            # A pod member lives in its sandbox's shim, whether or not the process standing
            # for it (the pid) is still there.
            _remove_member(root, cdir, st)
        elif shim_alive(st):
            with contextlib.suppress(UvmshimError):
                protocol.call(_socket(root, cdir, st), {"op": "shutdown", "id": container_id},
                              timeout=30)
            if not _wait_gone(st, 60):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(st["pid"]), signal.SIGKILL)
                _wait_gone(st, 10)
        problems = cleanup(cdir)
    if st.get("poststop"):  # after the container and its UVM are gone; failures only warned
        from uvmshim.runtime.hooks import run_hooks_sync

        for warning in run_hooks_sync({"poststop": st["poststop"]}, "poststop", st, "stopped"):
            print(f"uvmshim: warning: {warning}", file=sys.stderr)
    if problems:
        raise UvmshimError(f"delete {container_id}: " + "; ".join(problems))


def _remove_member(root: str, cdir: ContainerDir, st: dict[str, Any]) -> None:
    with contextlib.suppress(UvmshimError):
        protocol.call(_socket(root, cdir, st), {"op": "shutdown", "id": cdir.id}, timeout=30)
    if not _wait_gone(st, 60):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(st["pid"]), signal.SIGKILL)


def _ask(root: str, container_id: str, request: dict[str, Any]) -> dict[str, Any]:
    cdir = _existing(root, container_id)
    st = cdir.current()
    if st["status"] == "stopped":
        raise UvmshimError("container not running")
    try:
        return protocol.call(_socket(root, cdir, st), {**request, "id": container_id})
    except protocol.ShimGone:
        raise UvmshimError("container not running") from None


def pause(root: str, container_id: str) -> None:
    _ask(root, container_id, {"op": "pause"})


def resume(root: str, container_id: str) -> None:
    _ask(root, container_id, {"op": "resume"})


def update(root: str, container_id: str, resources: dict[str, Any]) -> None:
    """New limits (OCI ``linux.resources``) for the container's cgroup in the guest, and the
    UVM's new bounds in its host cgroup (the shim applies both)."""
    _ask(root, container_id, {"op": "update", "resources": resources})


def stats(root: str, container_id: str) -> dict[str, str]:
    """The container's cgroup files in the guest (``events``; runc's errors: a container that
    does not exist, one that is not running: :class:`NotRunning`)."""
    cdir = _existing(root, container_id)
    st = cdir.current()
    if st["status"] == "stopped":
        raise NotRunning(container_id)
    try:
        answer = protocol.call(_socket(root, cdir, st), {"op": "stats", "id": container_id})
    except protocol.ShimGone:
        raise NotRunning(container_id) from None
    except UvmshimError as err:  # the shim's answer is text: its own "not running" is this
        if str(err) == str(NotRunning(container_id)):
            raise NotRunning(container_id) from None
        raise
    files = answer.get("files")
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def events(root: str, container_id: str, *, interval: float, once: bool,
           emit: Callable[[dict[str, Any]], None]) -> None:
    """runc's ``events``: a ``stats`` event now (``once``: then return) and every ``interval``
    seconds, an ``oom`` event when the guest's OOM killer killed in the container, until the
    container stops (runc would go on logging errors)."""
    from uvmshim.runc.stats import oom_kills, runc_stats

    cdir = _existing(root, container_id)
    if interval <= 0:
        raise UvmshimError("duration interval must be greater than 0")
    files = stats(root, container_id)
    ooms = oom_kills(files)
    while True:
        emit({"type": "stats", "id": container_id, "data": runc_stats(files)})
        if once:
            return
        time.sleep(interval)
        try:
            files = stats(root, container_id)
        except NotRunning:
            return
        except UvmshimError as err:
            if cdir.current()["status"] == "stopped":
                return
            print(f"uvmshim: events: {err}", file=sys.stderr)
            continue
        if oom_kills(files) > ooms:
            emit({"type": "oom", "id": container_id})
        ooms = oom_kills(files)


def ps(root: str, container_id: str) -> list[int]:
    """Pids of the container's processes (guest pids: they live in the UVM)."""
    cdir = _existing(root, container_id)
    if cdir.current()["status"] == "stopped":
        return []
    pids = _ask(root, container_id, {"op": "ps"}).get("pids") or []
    return [int(p) for p in pids]


def list_states(root: str) -> list[dict[str, Any]]:
    out = []
    for cid in list_ids(root):
        with contextlib.suppress(UvmshimError):
            out.append(public(ContainerDir.of(root, cid).current()))
    return out


def container_process(root: str, container_id: str) -> dict[str, Any]:
    """The init's process object from the bundle (defaults for an ``exec`` given as ARGS)."""
    from uvmshim.spec import load_spec

    st = _existing(root, container_id).read()
    try:
        spec = load_spec(str(st.get("bundle", "")))
    except UvmshimError:
        return {}
    process = spec.raw.get("process")
    return dict(process) if isinstance(process, dict) else {}


def exec_process(root: str, container_id: str, process: dict[str, Any], *,
                 console_socket: str | None, detach: bool, pid_file: str | None) -> int:
    """Run ``process`` in the container; return its exit status (0 with ``detach``).

    The process on the host that stands for the exec'd one is this process, or with ``detach``
    a forked child (its pid goes into ``pid_file``) that waits on the shim's connection and exits
    with the status, so the caller's subreaper can ``waitpid`` it as with runc.
    """
    cdir = _existing(root, container_id)
    st = cdir.current()
    if st["status"] != "running":
        raise UvmshimError("cannot exec in a stopped container")
    stdio = [0, 1, 2]
    slave = -1
    if process.get("terminal"):
        if not console_socket:
            if detach:
                raise UvmshimError("cannot allocate tty if runc will detach without setting "
                                   "console socket")
        else:
            master, slave = protocol.open_pty()
            try:
                protocol.send_console(console_socket, master)
            finally:
                os.close(master)
            stdio = [slave, slave, slave]
    try:
        conn = protocol.Connection(_socket(root, cdir, st), timeout=60)
    except protocol.ShimGone:
        raise UvmshimError("cannot exec in a stopped container") from None
    try:
        conn.send({"op": "exec", "id": container_id, "process": process}, stdio)
        if slave >= 0:
            os.close(slave)
            slave = -1
        conn.receive()  # started
        conn.sock.settimeout(None)
        if not detach:
            return int(conn.receive().get("exit", 255))
        from uvmshim.runc.create import _write_pid_file, fork_exit_relay

        pid = fork_exit_relay(conn)
        if pid_file:
            _write_pid_file(pid_file, pid)
        return 0
    finally:
        if slave >= 0:
            os.close(slave)
        conn.close()
