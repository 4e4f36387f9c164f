"""The one wrapper for external programs that run to completion (mkfs, qemu-img, apt-get, ...).

Long-lived children (QEMU) have their own lifecycle in :mod:`uvmshim.uvm.qemu.machine`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from uvmshim.errors import ToolError

log = logging.getLogger(__name__)


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
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=cwd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})})
    except FileNotFoundError:
        err = ToolError(args, 127, f"{args[0]}: command not found")
        err.hint = missing_hint
        raise err from None
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
