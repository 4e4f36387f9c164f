"""What uvmshim holds on this host: VMs, QEMU processes, host mounts, state directories.

``uvmshim leaks`` lists it; with nothing running, the list must be empty. The tests use it
after every VM test to check, by looking at the host, that nothing was left behind.

It looks wherever :mod:`uvmshim.hostpath` resolves to, overrides included: the VM state
directories, and the containers (below the runtime root), pods and scratch directories.

Ownership (:mod:`uvmshim.owners`): every process records what it acquires in its journal
before acquiring it. ``uvmshim leaks`` (``find_holdings(unowned_only=True)``) lists only what no
live process holds, in every place uvmshim has used (a registry of runtime roots, pod and VM
directories) besides the current ones; a runc container that was created (its state
directory, kept until ``delete`` as runc keeps it) is not a leak either, only its VM once its
shim is gone. :func:`collect_dead_owners` reclaims what dead processes' journals list;
commands that create something call it first, and ``uvmshim gc`` runs it and reclaims every
other leftover no live process holds.

UVM templates are listed on their own (:attr:`Holdings.templates`, with the QEMU processes
cloned from each): they are kept on purpose, like the boot files, and are never reclaimed here.
Only what a killed template build left (``.build-*``/``.trash-*`` directories that no build holds
the lock for) is a leak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmshim import hostpath, owners, procscan
from uvmshim.uvm.qemu import mounts
from uvmshim.uvm.qemu.machine import Leftover, list_leftovers, reclaim
from uvmshim.uvm.qemu.template import TemplateInfo, leftover_builds, list_templates


@dataclass
class Holdings:
    """Everything found; ``empty`` is true when uvmshim holds nothing on the host."""

    vms: list[Leftover] = field(default_factory=list)
    qemu_pids: list[int] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    state_dirs: list[str] = field(default_factory=list)
    #: Unfinished template builds no process owns any more (leaks).
    template_builds: list[str] = field(default_factory=list)
    #: The UVM templates (kept on purpose: not leaks, never reclaimed here).
    templates: list[TemplateInfo] = field(default_factory=list)
    #: tc redirects of ours whose tap is gone (a crashed uvmshim's container network).
    net_redirects: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing is leaked (templates do not count)."""
        return not (self.vms or self.qemu_pids or self.mounts or self.state_dirs
                    or self.template_builds or self.net_redirects)

    def as_dict(self) -> dict[str, Any]:
        return {"vms": [v.as_dict() for v in self.vms], "qemu_pids": self.qemu_pids,
                "mounts": self.mounts, "state_dirs": self.state_dirs,
                "template_builds": self.template_builds,
                "templates": [t.as_dict() for t in self.templates],
                "net_redirects": self.net_redirects}


def _qemu_pids_of(base: Path) -> list[int]:
    """Processes whose command line names a path under ``base`` (our QEMUs, even untracked)."""
    needle = os.fsencode(str(base))
    return sorted(
        pid for pid, argv in procscan.command_lines()
        if any(b"qemu-system" in arg for arg in argv) and any(needle in arg for arg in argv)
    )


def find_holdings(
    base_dir: Path | None = None, *, root: str | os.PathLike[str] | None = None,
    unowned_only: bool = False,
) -> Holdings:
    """Look at the host (``/proc``, mountinfo, the state directories) and report.

    :param base_dir: the parent of the VM state directories; default
        :func:`uvmshim.hostpath.vm_dir`.
    :param root: the OCI runtime root (``--root``); default :func:`uvmshim.hostpath.runtime_root`.
    :param unowned_only: leave out what a live process holds (its journal lists it) and the
        state directories of created runc containers; look in every registered place too.
        Without it, everything found is listed (the tests compare before and after).
    """
    bases = [base_dir or hostpath.vm_dir()]
    transient = hostpath.transient_dirs(root)
    if unowned_only:
        bases += [b for b in owners.known_places("vm") if b not in bases]
        extra = [hostpath.containers_dir(r) for r in owners.known_places("root")]
        extra += owners.known_places("pods")
        transient += [d for d in extra if d not in transient]
    holdings = Holdings()
    for base in bases:
        holdings.vms += list_leftovers(base)
        holdings.qemu_pids += [p for p in _qemu_pids_of(base) if p not in holdings.qemu_pids]
    for d in (*bases, *transient):
        for m in mounts.mounts_under(d):
            if m.mount_point not in holdings.mounts:
                holdings.mounts.append(m.mount_point)
    for d in transient:
        if d.is_dir():
            holdings.state_dirs.extend(str(c) for c in sorted(d.iterdir()))
    holdings.template_builds = [str(p) for p in leftover_builds()]
    holdings.templates = list_templates()
    holdings.net_redirects = [str(x) for x in _net_leftovers()]
    if unowned_only:
        _drop_owned(holdings)
    return holdings


