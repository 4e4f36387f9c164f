"""The one wrapper for external programs (mkfs, qemu-img, apt-get, zstd, the pod daemon, ...).

* :func:`run_tool` runs a program to completion and returns its output (async).
* :func:`running` starts a program for the length of an ``async with`` block and always kills
  and reaps it on the way out (async).
* :func:`start` starts a program in the background and hands the :class:`subprocess.Popen` to
  the caller, who waits for it or kills it (synchronous code, or a process meant to outlive us).

Each logs the command line at debug level and reports a missing program as a :class:`ToolError`
with status 127 and the caller's ``missing_hint``. The utility VM's QEMU process has its own
lifecycle (fd passing, privilege drop, death with its parent) in :mod:`uvmshim.uvm.qemu.machine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from uvmshim.errors import ToolError

log = logging.getLogger(__name__)

#: Where a child's standard stream goes: a pipe, ``/dev/null``, or an open file (or fd).
Redirect = int | IO[bytes] | None
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


def _argv(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    return args


def _missing(args: list[str], hint: str | None) -> ToolError:
    err = ToolError(args, 127, f"{args[0]}: command not found")
    err.hint = hint
    return err


async def run_tool(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    missing_hint: str | None = None,
) -> str:
    """Run a program to completion and return its stdout.

    stdin is closed unless ``stdin`` is given; ``env`` is added to the environment. If the
    caller is cancelled (Ctrl-C), the child is killed and reaped before the cancellation
    goes on.

    :raises ToolError: the program is missing (status 127, with ``missing_hint``) or exited
        non-zero (with the tail of its stderr).
    """
    args = _argv(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=cwd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise _missing(args, missing_hint) from None
    try:
        out, errout = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise ToolError(args, proc.returncode or 0, errout.decode(errors="replace"))
    return out.decode(errors="replace")


@contextlib.asynccontextmanager
async def running(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: Redirect = PIPE,
    stderr: Redirect = DEVNULL,
    missing_hint: str | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a program (stdin ``/dev/null``) for the length of the block.

    On the way out, normal or not, the program is killed (SIGKILL) if it still runs, and reaped.

    :raises ToolError: the program is missing (status 127, with ``missing_hint``).
    :raises OSError: it could not be started for another reason.
    """
    args = _argv(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    except FileNotFoundError:
        raise _missing(args, missing_hint) from None
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def start(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: Redirect = DEVNULL,
    stdout: Redirect = DEVNULL,
    stderr: Redirect = DEVNULL,
    new_session: bool = False,
    missing_hint: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a program in the background and return it; the caller waits for it or kills it.

    :param new_session: run it in a session of its own (a daemon: no terminal signals reach it).
    :raises ToolError: the program is missing (status 127, with ``missing_hint``).
    :raises OSError: it could not be started for another reason.
    """
    args = _argv(argv)
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr,
                                start_new_session=new_session)
    except FileNotFoundError:
        raise _missing(args, missing_hint) from None
