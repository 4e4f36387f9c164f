"""The QEMU utility VM: machine (process + QMP), host backend (hot-plug, bind-mount shares), and
the guest agent with its guest backend.

* :mod:`.config` — :class:`QemuConfig` and :class:`MachinePaths` (the device contract with the
  guest — PCI slots, mount tag, agent port name — is :mod:`uvmshim.protocol.constants`).
* :mod:`.cmdline` — the pure argv builder.
* :mod:`.kvm` — "does KVM really work here?" probe, cached per host boot.
* :mod:`.sandbox` — how QEMU is confined (unprivileged user, seccomp) and why.
* :mod:`.mountns` — QEMU's own mount namespace: a root holding only what it needs.
* :mod:`.mounts` — host bind mounts and ``mountinfo``.
* :mod:`.images` — disk image formats and the files their headers name (backing, data, parent).
* :mod:`.machine` — :class:`QemuMachine` lifecycle and :func:`list_leftovers`.
* :mod:`.host` — :class:`QemuHostBackend`, the :class:`~uvmshim.uvm.backend.HostBackend` on QMP.
* :mod:`.agent_connection` — :class:`AgentConnection`: the agent socket, its run state, requests
  in flight and event routing.
* :mod:`.agent_client` — :class:`AgentClient`: the agent's typed operations (exec, containers).
* :mod:`.guest` — :class:`AgentGuestBackend`, the :class:`~uvmshim.uvm.backend.GuestBackend` on
  the agent.

Putting a machine, an agent and the device managers together is the runtime's job
(:mod:`uvmshim.runtime.vm`).
"""

from __future__ import annotations

from .config import MachinePaths, QemuConfig
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
    "detect_image_format",
    "list_leftovers",
    "reclaim",
]
