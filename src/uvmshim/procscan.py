"""Everything uvmshim reads about host processes from ``/proc``, in one place.

* :func:`start_time` tells a live process from a recycled pid: a pid is recorded together with
  its start time, and the process counts as the same only while both match.
* :func:`exited` says whether a process is gone (or only its zombie is left).
* :func:`command_lines` lists the argv of every other process, to find QEMUs by the paths
  they name even when no pid was recorded.
* :func:`open_fds` lists this process's file descriptors.

Mount tables (``/proc/self/mountinfo``) are read by :mod:`uvmshim.uvm.qemu.mounts`.

STDLIB ONLY: imported by every CLI call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, the state, first),
    or None if there is no such process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    return stat[stat.rfind(")") + 2 :].split()


def state(pid: int) -> str | None:
    """The process state letter (``R``, ``S``, ``D``, ``Z``, ...), or None if there is no such
    process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks after boot), as text.

    None if there is no such process or it has exited: a zombie (``Z``) or dead (``X``) process
    counts as gone.
    """
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def exited(pid: int) -> bool:
    """Whether process ``pid`` is gone, or only its zombie is left."""
    return start_time(pid) is None


def cmdline(pid: int) -> list[bytes] | None:
    """The argv of process ``pid`` (a kernel thread's is empty), or None if it can't be read."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.split(b"\0")[:-1] if raw.endswith(b"\0") else raw.split(b"\0")


def pids() -> list[int]:
    """Every process id in ``/proc``, ascending."""
    return sorted(int(e) for e in os.listdir(PROC) if e.isdigit())


def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, argv)`` of every process other than this one whose argv can be read."""
    me = os.getpid()
    for pid in pids():
        if pid == me:
            continue
        argv = cmdline(pid)
        if argv is not None:
            yield pid, argv


def open_fds() -> list[int]:
    """This process's open file descriptors (``/proc/self/fd``; 3..1023 if it can't be read)."""
    try:
        return [int(n) for n in os.listdir(PROC / "self" / "fd")]
    except OSError:
        return list(range(3, 1024))
