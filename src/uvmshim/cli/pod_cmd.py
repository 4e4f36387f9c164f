"""``uvmshim pod``: pods of containers sharing one utility VM, served by a pod daemon."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click

from uvmshim import owners, tools
from uvmshim.cli.main import collect_garbage, dump_json, memory_option, run_async
from uvmshim.errors import UvmshimError
from uvmshim.hostpath import RUN_DIR, pod_dir, pods_dir
from uvmshim.protocol.framing import read_frame, write_frame
from uvmshim.runtime import terminal
from uvmshim.runtime.specgen import RunOptions, build_spec
from uvmshim.uvm.network import network_annotations

CREATE_TIMEOUT = 180.0


def pods_dir_default() -> Path:
    return RUN_DIR / "pods"


@click.group("pod")
def pod_group() -> None:
    """Pods: a sandbox and workload containers in one UVM (hcsshim's hypervisor-isolated pods).

    \b
      uvmshim pod create web --rootfs ./rootfs
      uvmshim pod run web --sandbox-mount shared:/shared -- sh -c 'date > /shared/t'
      uvmshim pod run web --sandbox-mount shared:/shared -- cat /shared/t
      uvmshim pod stop web
    """


def _alive(name: str) -> bool:
    ready = pod_dir(name) / "ready"
    try:
        pid = int(ready.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _claim(name: str, directory: Path) -> None:
    """Create the pod's directory, atomically: of concurrent creates of one name, exactly
    one wins; the others get a clear error. A directory no live process holds (a killed
    create or daemon left it) is reclaimed first.

    :raises UvmshimError: the pod exists (or is being created).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.parent != pods_dir_default():
        owners.remember_place("pods", directory.parent)
    for _ in range(2):
        owners.acquire(owners.DIR, directory)  # before: a SIGKILL leaves a record
        try:
            directory.mkdir()
            return
        except FileExistsError:
            owners.release(owners.DIR, directory)
        if owners.is_held(directory, owners.live_holdings()) or _alive(name):
            raise UvmshimError(f"pod {name} exists", hint=f"uvmshim pod stop {name}")
        shutil.rmtree(directory, ignore_errors=True)  # a dead pod's leftover
    raise UvmshimError(f"pod {name} exists", hint=f"uvmshim pod stop {name}")


@pod_group.command("create")
@click.argument("name")
@click.option("--rootfs", required=True, type=click.Path(file_okay=False, exists=True),
              help="Root filesystem (with /bin/sh) for the sandbox and, by default, workloads.")
@click.option("--memory", "memory_mb", default=None, callback=memory_option, metavar="SIZE",
              help="UVM memory (MiB, or 300m, 2g). Default: sized from the sandbox's spec "
                   "as 'uvmshim run' does (512 MiB).")
@click.option("--cpus", type=click.IntRange(1, 64), default=None,
              help="UVM vCPUs. Default: from the sandbox's spec (2).")
@click.option("--network", type=click.Choice(["none", "nat"]), default="none",
              show_default=True, help="nat: one outbound network for the pod's containers "
              "(QEMU user-mode NAT), shared like localhost.")
@click.option("-p", "--publish", multiple=True, metavar="[IP:]HOST:CTR[/tcp|udp]",
              help="Publish a port of the pod on the host (with --network=nat; repeatable).")
def create_command(name: str, rootfs: str, memory_mb: int | None, cpus: int | None,
                   network: str,
                   publish: tuple[str, ...]) -> None:
    """Boot a UVM for pod NAME and start its sandbox; return once it is ready."""
    network_annotations(network, publish)  # refused here, not in the daemon's log
    directory = pod_dir(name)
    collect_garbage()
    _claim(name, directory)
    (directory / "rootfs").write_text(os.path.abspath(rootfs))
    with open(directory / "pod.log", "wb") as logf:
        proc = tools.start(
            [sys.executable, "-m", "uvmshim.runtime.podd", name, "--rootfs",
             os.path.abspath(rootfs),
             *(["--memory", str(memory_mb)] if memory_mb is not None else []),
             *(["--cpus", str(cpus)] if cpus is not None else []),
             "--network", network, *(f"--publish={p}" for p in publish)],
            stdout=logf, stderr=logf, new_session=True)
    deadline = time.monotonic() + CREATE_TIMEOUT
    while not (directory / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            failed = directory / "failed"
            why = failed.read_text() if failed.exists() else \
                (directory / "pod.log").read_text()[-2000:]
            shutil.rmtree(directory, ignore_errors=True)
            raise UvmshimError(f"pod {name} did not start: {why.strip()}")
        time.sleep(0.05)
    click.echo(name)


async def _request(name: str, req: dict[str, Any]) -> Any:
    sock = pod_dir(name) / "pod.sock"
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
    except OSError:
        raise UvmshimError(f"no running pod {name}",
                           hint=f"uvmshim pod create {name} --rootfs DIR") from None
    try:
        await write_frame(writer, req)
        reply = await read_frame(reader)
    finally:
        writer.close()
    if reply is None or not reply.get("ok"):
        raise UvmshimError(str((reply or {}).get("error", "the pod daemon went away")),
                           hint=(reply or {}).get("hint"))
    return reply.get("result")


@pod_group.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--name", "container_id", default="", help="Container id (default: random).")
@click.option("--rootfs", type=click.Path(file_okay=False), default=None,
              help="Root filesystem (default: the pod's).")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]")
@click.option("--disk", "disks", multiple=True, metavar="IMAGE:CTR[:ro]")
@click.option("--hugepages", multiple=True, metavar="NAME:CTR")
@click.option("--sandbox-mount", "sandbox_mounts", multiple=True, metavar="NAME:CTR[:ro]",
              help="A directory shared by the pod's containers (sandbox://NAME).")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open to the container.")
@click.option("-t", "--tty", is_flag=True, help="Give the container a terminal; with -i your "
              "terminal is in raw mode until it exits.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(name: str, container_id: str, rootfs: str | None, volumes: tuple[str, ...],
                disks: tuple[str, ...], hugepages: tuple[str, ...],
                sandbox_mounts: tuple[str, ...], env: tuple[str, ...], interactive: bool,
                tty: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND as a workload container in pod NAME; remove it when it exits.

    Put ``--`` before COMMAND so that its options are not taken for uvmshim's.
    """
    pod_rootfs = pod_dir(name) / "rootfs"
    if not pod_rootfs.exists():
        raise UvmshimError(f"no running pod {name}",
                           hint=f"uvmshim pod create {name} --rootfs DIR")
    root = os.path.abspath(rootfs) if rootfs else pod_rootfs.read_text()
    spec = build_spec(RunOptions(args=list(command), rootfs=root, volumes=volumes, disks=disks,
                                 hugepages=hugepages, sandbox_mounts=sandbox_mounts,
                                 env=list(env), terminal=tty)).to_json()
    if tty:
        spec["process"] = terminal.with_console_size(spec["process"], _user_window())
    cid = container_id or f"{name}-{uuid.uuid4().hex[:8]}"
    sys.exit(run_async(_attach(name, {"op": "run", "id": cid, "spec": spec,
                                      "stdin": interactive}, stdin=interactive, tty=tty)))


@pod_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("container_id")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open to the process.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal; with -i your "
              "terminal is in raw mode until it exits.")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE")
@click.option("-w", "--workdir", default=None, help="Working directory in the container.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(name: str, container_id: str, interactive: bool, tty: bool,
                 env: tuple[str, ...], workdir: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running container CONTAINER_ID of pod NAME (NAME itself: the pod's
    sandbox); its exit status becomes uvmshim's.

    \b
      uvmshim pod exec -it web web-1a2b3c4d -- sh
    """
    sys.exit(run_async(exec_in_pod(name, container_id, list(command), interactive=interactive,
                                   tty=tty, env=list(env), workdir=workdir)))


async def exec_in_pod(name: str, container_id: str, command: list[str], *, interactive: bool,
                      tty: bool, env: list[str], workdir: str | None) -> int:
    """``exec`` COMMAND in a container of pod NAME; return its exit status."""
    process: dict[str, Any] = {"args": command, "terminal": tty}
    if env:
        process["env"] = env  # added to the container's by the pod daemon
    if workdir:
        process["cwd"] = workdir
    if tty:
        process = terminal.with_console_size(process, _user_window())
    return await _attach(name, {"op": "exec", "id": container_id, "process": process},
                         stdin=interactive, tty=tty)


def _user_window() -> terminal.Size | None:
    return terminal.window_size(sys.stdin.fileno(), sys.stdout.fileno())


async def _attach(name: str, request: dict[str, Any], *, stdin: bool, tty: bool) -> int:
    """Send a ``run`` or ``exec`` request to pod NAME's daemon and attach to the process: its
    output to ours, our stdin to it (``stdin``), our terminal's size changes to its terminal
    (``tty``), our terminal in raw mode meanwhile (``tty`` and ``stdin`` on a terminal).
    Return its exit status."""
    sock = pod_dir(name) / "pod.sock"
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
    except OSError:
        raise UvmshimError(f"no running pod {name}",
                           hint=f"uvmshim pod create {name} --rootfs DIR") from None
    lock = asyncio.Lock()

    async def send(frame: dict[str, Any]) -> None:
        async with lock:
            await write_frame(writer, frame)

    async def feed() -> None:
        fd = sys.stdin.fileno()
        if os.isatty(fd) or not stat.S_ISREG(os.fstat(fd).st_mode):
            chunks = terminal.read_chunks(fd)
        else:
            chunks = _file_chunks(fd)
        async for data in chunks:
            await send({"stdin": base64.b64encode(data).decode()})
        await send({"eof": True})

    async def resize(rows: int, cols: int) -> None:
        await send({"resize": [rows, cols]})

    in_fd = sys.stdin.fileno()
    feeder: asyncio.Task[None] | None = None
    try:
        await send(request)
        first = await read_frame(reader)
        if first is None or not first.get("ok"):
            raise UvmshimError(str((first or {}).get("error", "the pod daemon went away")),
                               hint=(first or {}).get("hint"))
        with contextlib.ExitStack() as user_terminal:
            if tty and stdin and terminal.is_terminal(in_fd):
                user_terminal.enter_context(terminal.raw_mode(in_fd))
            if tty:
                user_terminal.enter_context(terminal.on_window_change(
                    in_fd if terminal.is_terminal(in_fd) else sys.stdout.fileno(), resize))
            if stdin:
                feeder = asyncio.create_task(feed())
            sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
            while (frame := await read_frame(reader)) is not None:
                if "exit_code" in frame:
                    return int(frame["exit_code"])
                sink = sinks.get(str(frame.get("stream")), sys.stdout.buffer)
                sink.write(base64.b64decode(frame.get("data", "")))
                sink.flush()
        raise UvmshimError(f"pod {name} went away while {request.get('id')} ran")
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
        writer.close()


async def _file_chunks(fd: int) -> AsyncIterator[bytes]:
    while data := os.read(fd, 1 << 20):
        yield data


@pod_group.command("ps")
@click.argument("name")
def ps_command(name: str) -> None:
    """List the containers running in pod NAME."""
    dump_json(run_async(_request(name, {"op": "ps"})))


@pod_group.command("rm")
@click.argument("name")
@click.argument("container_id")
def rm_command(name: str, container_id: str) -> None:
    """Kill and remove container CONTAINER_ID of pod NAME."""
    run_async(_request(name, {"op": "rm", "id": container_id}))


@pod_group.command("stop")
@click.argument("name")
def stop_command(name: str) -> None:
    """Stop pod NAME: remove its containers and sandbox, and shut its UVM down."""
    run_async(_request(name, {"op": "stop"}))
    deadline = time.monotonic() + 60
    while pod_dir(name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if pod_dir(name).exists():
        raise UvmshimError(f"pod {name} did not stop within 60 s",
                           hint="uvmshim leaks --reclaim")


@pod_group.command("ls")
def ls_command() -> None:
    """List the pods on this host."""
    pods = pods_dir()
    if pods.is_dir():
        for d in sorted(pods.iterdir()):
            click.echo(f"{d.name}\t{'running' if _alive(d.name) else 'dead'}")
