"""The host's side of a container's terminal: the user's terminal or a pty a runtime caller holds.

A container process with ``process.terminal`` runs on a pty in the guest (see
:mod:`uvmshim.agent.runtime`); its one output stream and its input are relayed to whatever
stands for its terminal on the host:

* for the people's CLI (``uvmshim run -it``, ``pod run -it``, ``exec -it``), the user's terminal:
  put in raw mode for as long as the container runs (:func:`raw_mode`, restored on every way
  out), its size given to the container at start (:func:`window_size`) and on every
  ``SIGWINCH`` (:func:`on_window_change`);
* for the runc command line, the slave of the pty whose master went to the caller over
  ``--console-socket`` (conmon, containerd's shim): raw, so that it passes bytes through
  untouched (the guest's pty does the echo, line editing and signals), and watched for the size
  changes the caller makes on its master (:func:`follow_window`).

Reading the terminal never sets ``O_NONBLOCK`` on it (:func:`read_chunks`): stdin, stdout and
stderr usually share one open file, and a non-blocking stdout would fail large writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

from uvmshim.spec import Spec

log = logging.getLogger(__name__)

#: ``(rows, cols)``.
Size = tuple[int, int]
Resize = Callable[[int, int], Awaitable[None]]

#: How often the size of a runtime caller's pty is looked at (an ioctl on the host: cheap).
POLL_INTERVAL = 0.1


def window_size(*fds: int) -> Size | None:
    """The window size of the first of ``fds`` that is a terminal with a size; None if none."""
    for fd in fds:
        if fd < 0:
            continue
        try:
            rows, cols, _, _ = struct.unpack(
                "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            continue
        if rows and cols:
            return rows, cols
    return None


def is_terminal(fd: int) -> bool:
    return fd >= 0 and os.isatty(fd)


def spec_terminal(spec: Spec) -> bool:
    """Whether the spec's process asks for a terminal."""
    process = spec.raw.get("process")
    return isinstance(process, dict) and bool(process.get("terminal"))


def with_console_size(process: dict[str, Any], size: Size | None) -> dict[str, Any]:
    """``process`` with ``consoleSize`` set to ``size`` unless it has one (or no size known)."""
    if size is None or isinstance(process.get("consoleSize"), dict):
        return process
    return {**process, "consoleSize": {"height": size[0], "width": size[1]}}


def spec_with_console_size(spec: Spec, size: Size | None) -> Spec:
    """``spec`` whose terminal process starts with ``size`` (see :func:`with_console_size`)."""
    process = spec.raw.get("process")
    if not isinstance(process, dict) or not process.get("terminal"):
        return spec
    new = with_console_size(process, size)
    return spec if new is process else replace(spec, raw={**spec.raw, "process": new})


def console_size_of(process: object) -> Size | None:
    """``process.consoleSize`` as ``(rows, cols)``, if it has a usable one."""
    if not isinstance(process, dict):
        return None
    size = process.get("consoleSize")
    if not isinstance(size, dict):
        return None
    rows, cols = size.get("height"), size.get("width")
    if isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0:
        return rows, cols
    return None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal ``fd`` in raw mode (no echo, no line editing, no signals from keys, no
    output processing); restore its mode on the way out, however it is left.

    Typed-ahead input is kept (``TCSANOW``); the old mode comes back after pending output
    (``TCSADRAIN``).
    """
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    # cfmakeraw(3)
    new[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    new[1] &= ~termios.OPOST
    new[2] &= ~(termios.CSIZE | termios.PARENB)
    new[2] |= termios.CS8
    new[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    new[6][termios.VMIN] = 1
    new[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


async def read_chunks(fd: int, size: int = 65536) -> AsyncIterator[bytes]:
    """What arrives on ``fd`` (a terminal or pipe), until EOF (or EIO: the pty's other side
    closed); leaves the fd's blocking mode alone.

    One ``read`` per readiness report never blocks, even on a blocking fd.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(fd, size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: a pty whose other side is gone
            data = b""
        if not data:
            loop.remove_reader(fd)
        queue.put_nowait(data)

    loop.add_reader(fd, readable)
    try:
        while data := await queue.get():
            yield data
    finally:
        loop.remove_reader(fd)


@contextlib.contextmanager
def on_window_change(fd: int, resize: Resize) -> Iterator[None]:
    """While inside: on each ``SIGWINCH``, pass the size of terminal ``fd`` to ``resize``.

    Only the newest size matters: a resize still being sent when the next signal comes is
    followed by one more with the size at that time.
    """
    loop = asyncio.get_running_loop()
    busy = False
    again = False

    async def send() -> None:
        nonlocal busy, again
        busy = True
        try:
            while True:
                again = False
                size = window_size(fd)
                if size is not None:
                    try:
                        await resize(*size)
                    except Exception as err:  # the process may just have exited
                        log.debug("resize: %s", err)
                if not again:
                    return
        finally:
            busy = False

    tasks: set[asyncio.Task[None]] = set()

    def on_signal() -> None:
        nonlocal again
        if busy:
            again = True
            return
        task = loop.create_task(send())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGWINCH, on_signal)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        for task in tasks:
            task.cancel()


async def follow_window(fd: int, resize: Resize, last: Size | None,
                        interval: float = POLL_INTERVAL) -> None:
    """Pass every change of terminal ``fd``'s size to ``resize`` (runs until cancelled).

    ``fd`` is a pty slave whose master a runtime caller holds: conmon and containerd's shim
    resize the master (``TIOCSWINSZ``), and nothing signals the holder of the slave (it is no
    process's controlling terminal here), so the size is looked at every ``interval`` seconds.
    ``last`` is the size the process already has.
    """
    while True:
        size = window_size(fd)
        if size is not None and size != last:
            try:
                await resize(*size)
                last = size
            except Exception as err:  # the process may just have exited; try again later
                log.debug("resize: %s", err)
        await asyncio.sleep(interval)
