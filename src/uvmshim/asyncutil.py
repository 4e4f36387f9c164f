"""asyncio helpers shared by the layers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

#: The last SIGINT/SIGTERM that :func:`cancel_on_signals` turned into a cancellation (0: none).
received_signal = 0


def cancel_on_signals(task: asyncio.Task[Any]) -> None:
    """SIGINT and SIGTERM cancel ``task`` from now on (in the running loop), so that its
    cleanup runs whatever stage it is at; :data:`received_signal` says which one came.

    Called by the command line for the whole command, and again by code that handled the
    signals itself for a while (``uvmshim run`` forwards them to the container) to restore it.
    """
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        global received_signal
        received_signal = signum
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal, signum)


async def finish_despite_cancel(aw: Awaitable[T]) -> T:
    """Await ``aw`` to completion even if we are cancelled meanwhile, then re-raise the cancel.

    For cleanup, which must not stop halfway because a second Ctrl-C or a task cancel arrived.
    Unlike :func:`asyncio.shield` alone, the caller does not return before ``aw`` is done.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
