"""What uvmshim holds on this host: VMs, QEMU processes, host mounts, state directories.

``uvmshim leaks`` lists it; with nothing running, the list must be empty. The tests use it
after every VM test to check, by looking at the host, that nothing was left behind.

It looks wherever :mod:`uvmshim.hostpath` resolves to, overrides included: the VM state
directories, and the containers (below the runtime root), pods and scratch directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmshim import hostpath, procscan
from uvmshim.uvm.qemu import mounts
from uvmshim.uvm.qemu.machine import Leftover, list_leftovers, reclaim


@dataclass
class Holdings:
    """Everything found; ``empty`` is true when uvmshim holds nothing on the host."""

    vms: list[Leftover] = field(default_factory=list)
    qemu_pids: list[int] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    state_dirs: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.vms or self.qemu_pids or self.mounts or self.state_dirs)

    def as_dict(self) -> dict[str, Any]:
        return {"vms": [v.as_dict() for v in self.vms], "qemu_pids": self.qemu_pids,
                "mounts": self.mounts, "state_dirs": self.state_dirs}


def _qemu_pids_of(base: Path) -> list[int]:
    """Processes whose command line names a path under ``base`` (our QEMUs, even untracked)."""
    needle = os.fsencode(str(base))
    return sorted(
        pid for pid, argv in procscan.command_lines()
        if any(b"qemu-system" in arg for arg in argv) and any(needle in arg for arg in argv)
    )


def find_holdings(
    base_dir: Path | None = None, *, root: str | os.PathLike[str] | None = None
) -> Holdings:
    """Look at the host (``/proc``, mountinfo, the state directories) and report.

    :param base_dir: the parent of the VM state directories; default
        :func:`uvmshim.hostpath.vm_dir`.
    :param root: the OCI runtime root (``--root``); default :func:`uvmshim.hostpath.runtime_root`.
    """
    base = base_dir or hostpath.vm_dir()
    transient = hostpath.transient_dirs(root)
    holdings = Holdings(vms=list_leftovers(base), qemu_pids=_qemu_pids_of(base))
    for d in (base, *transient):
        for m in mounts.mounts_under(d):
            if m.mount_point not in holdings.mounts:
                holdings.mounts.append(m.mount_point)
    for d in transient:
        if d.is_dir():
            holdings.state_dirs.extend(str(c) for c in sorted(d.iterdir()))
    return holdings


def reclaim_all(holdings: Holdings) -> list[str]:
    """Kill leftover QEMUs, unmount and remove what :func:`find_holdings` found."""
    import shutil

    done: list[str] = []
    for vm in holdings.vms:
        done.extend(reclaim(vm))
    for d in holdings.state_dirs:
        for err in mounts.unmount_all_under(d):
            done.append(f"could not unmount under {d}: {err}")
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d}")
    return done
