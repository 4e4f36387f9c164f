"""The host's side of ``linux.cgroupsPath``: the shim and its QEMU in the container's cgroup.

The container's processes run in the UVM, whose crun applies ``linux.resources`` in the guest's
own cgroup v2 hierarchy. On the host, the container *is* the shim and its QEMU: the shim puts
itself in the container's cgroup before it starts QEMU (which inherits it), so the engine's
accounting (podman stats, kubelet) sees the VM, and bounds the UVM as a whole there:

memory
    the UVM's RAM + :data:`~uvmshim.uvm.sizing.HOST_OVERHEAD_MB` (QEMU itself), only when the
    container has a memory limit (the UVM's RAM was sized from it: :mod:`uvmshim.uvm.sizing`).
cpu
    the container's ``cpu.quota`` (per ``cpu.period``) + half a CPU for the UVM's own work
    (its kernel, the agent, QEMU's device threads), only when the container has a quota.

Both layouts are handled: cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``: one directory,
``memory.max``, ``cpu.max``) and v1 or hybrid (a directory in each controller hierarchy under
``/sys/fs/cgroup/<controller>``: ``memory.limit_in_bytes``, ``cpu.cfs_quota_us``).

``cgroupsPath`` is a cgroupfs path (absolute: from the hierarchy's root; relative: the same, as
runc does with its cgroupfs driver), or with ``--systemd-cgroup`` systemd's ``slice:prefix:name``,
which names ``<slice path>/<prefix>-<name>.scope`` (``a-b.slice`` lies in ``a.slice``). The scope
is made as a plain directory: systemd is not asked to create a transient unit (D-Bus), so systemd
does not know about it (see docs/oci-runtime.md).

The directories are recorded in the state (``cgroups``) and removed by ``delete``.
Imported by ``create`` and the shim.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uvmshim.errors import UvmshimError

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The v1 hierarchies the shim joins (those that exist). Not ``cpuset``: a new cpuset cgroup
#: has no CPUs until they are copied from its parent, and the container's cpuset applies in
#: the guest (the UVM's vCPUs are threads of any host CPU).
V1_CONTROLLERS = ("memory", "cpu,cpuacct", "cpu", "cpuacct", "pids", "blkio", "devices",
                  "freezer", "hugetlb", "systemd")
#: The CPU the UVM needs besides the container's quota, in parts of a period.
CPU_OVERHEAD = 0.5


class CgroupError(UvmshimError):
    """The container's cgroup on the host cannot be made or joined."""


def cgroup_path(path: str, systemd: bool) -> str:
    """``linux.cgroupsPath`` as a path below a hierarchy's root ("" if none)."""
    if not path:
        return ""
    if systemd:
        parts = path.split(":")
        if len(parts) != 3:
            raise CgroupError(f"expected slice:prefix:name for systemd cgroups, got {path!r}",
                              where="linux.cgroupsPath")
        slice_, prefix, name = parts
        dirs: list[str] = []
        slice_ = slice_ or "system.slice"
        if slice_ != "-.slice":
            if not slice_.endswith(".slice") or "/" in slice_:
                raise CgroupError(f"invalid slice name {slice_!r}", where="linux.cgroupsPath")
            stem = slice_[: -len(".slice")].split("-")
            dirs = ["-".join(stem[: i + 1]) + ".slice" for i in range(len(stem))]
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else \
            f"{name}.scope"
        return "/".join([*dirs, unit])
    return os.path.normpath("/" + path).lstrip("/")  # never above the hierarchy's root


def _v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def hierarchies() -> list[Path]:
    """The hierarchy roots the shim joins."""
    if _v2():
        return [CGROUP_ROOT]
    seen: set[str] = set()
    out = []
    for name in V1_CONTROLLERS:
        root = CGROUP_ROOT / name
        if not (root / "cgroup.procs").exists():
            continue
        real = os.path.realpath(root)
        if real not in seen:
            seen.add(real)
            out.append(root)
    unified = CGROUP_ROOT / "unified"
    if (unified / "cgroup.procs").exists():
        out.append(unified)
    return out


def bounds(resources: Mapping[str, Any] | None, uvm_memory_mb: int) -> dict[str, int]:
    """The UVM's bounds on the host: ``memory`` (bytes) and ``cpu_quota``/``cpu_period``
    (microseconds), each only if the container has that limit."""
    from uvmshim.uvm.sizing import HOST_OVERHEAD_MB

    out: dict[str, int] = {}
    memory = (resources or {}).get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("limit"), int) and memory["limit"] > 0:
        out["memory"] = (uvm_memory_mb + HOST_OVERHEAD_MB) << 20
    cpu = (resources or {}).get("cpu")
    if isinstance(cpu, dict) and isinstance(cpu.get("quota"), int) and cpu["quota"] > 0:
        period = cpu.get("period") if isinstance(cpu.get("period"), int) else 100000
        period = period or 100000
        out["cpu_period"] = period
        out["cpu_quota"] = cpu["quota"] + int(period * CPU_OVERHEAD)
    return out


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror or err}",
                          where="linux.cgroupsPath") from None


def place(pid: int, rel: str, limits: Mapping[str, int]) -> list[str]:
    """Make the cgroup ``rel`` in every hierarchy, set ``limits`` there and move ``pid`` in;
    return the directories made or joined (for :func:`remove`).

    :raises CgroupError: a directory cannot be made or a file written (nothing is left).
    """
    done: list[str] = []
    try:
        for root in hierarchies():
            d = root / rel
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CgroupError(f"cannot make the cgroup {d}: {err.strerror or err}",
                                  where="linux.cgroupsPath") from None
            done.append(str(d))
            _limit(root, d, limits)
            _write(d / "cgroup.procs", str(pid))
    except BaseException:
        remove(done)
        raise
    return done


def _limit(root: Path, d: Path, limits: Mapping[str, int]) -> None:
    if root == CGROUP_ROOT and _v2():
        if "memory" in limits and (d / "memory.max").exists():
            _write(d / "memory.max", str(limits["memory"]))
        if "cpu_quota" in limits and (d / "cpu.max").exists():
            _write(d / "cpu.max", f"{limits['cpu_quota']} {limits['cpu_period']}")
        return
    if "memory" in limits and (d / "memory.limit_in_bytes").exists():
        _write(d / "memory.limit_in_bytes", str(limits["memory"]))
    if "cpu_quota" in limits and (d / "cpu.cfs_quota_us").exists():
        _write(d / "cpu.cfs_period_us", str(limits["cpu_period"]))
        _write(d / "cpu.cfs_quota_us", str(limits["cpu_quota"]))


def remove(dirs: list[str], timeout: float = 5.0) -> list[str]:
    """Remove the cgroup directories (deepest first; an emptied parent is left, as runc does);
    return what could not be removed (still in use after ``timeout``)."""
    left = []
    for d in sorted(dirs, key=len, reverse=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    left.append(d)
                    break
                time.sleep(0.05)
    return left
