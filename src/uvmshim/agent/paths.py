"""Guest path rules for ``sandbox://`` and ``hugepages://`` mount sources. STDLIB ONLY, pure.

hcsshim's guest maps ``sandbox://<p>`` to ``/run/gcs/c/<sandboxID>/sandboxMounts/<p>`` and
``hugepages://<size>/<p>`` to ``/run/gcs/c/<sandboxID>/hugepages/<size>/<p>``; the joined path is
cleaned (Go ``filepath.Join``) and must stay under its folder, so ``..`` cannot escape it. The
prefixes and directory names are the host's too (:mod:`uvmshim.protocol.constants`).
"""

from __future__ import annotations

import posixpath
import re

from uvmshim.agent.util import AgentError
from uvmshim.protocol.constants import (
    CONTAINER_ROOT_PREFIX,
    HUGEPAGES_DIR,
    HUGEPAGES_MOUNT_PREFIX,
    SANDBOX_MOUNT_PREFIX,
    SANDBOX_MOUNTS_DIR,
)
from uvmshim.protocol.messages import ErrorKind

_SIZE = re.compile(r"^([1-9][0-9]*)([KMG])B?$", re.IGNORECASE)
_UNITS_KB = {"K": 1, "M": 1024, "G": 1024 * 1024}


def _go_join(base: str, rest: str) -> str:
    # posixpath.join would let an absolute ``rest`` replace ``base``; Go's Join concatenates
    # and cleans, which is the behaviour the rule is defined by.
    return posixpath.normpath(f"{base}/{rest}")


def _check_id(sandbox_id: str) -> str:
    if not sandbox_id or sandbox_id in (".", "..") or "/" in sandbox_id or "\0" in sandbox_id:
        raise AgentError(f"invalid sandbox id {sandbox_id!r}", ErrorKind.INVALID)
    return sandbox_id


def _under(path: str, folder: str, what: str) -> str:
    if path != folder and not path.startswith(folder + "/"):
        raise AgentError(f"{what} resolves to {path}, which is outside {folder}",
                         ErrorKind.INVALID)
    return path


def sandbox_mount_path(sandbox_id: str, source: str) -> str:
    """Return the guest directory for ``sandbox://<p>`` (``source`` with or without prefix).

    :raises AgentError: if the cleaned path leaves ``/run/gcs/c/<id>/sandboxMounts``.
    """
    rel = source.removeprefix(SANDBOX_MOUNT_PREFIX)
    if "\0" in rel:
        raise AgentError("sandbox mount path contains NUL", ErrorKind.INVALID)
    folder = f"{CONTAINER_ROOT_PREFIX}/{_check_id(sandbox_id)}/{SANDBOX_MOUNTS_DIR}"
    return _under(_go_join(folder, rel), folder, f"sandbox mount {source!r}")


def hugepage_size_kb(size: str) -> int:
    """``2M`` → 2048, ``1G`` → 1048576 (also ``2MB``, ``512k``).

    :raises AgentError: for anything else.
    """
    m = _SIZE.match(size)
    if not m:
        raise AgentError(f"invalid hugepage size {size!r} (expected e.g. 2M or 1G)",
                         ErrorKind.INVALID)
    return int(m.group(1)) * _UNITS_KB[m.group(2).upper()]


def hugepages_mount_path(sandbox_id: str, source: str) -> tuple[str, str]:
    """Return ``(guest directory, page size)`` for ``hugepages://<size>/<p>``.

    :raises AgentError: for a missing or invalid size, or a path that leaves
        ``/run/gcs/c/<id>/hugepages/<size>``.
    """
    rel = source.removeprefix(HUGEPAGES_MOUNT_PREFIX)
    if "\0" in rel:
        raise AgentError("hugepages mount path contains NUL", ErrorKind.INVALID)
    size, _, rest = rel.partition("/")
    hugepage_size_kb(size)
    folder = f"{CONTAINER_ROOT_PREFIX}/{_check_id(sandbox_id)}/{HUGEPAGES_DIR}/{size}"
    path = _under(_go_join(folder, rest), folder, f"hugepages mount {source!r}")
    return path, size
