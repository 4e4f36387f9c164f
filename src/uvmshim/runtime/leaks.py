"""What uvmshim holds on this host: VMs, QEMU processes, host mounts, state directories.

``uvmshim leaks`` lists it; with nothing running, the list must be empty. The tests use it
after every VM test to check, by looking at the host, that nothing was left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmshim.uvm.qemu import mounts
from uvmshim.uvm.qemu.config import default_base_dir
from uvmshim.uvm.qemu.machine import Leftover, list_leftovers, reclaim

#: Directories uvmshim creates for running things (besides VM state directories).
RUNTIME_DIRS = ("/run/uvmshim/scratch", "/run/uvmshim/pods", "/run/uvmshim/containers")


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
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            found.append(int(entry))
    return sorted(found)


def find_holdings(base_dir: Path | None = None) -> Holdings:
    """Look at the host (``/proc``, mountinfo, the state directories) and report."""
    base = base_dir or default_base_dir()
    holdings = Holdings(vms=list_leftovers(base), qemu_pids=_qemu_pids_of(base))
    roots = [str(base), *RUNTIME_DIRS]
    for root in roots:
        holdings.mounts.extend(m.mount_point for m in mounts.mounts_under(root))
    for d in RUNTIME_DIRS:
        p = Path(d)
        if p.is_dir():
            holdings.state_dirs.extend(str(c) for c in sorted(p.iterdir()))
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
