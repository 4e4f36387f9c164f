"""The pod daemon: one process per pod that owns its UVM and serves ``uvmshim pod`` calls.

A pod outlives any one command, so ``uvmshim pod create`` starts this daemon (detached, in its
own session); it boots the UVM, starts the pod's sandbox container, and serves requests on a
unix socket in the pod's directory (:func:`uvmshim.hostpath.pod_dir`, by default
``/run/uvmshim/pods/<name>/``):

* ``run`` {id, spec, stdin}: create and start a workload container, stream its output back on
  the same connection as ``{"stream", "data"}`` frames, then ``{"exit_code"}``; the container
  is removed when it exits, or killed and removed if the client goes away first.
* ``exec`` {id, process}: run another process (an OCI process object) in a running container of
  the pod (``id``: a workload container, or the pod's name for its sandbox); output and exit
  come back as for ``run``.

While a ``run`` or ``exec`` process runs, the client sends ``{"stdin": <base64>}``,
``{"eof": true}`` (end of input) and ``{"resize": [rows, cols]}`` (its terminal's new size; for a
process with ``process.terminal``) frames on the same connection.
* ``ps``: the pod's containers. ``rm`` {id}: kill and remove one. ``stop``: stop the pod (the
  daemon then exits, and with it the UVM).

Frames use the agent protocol's framing (4-byte length + JSON object).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from uvmshim import owners
from uvmshim.errors import UvmshimError
from uvmshim.hostpath import pod_dir
from uvmshim.protocol.framing import read_frame, write_frame
from uvmshim.runtime.container import Container
from uvmshim.runtime.pod import Pod, pause_spec, run_pod
from uvmshim.spec import Spec
from uvmshim.uvm.qemu.agent_client import ContainerProcess
from uvmshim.uvm.sizing import resolve_size

log = logging.getLogger(__name__)


class PodServer:
    def __init__(self, pod: Pod, stopped: asyncio.Event) -> None:
        self.pod = pod
        self.stopped = stopped
        self.running: dict[str, asyncio.Task[None]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await read_frame(reader)
            if req is None:
                return
            op = req.get("op")
            try:
                if op == "run":
                    await self._run(req, reader, writer)
                    return
                if op == "exec":
                    await self._exec(req, reader, writer)
                    return
                if op == "ps":
                    result: Any = {"pod": self.pod.id, "containers": sorted(self.pod.containers)}
                elif op == "rm":
                    cid = str(req.get("id"))
                    task = self.running.get(cid)
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    else:
                        await self.pod.remove_container(cid)
                    result = {"removed": cid}
                elif op == "stop":
                    self.stopped.set()
                    result = {"stopping": self.pod.id}
                else:
                    raise UvmshimError(f"unknown request {op!r}")
                await write_frame(writer, {"ok": True, "result": result})
            except UvmshimError as err:
                await write_frame(writer, {"ok": False, "error": str(err), "hint": err.hint})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _run(self, req: dict[str, Any], reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        cid = str(req.get("id"))
        spec = Spec.from_json(req.get("spec"))
        container = await self.pod.add_container(cid, spec, stdin=bool(req.get("stdin")))
        await write_frame(writer, {"ok": True, "result": {"created": cid}})
        task = asyncio.create_task(self._attach(container, writer))
        self.running[cid] = task
        # The client closing its end means "stop": kill the container.
        watcher = asyncio.create_task(_client_input(reader, container, task))
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            watcher.cancel()
            self.running.pop(cid, None)
            with contextlib.suppress(UvmshimError):
                await self.pod.remove_container(cid)

    async def _attach(self, container: Container, writer: asyncio.StreamWriter) -> None:
        pump = asyncio.create_task(_relay_output(container.output(), writer))
        await container.start()
        code = await container.wait()
        await pump
        await write_frame(writer, {"exit_code": code})

    async def _exec(self, req: dict[str, Any], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        cid = str(req.get("id"))
        container = self.pod.sandbox if cid == self.pod.id else self.pod.containers.get(cid)
        if container is None:
            raise UvmshimError(f"pod {self.pod.id} has no container {cid}",
                               hint=f"uvmshim pod ps {self.pod.id}")
        process = req.get("process")
        if not isinstance(process, dict) or not process.get("args"):
            raise UvmshimError("exec needs a command")
        base = container.spec.raw.get("process")
        if isinstance(base, dict):  # the container's environment, user and cwd by default
            env = {str(e).split("=", 1)[0]: str(e) for e in [*(base.get("env") or []),
                                                             *(process.get("env") or [])]}
            process = {**{k: base[k] for k in ("user", "cwd", "capabilities", "rlimits",
                                               "noNewPrivileges") if k in base},
                       **process, "env": list(env.values())}
        proc = await container.exec(process, stdin=True)
        await write_frame(writer, {"ok": True, "result": {"exec": proc.key}})
        pump = asyncio.create_task(_relay_output(proc.output(), writer))
        watcher = asyncio.create_task(_client_input(reader, proc, None))
        try:
            code = await proc.wait()
            await pump
            await write_frame(writer, {"exit_code": code if code >= 0 else 128 - code})
        finally:
            watcher.cancel()
            pump.cancel()


async def _relay_output(chunks: AsyncIterator[tuple[str, bytes]],
                        writer: asyncio.StreamWriter) -> None:
    async for stream, data in chunks:
        await write_frame(writer, {"stream": stream, "data": base64.b64encode(data).decode()})


async def _client_input(reader: asyncio.StreamReader, proc: Container | ContainerProcess,
                        task: asyncio.Task[None] | None) -> None:
    """Pass the client's ``stdin``/``eof``/``resize`` frames to ``proc``; when the client goes
    away, cancel ``task`` (if given)."""
    with contextlib.suppress(Exception):
        while (frame := await read_frame(reader)) is not None:
            try:
                if "stdin" in frame:
                    await proc.write_stdin(base64.b64decode(str(frame["stdin"])))
                if frame.get("eof"):
                    await proc.close_stdin()
                size = frame.get("resize")
                if isinstance(size, list) and len(size) == 2:
                    await proc.resize(int(size[0]), int(size[1]))
            except UvmshimError as err:  # e.g. the process just exited
                log.debug("input for %s: %s", getattr(proc, "id", ""), err)
    if task is not None and not task.done():
        task.cancel()


async def serve(name: str, rootfs: str, memory_mb: int | None = None, cpus: int | None = None,
                *, network: str = "none", publish: Sequence[str] = ()) -> None:
    """Run pod ``name`` until SIGTERM/SIGINT. ``memory_mb``/``cpus``: the UVM's size; None:
    sized from the sandbox's spec (:func:`~uvmshim.uvm.sizing.resolve_size`)."""
    directory = pod_dir(name)
    sock = directory / "pod.sock"
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    sandbox = pause_spec(rootfs, network=network, publish=publish)
    size = resolve_size(sandbox.linux, sandbox.annotations, memory_mb=memory_mb, cpus=cpus)
    async with run_pod(name, sandbox, memory_mb=size.memory_mb, cpus=size.cpus) as pod:
        server_state = PodServer(pod, stopped)
        server = await asyncio.start_unix_server(server_state.handle, path=str(sock))
        (directory / "ready").write_text(str(os.getpid()))
        async with server:
            await stopped.wait()
        for task in list(server_state.running.values()):
            task.cancel()
        for task in list(server_state.running.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main() -> None:
    """Entry point of the daemon (``python -m uvmshim.runtime.podd NAME ...``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--rootfs", required=True)
    parser.add_argument("--memory", type=int, default=None)
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--network", default="none")
    parser.add_argument("--publish", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    directory = pod_dir(args.name)
    # The daemon holds the pod for its life (``pod create``, which made the directory,
    # exits once the pod is ready): a killed daemon's pod is reclaimed by the next command.
    owners.acquire(owners.DIR, directory)
    try:
        asyncio.run(serve(args.name, args.rootfs, args.memory, args.cpus,
                          network=args.network, publish=args.publish))
    except UvmshimError as err:
        print(f"error: {err}", file=sys.stderr)
        (directory / "failed").write_text(str(err))
        sys.exit(1)
    finally:
        # Everything in the pod is gone by now; the directory goes too (unless it failed, so
        # that ``pod create`` can read why, and remove it).
        if not (directory / "failed").exists():
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
