"""Who holds what on the host: one journal per uvmshim process that acquires something.

Before a process creates anything on the host that must not outlive it (a VM state directory,
a scratch directory, a pod or container directory being created, taps and tc redirects in a
network namespace), it appends a line naming it to its **journal**, ``<owners
dir>/<pid>-<start time>.journal`` (see :func:`uvmshim.hostpath.owners_dir`), and when it has
removed it again, a line saying so. The process holds an exclusive ``flock`` on its journal for
its whole life, so:

* a journal whose lock can be taken belongs to a dead process (killed, even with SIGKILL:
  the kernel drops the lock), and what it still lists is garbage — :func:`collect_garbage`
  reclaims it and removes the journal; every uvmshim command that creates something calls it
  first (it costs a directory listing when there is nothing to do);
* a resource listed by a locked journal has a live owner: ``uvmshim leaks`` does not list it
  and ``--reclaim`` never touches it (:func:`live_holdings`).

The line is written *before* the host side changes, so a SIGKILL at any instant leaves a
record of everything acquired. A journal is created under a temporary name, locked, then
renamed into place: no reader ever sees an unlocked journal of a live process. A forked child
(the runc shim) gets a journal of its own on first use.

The **registry** (:func:`remember_place`, :func:`known_places`) lists the non-default
directories uvmshim has used (``--root`` directories, ``$UVMSHIM_POD_DIR``, ...), so that
``uvmshim leaks`` looks there too.

STDLIB ONLY: imported by every CLI call.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from uvmshim import hostpath, procscan

#: Kinds of resources a journal records.
VM = "vm"  #: a VM state directory (QEMU, its pid file, mounts under it)
DIR = "dir"  #: a directory removed with everything mounted under it
#: a network namespace file (its path) holding uvmshim's taps and tc redirects
#: (:mod:`uvmshim.uvm.hostnet`); reclaimed by deleting those, never the namespace
NET = "net"

_SUFFIX = ".journal"


@dataclass
class Entry:
    kind: str
    path: str


class Journal:
    """This process's journal (see the module docstring). Get it with :func:`journal`."""

    def __init__(self, directory: Path) -> None:
        self.pid = os.getpid()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = procscan.start_time(self.pid) or "0"
        self.path = directory / f"{self.pid}-{start}{_SUFFIX}"
        tmp = directory / f".{self.pid}-{start}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fd = fd
        self.held: dict[tuple[str, str], None] = {}

    def _append(self, op: str, kind: str, path: str) -> None:
        line = json.dumps({"op": op, "kind": kind, "path": path}) + "\n"
        os.write(self.fd, line.encode())

    def acquire(self, kind: str, path: str | os.PathLike[str]) -> None:
        """Record that this process is about to create ``path`` (call *before* creating it)."""
        p = os.path.abspath(path)
        if (kind, p) not in self.held:
            self._append("+", kind, p)
            self.held[kind, p] = None

    def release(self, kind: str, path: str | os.PathLike[str]) -> None:
        """Record that ``path`` is gone (or handed to its own long-lived owner)."""
        p = os.path.abspath(path)
        if self.held.pop((kind, p), "missing") is None:
            self._append("-", kind, p)

    def close(self) -> None:
        """This process is done: remove the journal (what it still lists was handed over or
        is about to be reclaimed by this process's own cleanup)."""
        if self.pid != os.getpid():
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


_journal: Journal | None = None


def journal() -> Journal:
    """This process's journal, created on first use (and again in a forked child)."""
    global _journal
    if _journal is not None and _journal.pid == os.getpid():
        return _journal
    if _journal is not None:  # inherited over fork: the parent's lock is not ours to hold
        with contextlib.suppress(OSError):
            os.close(_journal.fd)
    _journal = Journal(hostpath.owners_dir())
    return _journal


def acquire(kind: str, path: str | os.PathLike[str]) -> None:
    """:meth:`Journal.acquire` on this process's journal."""
    journal().acquire(kind, path)


def release(kind: str, path: str | os.PathLike[str]) -> None:
    """:meth:`Journal.release` on this process's journal (no-op if it was never acquired)."""
    if _journal is not None and _journal.pid == os.getpid():
        _journal.release(kind, path)


@atexit.register
def _close_at_exit() -> None:
    if _journal is not None:
        _journal.close()


# Section: reading journals


