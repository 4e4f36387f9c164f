"""Run one container in a fresh utility VM, relaying its stdio and signals (``uvmshim run``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from uvmshim.allocator import check_host_inputs
from uvmshim.asyncutil import cancel_on_signals
from uvmshim.errors import UvmshimError
from uvmshim.runtime import hooks, terminal
from uvmshim.runtime.container import Container
from uvmshim.runtime.vm import start_uvm
from uvmshim.spec import Spec
from uvmshim.uvm.network import ready_nic_netns
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.sizing import resolve_size

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


async def relay_output(container: Container, stdout: BinaryIO, stderr: BinaryIO) -> None:
    """Copy the container's output to ``stdout``/``stderr`` as it comes."""
    sinks = {"stdout": stdout, "stderr": stderr}
    async for stream, data in container.output():
        sink = sinks.get(stream, stdout)
        sink.write(data)
        sink.flush()


async def relay_stdin(container: Container, fd: int) -> None:
    """Copy ``fd`` to the container's stdin until EOF, then close it.

    Pipes and terminals are read through the event loop (a blocking read in a thread could not
    be cancelled, and would keep the process alive at exit); regular files are just read.
    """
    if stat.S_ISREG(os.fstat(fd).st_mode):
        while data := os.read(fd, 1 << 20):
            await container.write_stdin(data)
        await container.close_stdin()
        return
    if os.isatty(fd):  # not O_NONBLOCK: stdout is usually the same open file
        async for data in terminal.read_chunks(fd):
            await container.write_stdin(data)
        await container.close_stdin()
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0, closefd=False)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while data := await reader.read(65536):
            await container.write_stdin(data)
        await container.close_stdin()
    finally:
        transport.close()
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)


