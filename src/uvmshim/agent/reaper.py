"""The guest's PID 1 after boot: reap every orphan, keep the exit status of watched ones.

STDLIB ONLY, and nothing else: not even :mod:`uvmshim.protocol` (its package import is not
free, and PID 1 must not fail to start). ``/init`` execs this once the early set-up is done
(``python3 -m uvmshim.agent.reaper``).

Why: a container's init made by ``crun create`` is re-parented to PID 1 when crun exits (the
agent cannot make itself a child subreaper: that needs prctl(2), i.e. ctypes, which the
initrd does not ship). PID 1 is the only process that can then learn its exit status. The
agent, after ``crun create``, writes an empty file ``WATCH_DIR/<pid>``; when PID 1 reaps
that pid it writes the status (``os.waitstatus_to_exitcode``: negative for a signal) to
``STATUS_DIR/<pid>`` (atomically) and removes the watch file. Orphans nobody watches are
only reaped (what busybox sh did before).

PID 1 must never exit (the kernel panics): any failure falls back to the former loop.
"""

from __future__ import annotations

import contextlib
import os

#: Same values as :data:`uvmshim.protocol.constants.EXIT_WATCH_DIR` / ``EXIT_STATUS_DIR``
#: (a test keeps them equal).
WATCH_DIR = "/run/uvmshim/watch"
STATUS_DIR = "/run/uvmshim/exits"


def record(pid: int, status: int, watch_dir: str = WATCH_DIR,
           status_dir: str = STATUS_DIR) -> bool:
    """Write the exit status of ``pid`` if it is watched; True if it was."""
    watch = os.path.join(watch_dir, str(pid))
    if not os.path.exists(watch):
        return False
    code = os.waitstatus_to_exitcode(status)
    tmp = os.path.join(status_dir, f".{pid}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(str(code))
    os.replace(tmp, os.path.join(status_dir, str(pid)))
    with contextlib.suppress(OSError):
        os.unlink(watch)
    return True


def reap_forever() -> None:
    import time

    for d in (WATCH_DIR, STATUS_DIR):
        os.makedirs(d, exist_ok=True)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # no child at all (the agent's loop is one): wait
            time.sleep(1)
            continue
        except InterruptedError:
            continue
        with contextlib.suppress(OSError):
            record(pid, status)


def main() -> None:
    try:
        reap_forever()
    except BaseException:  # never exit: fall back to busybox sh's reaping loop
        os.execv("/bin/busybox", ["sh", "-c", "while :; do wait; sleep 1; done"])


if __name__ == "__main__":
    main()
