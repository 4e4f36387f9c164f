"""The state of runtime containers on the host: ``<root>/containers/<id>/``.

``<root>`` is runc's ``--root`` (default :func:`uvmshim.hostpath.runtime_root`).

Layout of one container's directory:

``state.json``
    The OCI state (``ociVersion``, ``id``, ``status``, ``pid``, ``bundle``, ``annotations``,
    plus runc's ``rootfs``, ``created``, ``owner``) and private fields: ``vm_id`` (the UVM's state
    directory, so that a crashed shim's VM can be reclaimed), ``shim_start`` (the shim's process
    start time, so that a recycled pid is not taken for the shim) and ``exit_code``.
    Written atomically (temporary file + rename) so readers never need the lock.
``lock``
    ``flock``-ed by CLI commands that change the container (create, start, delete), so that two
    concurrent calls on the same id serialise.
``shim.sock``
    The shim's private socket (:mod:`uvmshim.runc.protocol`).

STDLIB ONLY: imported by every CLI call.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvmshim import hostpath, procscan
from uvmshim.errors import UvmshimError

OCI_VERSION = "1.0.2"

#: runc's id rule (``[\w+-\.]+``), which also keeps ids usable as file and guest path names.
#: ASCII only, and the whole id: ``$`` would let a trailing newline through.
_ID_RE = re.compile(r"[\w+\-.]+", re.ASCII)


class NotFound(UvmshimError):
    """No container with that id (runc's message: ``container does not exist``)."""


class NotRunning(UvmshimError):
    """runc's error for a container that is not running (``events``)."""

    def __init__(self, container_id: str) -> None:
        super().__init__(f"container with id {container_id} is not running")


def check_id(container_id: str) -> None:
    """Reject ids that are not usable as a directory name (runc's rule)."""
    if not _ID_RE.fullmatch(container_id) or container_id in (".", ".."):
        raise UvmshimError(f"invalid container id format: {container_id!r}")


@dataclass
class ContainerDir:
    """One container's state directory."""

    root: Path
    id: str

    @classmethod
    def of(cls, root: str | os.PathLike[str], container_id: str) -> ContainerDir:
        check_id(container_id)
        return cls(hostpath.containers_dir(root), container_id)

    @property
    def path(self) -> Path:
        return self.root / self.id

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def socket(self) -> Path:
        return self.path / "shim.sock"

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    def exists(self) -> bool:
        return self.path.is_dir()

    def make(self) -> None:
        """Create the directory; a second ``create`` with the same id fails here."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            raise UvmshimError(f"container with id exists: {self.id}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the container's lock (blocking), for changes made from the command line."""
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise NotFound(f"container does not exist: {self.id}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> dict[str, Any]:
        """The stored state, as written (see :meth:`current` for the live status)."""
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise NotFound(f"container does not exist: {self.id}") from None
        except (OSError, ValueError) as err:
            raise UvmshimError(f"container {self.id}: unreadable state: {err}") from None
        if not isinstance(data, dict):
            raise UvmshimError(f"container {self.id}: unreadable state")
        return data

    def write(self, state: dict[str, Any]) -> None:
        """Replace ``state.json`` atomically."""
        tmp = self.path / f".state.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)

    def update(self, **fields: Any) -> dict[str, Any]:
        state = self.read()
        state.update(fields)
        self.write(state)
        return state

    def current(self) -> dict[str, Any]:
        """The state with a live status: a container whose shim is gone is ``stopped``."""
        state = self.read()
        if state.get("status") != "stopped" and not shim_alive(state):
            state["status"] = "stopped"
        return state


def shim_alive(state: dict[str, Any]) -> bool:
    """Whether the shim recorded in ``state`` still runs (same pid and start time)."""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    return procscan.start_time(pid) == state.get("shim_start")


def new_state(container_id: str, bundle: str, rootfs: str,
              annotations: dict[str, str]) -> dict[str, Any]:
    """The state of a container being created (no shim yet)."""
    return {
        "ociVersion": OCI_VERSION, "id": container_id, "pid": 0, "status": "creating",
        "bundle": bundle, "rootfs": rootfs, "annotations": annotations,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
        "owner": "", "vm_id": None, "shim_start": None, "exit_code": None,
    }


#: The fields ``state`` prints (OCI state plus what runc adds); the rest is private.
PUBLIC_FIELDS = ("ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner",
                 "annotations")


def public(state: dict[str, Any]) -> dict[str, Any]:
    out = {k: state[k] for k in PUBLIC_FIELDS if k in state}
    if out.get("status") == "stopped":
        out["pid"] = 0
    if out.get("status") == "creating":
        out["status"] = "created"
    return out


def list_ids(root: str | os.PathLike[str]) -> list[str]:
    base = hostpath.containers_dir(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir())
