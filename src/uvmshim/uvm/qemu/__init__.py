"""The QEMU utility VM: machine (process + QMP) and host backend (hot-plug, bind-mount shares).

* :mod:`.config` — :class:`QemuConfig`, :class:`MachinePaths` and the fixed device contract
  (PCI slots, mount tag, agent port name).
* :mod:`.cmdline` — the pure argv builder.
* :mod:`.kvm` — "does KVM really work here?" probe, cached per host boot.
* :mod:`.sandbox` — how QEMU is confined (unprivileged user, seccomp) and why.
* :mod:`.mounts` — host bind mounts and ``mountinfo``.
* :mod:`.machine` — :class:`QemuMachine` lifecycle and :func:`list_leftovers`.
* :mod:`.host` — :class:`QemuHostBackend`, the :class:`~uvmshim.uvm.backend.HostBackend` on QMP.
"""

from __future__ import annotations

from .config import MachinePaths, QemuConfig, default_base_dir
from .host import QemuHostBackend, detect_image_format
from .machine import Leftover, QemuLaunchError, QemuMachine, Runstate, list_leftovers, reclaim

__all__ = [
    "Leftover",
    "MachinePaths",
    "QemuConfig",
    "QemuHostBackend",
    "QemuLaunchError",
    "QemuMachine",
    "Runstate",
    "default_base_dir",
    "detect_image_format",
    "list_leftovers",
    "reclaim",
]