def _orphaned_namespaces() -> list[str]:
    """The network namespaces that dead owners' journals list (:data:`owners.NET`) and no
    live owner holds: every tap and redirect of ours there is a leak."""
    dead = [e.path for j in owners.read_journals() if not j.live for e in j.entries
            if e.kind == owners.NET]
    if not dead:
        return []
    held = owners.live_holdings()
    return [p for p in dict.fromkeys(dead) if p not in held]


def _net_leftovers() -> list[Any]:
    """Redirects of ours whose tap is gone (only a dead QEMU's tap is gone: never owned), and
    every tap and redirect of ours in a namespace whose owner is dead."""
    try:
        from uvmshim.uvm import hostnet
    except ImportError:  # pragma: no cover - pyroute2 is a dependency
        return []
    return list(hostnet.find_leftovers_sync(orphaned=_orphaned_namespaces()))


def _created_container(path: str) -> bool:
    """Whether ``path`` is a runc container's state directory past ``creating``: kept until
    ``delete`` (as runc keeps it), not a leak."""
    import json

    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("status") not in (None, "creating")


def _drop_owned(holdings: Holdings) -> None:
    # The host was read first, the journals now: an owner records before it creates.
    held = owners.live_holdings()
    owned_vms = [v for v in holdings.vms if owners.is_held(v.state_dir, held)]
    owned_pids = {v.live_pid for v in owned_vms if v.live_pid is not None}
    for pid in list(holdings.qemu_pids):
        argv = procscan.cmdline(pid) or []
        if pid in owned_pids or any(
                owners.is_held(os.fsdecode(a), held) for a in argv if a.startswith(b"/")):
            owned_pids.add(pid)
    holdings.vms = [v for v in holdings.vms if v not in owned_vms]
    holdings.qemu_pids = [p for p in holdings.qemu_pids if p not in owned_pids]
    holdings.mounts = [m for m in holdings.mounts if not owners.is_held(m, held)]
    holdings.state_dirs = [d for d in holdings.state_dirs
                           if not owners.is_held(d, held) and not _created_container(d)]


def _reclaimers() -> dict[str, owners.Reclaimer]:
    def vm(entry: owners.Entry) -> list[str]:
        state_dir = Path(entry.path)
        for left in list_leftovers(state_dir.parent):
            if left.state_dir.name == state_dir.name:
                return reclaim(left)
        return []

    def directory(entry: owners.Entry) -> list[str]:
        import shutil

        problems = [str(e) for e in mounts.unmount_all_under(entry.path)]
        if mounts.mounts_under(entry.path):
            return [*problems, f"mounts remain under {entry.path}, not removing it"]
        shutil.rmtree(entry.path, ignore_errors=True)
        return problems

    def net(entry: owners.Entry) -> list[str]:
        from uvmshim.uvm import hostnet

        return hostnet.reclaim_namespace_sync(entry.path)

    return {owners.VM: vm, owners.DIR: directory, owners.NET: net}


def collect_dead_owners() -> list[str]:
    """Reclaim what the journals of dead uvmshim processes list (their VMs: QEMU killed,
    mounts, state directory; their directories; their taps and tc redirects); one line per
    thing done or problem.

    Cheap when there is nothing to do (one directory listing): commands that create
    something call it first.
    """
    return owners.collect_garbage(_reclaimers)


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
    from uvmshim.uvm import hostnet

    # Looked up again: only what is still there.
    for left in hostnet.find_leftovers_sync(orphaned=_orphaned_namespaces()):
        if str(left) in holdings.net_redirects:
            try:
                hostnet.reclaim_sync(left)
                done.append(f"removed {left}")
            except hostnet.NetworkError as e:
                done.append(f"could not remove {left}: {e}")
    # Looked up again: a build that started since holds the lock, and owns its directory.
    for p in leftover_builds():
        if str(p) in holdings.template_builds:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed unfinished template build {p}")
    return done