def _entries(path: Path) -> list[Entry]:
    """What a journal still lists (acquired and not released), oldest first."""
    held: dict[tuple[str, str], None] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            key = (str(rec["kind"]), str(rec["path"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
        if rec.get("op") == "+":
            held[key] = None
        else:
            held.pop(key, None)
    return [Entry(k, p) for k, p in held]


@dataclass
class OwnerJournal:
    path: Path
    live: bool
    entries: list[Entry] = field(default_factory=list)


def _journals(directory: Path | None = None) -> Iterator[tuple[Path, int]]:
    """``(path, fd)`` of every journal, the fd open (the caller closes it)."""
    d = directory or hostpath.owners_dir()
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return
    for name in names:
        if not name.endswith(_SUFFIX):
            continue
        path = d / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        yield path, fd


def _is_locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def read_journals(directory: Path | None = None) -> list[OwnerJournal]:
    """Every journal, with whether its owner lives and what it still lists."""
    found = []
    for path, fd in _journals(directory):
        try:
            found.append(OwnerJournal(path, _is_locked(fd), _entries(path)))
        finally:
            os.close(fd)
    return found


def live_holdings(directory: Path | None = None, *, ignore: Path | None = None) -> set[str]:
    """The paths that live owners hold (everything below them is theirs too).

    Read the host's resources *before* calling this: an owner records a resource before
    creating it, so whatever was seen then is listed here if its owner lives.

    :param ignore: a journal to leave out (the one a collector holds the lock of).
    """
    me = _journal.path if _journal is not None and _journal.pid == os.getpid() else None
    held: set[str] = set()
    for j in read_journals(directory):
        if j.path == ignore:
            continue
        if j.live or j.path == me:
            held.update(e.path for e in j.entries)
    return held


def is_held(path: str | os.PathLike[str], held: set[str]) -> bool:
    """Whether ``path`` is, or is below, one of the ``held`` paths."""
    p = os.path.abspath(path)
    return any(p == h or p.startswith(h.rstrip("/") + "/") for h in held)


# Section: garbage collection

Reclaimer = Callable[[Entry], list[str]]


def collect_garbage(reclaimers: Callable[[], dict[str, Reclaimer]],
                    directory: Path | None = None) -> list[str]:
    """Reclaim what dead owners' journals still list, newest first, with the reclaimer of
    each entry's kind (it returns the problems; ``reclaimers()`` is only called when there is
    something to reclaim, so that the heavy imports are made then); then remove those
    journals.

    A journal is handled by whoever takes its lock first (concurrent collectors skip it).
    Returns one line per reclaimed resource or problem. Cheap when there is nothing to do:
    one listing of the owners directory.
    """
    done: list[str] = []
    table: dict[str, Reclaimer] | None = None
    for path, fd in _journals(directory):
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive, or another collector is at it
            if not path.exists():
                continue  # another collector finished it
            problems: list[str] = []
            for entry in reversed(_entries(path)):
                if not os.path.lexists(entry.path):
                    continue
                if entry.path in live_holdings(directory, ignore=path):
                    continue  # the name was taken again since, by a live process
                if table is None:
                    table = reclaimers()
                how = table.get(entry.kind) or table[DIR]
                problems += how(entry)
                done.append(f"reclaimed {entry.kind} {entry.path} (owner {path.stem} is gone)")
            done += problems
            if not problems:
                with contextlib.suppress(OSError):
                    path.unlink()
        finally:
            os.close(fd)
    return done


# Section: registry of places


def _registry() -> Path:
    return hostpath.owners_dir().parent / "places"


def remember_place(kind: str, path: str | os.PathLike[str]) -> None:
    """Note that uvmshim used directory ``path`` as a ``kind`` (``root``, ``pods``, ``vm``),
    so that ``uvmshim leaks`` looks there too. Cheap when already noted."""
    p = os.path.abspath(path)
    line = f"{kind}\t{p}\n"
    reg = _registry()
    try:
        if line in reg.read_text(errors="replace").splitlines(keepends=True):
            return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        reg.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(reg, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def known_places(kind: str) -> list[Path]:
    """Every directory noted by :func:`remember_place` as ``kind`` that still exists."""
    try:
        lines = _registry().read_text(errors="replace").splitlines()
    except OSError:
        return []
    out: list[Path] = []
    for line in lines:
        k, _, p = line.partition("\t")
        if k == kind and p and Path(p) not in out and os.path.isdir(p):
            out.append(Path(p))
    return out