@contextlib.contextmanager
def forward_signals(container: Container) -> Iterator[None]:
    """Ctrl-C and SIGTERM go to the container's init; a second Ctrl-C stops waiting.

    The first SIGINT/SIGTERM is delivered to the container (which may handle it); if another
    SIGINT follows, the current task is cancelled, which tears everything down.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    seen: set[int] = set()
    pending: set[asyncio.Task[None]] = set()

    def on_signal(signum: int) -> None:
        if signum == signal.SIGINT and signum in seen and task is not None:
            task.cancel()
            return
        seen.add(signum)
        t = loop.create_task(_deliver(container, signum))
        pending.add(t)
        t.add_done_callback(pending.discard)

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        if installed and task is not None:
            # From here on (the teardown) a signal stops us, as before the container ran.
            cancel_on_signals(task)


async def _deliver(container: Container, signum: int) -> None:
    try:
        await container.kill(signum)
    except Exception as err:  # the container may have just exited
        log.debug("forwarding signal %d: %s", signum, err)


async def run_container(
    spec: Spec,
    *,
    container_id: str,
    memory_mb: int | None = None,
    cpus: int | None = None,
    stdin: bool = False,
    progress: Progress | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    template: bool | None = None,
    bundle: str = "",
) -> int:
    """Boot a UVM, run the container in it, and tear everything down; return its exit status.

    :param memory_mb: the UVM's memory in MiB; ``None``: sized from the spec as the runc path
        does (:func:`~uvmshim.uvm.sizing.resolve_size`: memory limit + the guest's overhead,
        CPUs from the quota, hcsshim's annotations).
    :param cpus: the UVM's vCPUs; ``None``: from the spec, likewise.
    :param template: see :func:`~uvmshim.runtime.vm.start_uvm` (``False``: boot cold).
    :param bundle: the bundle's absolute path, for the hooks' state.

    The spec's host hooks run as in the runc path (:mod:`uvmshim.runtime.hooks`), with this
    process as the state's ``pid`` (it stands for the container, as the runc path's shim
    does): ``prestart`` and ``createRuntime`` once the container exists in the guest (a
    failure fails the run; the container and the UVM are removed), ``poststart`` once it runs
    (a failure kills it and fails the run), ``poststop`` once it and the UVM are gone (if the
    create hooks passed; failures are warnings on ``stderr``). ``createContainer`` and
    ``startContainer`` run in the guest (the guest's crun).

    A spec whose process asks for a terminal (``-t``) gets a pty in the guest, sized like the
    user's terminal and resized with it (``SIGWINCH``); with ``stdin`` and a terminal on stdin,
    that terminal is in raw mode while the container runs (keys, Ctrl-C and Ctrl-D included, go
    to the container's pty) and is restored on every way out.

    :raises UvmshimError: the UVM, the allocation or the guest's create failed (nothing is left).
    """
    say = progress or (lambda _m: None)
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    options = UvmOptions.from_annotations(spec.annotations)
    in_fd = _fileno(sys.stdin)
    tty = terminal.spec_terminal(spec)
    if tty:
        spec = terminal.spec_with_console_size(spec, terminal.window_size(
            _fileno(out), _fileno(err), in_fd))
    raw = tty and stdin and terminal.is_terminal(in_fd)
    check_host_inputs(spec)  # what the allocation would refuse: refused before booting
    hooks.check(spec.hooks, spec.root.path if spec.root is not None else "")
    size = resolve_size(spec.linux, spec.annotations, memory_mb=memory_mb, cpus=cpus)
    log.info("UVM: %d MiB (%s), %d vCPUs (%s)", size.memory_mb, size.memory_from, size.cpus,
             size.cpus_from)
    state = {"id": container_id, "pid": os.getpid(), "bundle": bundle,
             "annotations": dict(spec.annotations)}
    created = False  # the container and its create hooks passed: poststop runs at the end
    try:
        async with start_uvm(options, memory_mb=size.memory_mb, cpus=size.cpus, progress=say,
                             template=template, netns=ready_nic_netns(spec.linux)) as uvm:
            container = Container(uvm.vm, uvm.agent, container_id, spec)
            say("attaching storage")
            await container.create(stdin=stdin)
            relay: asyncio.Task[None] | None = None
            feeder: asyncio.Task[None] | None = None
            try:
                await hooks.run_create_hooks(spec.hooks, state)
                created = True
                say("starting")
                relay = asyncio.create_task(relay_output(container, out, err))
                with contextlib.ExitStack() as user_terminal:
                    if raw:
                        say("running")  # the spinner is gone before the terminal turns raw
                        user_terminal.enter_context(terminal.raw_mode(in_fd))
                    if stdin:
                        feeder = asyncio.create_task(relay_stdin(container, in_fd))
                    if tty:
                        user_terminal.enter_context(terminal.on_window_change(
                            in_fd if raw else _fileno(out), container.resize))
                    with forward_signals(container):
                        await container.start()
                        await _poststart(container, spec, state)
                        say("running")
                        code = await container.wait()
                        await relay
            finally:
                for task in (feeder, relay):
                    if task is not None and not task.done():
                        task.cancel()
                await container.delete(uvm_discarded=True)
    finally:
        if created and spec.hooks and spec.hooks.get("poststop"):
            for problem in await hooks.run_hooks_warn(spec.hooks, "poststop", state,
                                                      "stopped"):
                err.write(f"uvmshim: warning: {problem}\n".encode())
                err.flush()
    if container.runtime_error is not None:
        raise container.runtime_error
    if container.integrity_error is not None:
        raise container.integrity_error
    return code


async def _poststart(container: Container, spec: Spec, state: dict[str, Any]) -> None:
    """The ``poststart`` hooks; a failure kills the container and fails the run (as runc's
    ``start``)."""
    if not spec.hooks or not spec.hooks.get("poststart"):
        return
    try:
        await hooks.run_hooks(spec.hooks, "poststart", state, "running")
    except hooks.HookError:
        with contextlib.suppress(UvmshimError):
            await container.kill(signal.SIGKILL, all_processes=True)
        raise


def _fileno(f: object) -> int:
    """``f``'s file descriptor; -1 if it has none (a test's buffer)."""
    try:
        return int(f.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return -1
