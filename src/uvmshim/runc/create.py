"""``create``: prepare the state directory, fork the shim, wait until it has the container.

The shim is forked, not exec'd: a fresh interpreter would cost another start-up. The child
starts a new session (a signal to the caller's process group must not reach it), keeps copies
of the caller's stdio for the relay (conmon's pipes; fd 3 and up are closed so that conmon's
sync pipe is not held open), points its own 0/1/2 at ``/dev/null`` (no stray write can land in
the container's output) and runs the shim. One fork is enough: ``create`` exits right after the
shim reports, and the shim is re-parented to the caller's subreaper (conmon, containerd's shim)
exactly as runc's container init is, so that it can ``waitpid`` the pid in ``--pid-file``.

If ``create`` is killed while it waits, the shim notices when it reports (the ready pipe is
broken), tears everything down and removes the state directory. If ``create`` is told to stop
(SIGTERM, SIGINT), it stops the shim first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvmshim import hostpath, owners, procscan
from uvmshim.errors import UvmshimError
from uvmshim.runc import protocol
from uvmshim.runc.state import ContainerDir, new_state
from uvmshim.spec import Spec, load_bundle

#: How long ``create`` waits for the shim (first use builds the boot files; TCG boots in ~5 s).
CREATE_TIMEOUT = 600.0


def bundle_spec(bundle: str) -> Spec:
    """The bundle's spec with relative paths made absolute (``root.path``, disk and bind
    sources: relative to the bundle, as for runc), after checking the rootfs exists."""
    spec = load_bundle(bundle)
    if spec.root is not None and spec.root.path:
        path = spec.root.path
        if not os.path.isdir(path):
            raise UvmshimError(f"rootfs ({path}) does not exist", where="root.path",
                               hint="the bundle's root.path must name a directory")
    process = spec.raw.get("process")
    if not isinstance(process, dict) or not process.get("args"):
        raise UvmshimError("process.args must not be empty", where="config.json")
    from uvmshim.runtime.hooks import check

    check(spec.hooks, spec.root.path if spec.root is not None else "")
    return spec


def create(root: str, container_id: str, bundle: str, *, pid_file: str | None,
           console_socket: str | None, log_path: str | None, debug: bool,
           wait: bool = False, systemd_cgroup: bool = False) -> int:
    """Create the container; return the shim's pid (runc's ``create``).

    :param wait: ``run`` in the foreground: do not detach; the caller waits for the shim.
    :raises UvmshimError: bad bundle, duplicate id, the shim failed; nothing is left behind.
    """
    cdir = ContainerDir.of(root, container_id)
    if cdir.exists():
        raise UvmshimError(f"container with id exists: {container_id}")
    bundle = os.path.abspath(bundle)
    spec = bundle_spec(bundle)
    process = spec.raw.get("process")
    terminal = isinstance(process, dict) and bool(process.get("terminal"))
    if terminal and not console_socket and not wait:
        raise UvmshimError("cannot allocate tty if runc will detach without setting "
                           "console socket")
    from uvmshim.runtime.leaks import collect_dead_owners

    collect_dead_owners()
    if os.path.abspath(root) != str(hostpath.RUN_DIR):
        owners.remember_place("root", root)
    owners.acquire(owners.DIR, cdir.path)  # before: a SIGKILL leaves a record
    try:
        cdir.make()
    except BaseException:
        owners.release(owners.DIR, cdir.path)
        raise
    try:
        with cdir.locked():
            import uuid

            state = new_state(container_id, bundle, spec.root.path if spec.root else "",
                              dict(spec.annotations))
            if spec.hooks and spec.hooks.get("poststop"):
                state["poststop"] = spec.hooks["poststop"]  # for ``delete``
            sandbox = pod_sandbox(root, spec)
            if sandbox is None:  # namespace paths of another container: join its UVM
                sandbox, spec = namespace_sandbox(root, spec)
            if sandbox is not None:  # a pod member: joins the sandbox's UVM
                state["sandbox"] = sandbox.id
                cdir.write(state)
                pid = _join_pod(cdir, sandbox, spec, terminal, console_socket)
            else:
                from uvmshim.runc.cgroups import cgroup_path
                from uvmshim.uvm.sizing import uvm_size

                size = uvm_size(spec.linux, spec.annotations)  # errors before any VM
                cgroup = cgroup_path(str((spec.linux or {}).get("cgroupsPath") or ""),
                                     systemd_cgroup)
                state["vm_id"] = f"oci-{uuid.uuid4().hex[:12]}"
                cdir.write(state)
                pid = _fork_shim(cdir, spec, terminal, console_socket, log_path, debug,
                                 memory_mb=size.memory_mb, cpus=size.cpus, cgroup=cgroup)
            if pid_file:
                _write_pid_file(pid_file, pid)
    except BaseException:
        _remove(cdir)
        owners.release(owners.DIR, cdir.path)
        raise
    # Created: the state directory stays until ``delete`` (the shim holds its VM).
    owners.release(owners.DIR, cdir.path)
    return pid


def pod_sandbox(root: str, spec: Spec) -> ContainerDir | None:
    """The sandbox's state directory if ``spec`` is a pod's workload container (CRI
    annotations), else None.

    :raises UvmshimError: the sandbox is not a live container of this runtime root.
    """
    from uvmshim.allocator import ANNOTATION_CONTAINER_TYPE, ANNOTATION_SANDBOX_ID

    if spec.annotations.get(ANNOTATION_CONTAINER_TYPE) != "container":
        return None
    sandbox_id = spec.annotations.get(ANNOTATION_SANDBOX_ID, "")
    sdir = ContainerDir.of(root, sandbox_id)
    if not sdir.state_file.exists() or sdir.read().get("sandbox"):
        raise UvmshimError(f"pod sandbox {sandbox_id} does not exist",
                           where=f"annotations[{ANNOTATION_SANDBOX_ID!r}]",
                           hint="create the pod's sandbox container with this runtime first")
    if sdir.current()["status"] not in ("created", "running"):
        raise UvmshimError(f"pod sandbox {sandbox_id} is not running")
    return sdir


def namespace_sandbox(root: str, spec: Spec) -> tuple[ContainerDir | None, Spec]:
    """The container whose namespaces ``spec`` joins (podman pods), and the spec with those
    paths in the guest's terms (:mod:`uvmshim.runc.namespaces`).

    :raises UvmshimError: a host namespace path, or the container is not live.
    """
    from uvmshim.runc.namespaces import join_target

    target, spec = join_target(root, spec)
    if target is None:
        return None, spec
    sdir = ContainerDir.of(root, target)
    if sdir.current()["status"] not in ("created", "running"):
        raise UvmshimError(f"container {target}, whose namespaces this one joins, is not "
                           f"running", where="linux.namespaces")
    return sdir, spec


def _console(terminal: bool, console_socket: str | None) -> tuple[list[int], int]:
    """The stdio fds for the container: ours, or a pty slave whose master went to the caller."""
    if not (terminal and console_socket):
        return [0, 1, 2], -1
    master, slave = protocol.open_pty()
    try:
        protocol.send_console(console_socket, master)
    finally:
        os.close(master)
    return [slave, slave, slave], slave


def _join_pod(cdir: ContainerDir, sandbox: ContainerDir, spec: Spec, terminal: bool,
              console_socket: str | None) -> int:
    """Ask the sandbox's shim to add the container; fork the process that stands for it.

    That process (the pid in ``--pid-file``) holds the connection on which the sandbox's shim
    reports the container's exit, records it and exits with the same status.
    """
    stdio, slave = _console(terminal, console_socket)
    conn = protocol.Connection(sandbox.socket, timeout=300)
    try:
        conn.send({"op": "add", "id": cdir.id, "spec": spec.to_json()}, stdio)
        if slave >= 0:
            os.close(slave)
        conn.receive()
        conn.sock.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()

        def record(code: int) -> None:
            with contextlib.suppress(UvmshimError, OSError):
                cdir.update(status="stopped", exit_code=code)

        pid = fork_exit_relay(conn, record)
        cdir.update(status="created", pid=pid, shim_start=procscan.start_time(pid))
        return pid
    finally:
        conn.close()


def _fork_shim(cdir: ContainerDir, spec: Spec, terminal: bool, console_socket: str | None,
               log_path: str | None, debug: bool, *, memory_mb: int, cpus: int,
               cgroup: str) -> int:
    stdio, slave = _console(terminal, console_socket)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the shim
        code = 255
        try:
            os.setsid()
            os.close(ready_r)
            fds = [os.dup(fd) for fd in stdio]
            detach_stdio(keep={ready_w, *fds})
            from uvmshim.runc.shim import ShimConfig, run_shim

            cfg = ShimConfig(cdir=cdir, spec=spec, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                             ready_fd=ready_w, memory_mb=memory_mb, cpus=cpus, cgroup=cgroup)
            code = run_shim(cfg, log_path, debug)
        finally:
            os._exit(code)
    os.close(ready_w)
    if slave >= 0:
        os.close(slave)
    try:
        answer = _wait_ready(ready_r, pid)
    finally:
        os.close(ready_r)
    if "error" in answer:
        _reap(pid)
        raise UvmshimError(str(answer["error"]))
    return pid


def fork_exit_relay(conn: protocol.Connection,
                    on_exit: Callable[[int], None] | None = None) -> int:
    """Fork the process that stands for a container process: it waits for the exit status
    the shim reports on ``conn``, calls ``on_exit`` with it and exits with the same status.

    The child runs in a session of its own and keeps no fd but the connection's: not the
    state lock (flock is per open file: it would stay held), nor the caller's pipes (e.g.
    conmon's sync pipe). It exits with 255 when the shim is gone or anything fails.

    :returns: the child's pid.
    """
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.setsid()
            detach_stdio(keep={conn.sock.fileno()})
            try:
                code = int(conn.receive().get("exit", 255))
            except UvmshimError:
                code = 255  # the shim is gone
            if on_exit is not None:
                on_exit(code)
        finally:
            os._exit(code)
    return pid


def detach_stdio(*, keep: set[int]) -> None:
    """In a forked child: point stdin/out/err at /dev/null and close every other fd but ``keep``.

    A process that outlives the CLI call must not hold the caller's pipes (conmon waits for
    their EOF) or anything else it inherited.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    for fd in procscan.open_fds():
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _wait_ready(fd: int, pid: int) -> dict[str, Any]:
    """Read the shim's one-line report; on SIGTERM/SIGINT stop the shim first."""
    import select

    def stop(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _reap(pid)
        raise UvmshimError(f"create interrupted by signal {signum}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        buf = b""
        while not buf.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], CREATE_TIMEOUT)
            if not ready:
                os.kill(pid, signal.SIGTERM)
                _reap(pid)
                raise UvmshimError(f"the shim did not create the container within "
                                   f"{CREATE_TIMEOUT:.0f} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                _reap(pid)
                raise UvmshimError("the shim exited before the container was created")
            buf += chunk
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    answer = json.loads(buf)
    if not isinstance(answer, dict):
        raise UvmshimError("bad report from the shim")
    return answer


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _write_pid_file(path: str, pid: int) -> None:
    """Write the pid file atomically (runc does: its readers poll for it)."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def _remove(cdir: ContainerDir) -> None:
    """Remove a failed container's state (its VM, if any, was stopped by the shim)."""
    cleanup(cdir)


def cleanup(cdir: ContainerDir) -> list[str]:
    """Reclaim whatever a dead shim left (its VM directory, QEMU, mounts), remove the state dir."""
    problems: list[str] = []
    vm_id = None
    cgroups: Any = None
    with contextlib.suppress(UvmshimError):
        st = cdir.read()
        vm_id, cgroups = st.get("vm_id"), st.get("cgroups")
    if isinstance(vm_id, str) and vm_id:
        from uvmshim.uvm.qemu.machine import list_leftovers, reclaim

        for left in list_leftovers(hostpath.vm_dir()):
            if left.state_dir.name == vm_id:
                problems += reclaim(left)
    if isinstance(cgroups, list) and cgroups:  # after QEMU and the shim are gone
        from uvmshim.runc.cgroups import remove

        problems += [f"cgroup {d} is still in use" for d in remove([str(c) for c in cgroups])]
    shutil.rmtree(cdir.path, ignore_errors=True)
    return problems
