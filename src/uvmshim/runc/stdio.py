"""Copying between host file descriptors and a process in the guest.

The shim's stdio fds are whatever its caller gave ``create`` (conmon's pipes, containerd's
fifos, ``/dev/null``) or a pty slave; writes are blocking (the reader is the caller, which drains
them), and a reader that went away only means the output is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable

CHUNK = 65536


def write_all(fd: int, data: bytes) -> bool:
    """Write everything to ``fd``; False once the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)
            continue
        except OSError as err:
            if err.errno in (errno.EPIPE, errno.EIO, errno.EBADF, errno.ENXIO):
                return False
            raise
        view = view[n:]
    return True


async def relay_output(chunks: AsyncIterator[tuple[str, bytes]], stdout: int,
                       stderr: int) -> None:
    """Copy ``(stream, data)`` chunks to the stdout/stderr fds until the process exits."""
    alive = {stdout: True, stderr: True}
    async for stream, data in chunks:
        fd = stderr if stream == "stderr" else stdout
        if alive[fd]:
            alive[fd] = write_all(fd, data)


def _pollable(fd: int) -> bool:
    """Whether epoll accepts ``fd`` (pipes, sockets, ttys; not files or ``/dev/null``)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def relay_input(fd: int, write: Callable[[bytes], Awaitable[None]],
                      close: Callable[[], Awaitable[None]]) -> None:
    """Copy ``fd`` to a guest process's stdin until EOF, then close that stdin.

    Files and ``/dev/null`` are read directly (epoll refuses them); pipes and ttys through the
    event loop, so that the copy can be cancelled when the process exits.
    """
    if not _pollable(fd):
        while data := os.read(fd, CHUNK):
            await write(data)
        await close()
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # a pty whose other side closed: EIO
            data = b""
        if not data:
            loop.remove_reader(fd)
        queue.put_nowait(data)

    was_blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        while data := await queue.get():
            await write(data)
        await close()
    finally:
        loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.set_blocking(fd, was_blocking)
