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
``update`` recomputes the bounds from the container's new resources (:func:`update_limits`) and
writes them there (:func:`apply`); the UVM's RAM is fixed at boot, so a memory limit the UVM
cannot hold, or a bound below what QEMU already uses on the host, is refused
(:func:`check_fits`, :func:`check_room`) rather than left to an OOM kill. ``pids`` stays in
the guest: on the host the cgroup holds the shim's and QEMU's threads, not the container's
processes. Imported by ``create`` and the shim.
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
    """Write ``limits`` in ``d`` (a value of -1 is no limit: ``max`` on v2, ``-1`` on v1)."""
    if root == CGROUP_ROOT and _v2():
        if "memory" in limits and (d / "memory.max").exists():
            _write(d / "memory.max", _v2_value(limits["memory"]))
        if "cpu_quota" in limits and (d / "cpu.max").exists():
            _write(d / "cpu.max", f"{_v2_value(limits['cpu_quota'])} {limits['cpu_period']}")
        return
    if "memory" in limits and (d / "memory.limit_in_bytes").exists():
        _write(d / "memory.limit_in_bytes", str(limits["memory"]))
    if "cpu_quota" in limits and (d / "cpu.cfs_quota_us").exists():
        if limits["cpu_quota"] >= 0:  # unbounded while the period changes: the parent's
            _write(d / "cpu.cfs_quota_us", "-1")  # bandwidth is checked at each write
        _write(d / "cpu.cfs_period_us", str(limits["cpu_period"]))
        _write(d / "cpu.cfs_quota_us", str(limits["cpu_quota"]))


def _v2_value(value: int) -> str:
    return "max" if value < 0 else str(value)


def merge_resources(current: Mapping[str, Any] | None,
                    changes: Mapping[str, Any]) -> dict[str, Any]:
    """``linux.resources`` after ``update``: each section's fields replaced by the new ones
    (what the guest's crun does with the same object)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v
                           for k, v in (current or {}).items()}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = dict(value) if isinstance(value, dict) else value
    return out


def update_limits(changes: Mapping[str, Any], merged: Mapping[str, Any],
                  uvm_memory_mb: int) -> dict[str, int]:
    """The host bounds ``update`` writes: those of :func:`bounds` for the resources after the
    update (``merged``), for the sections the update touches (``changes``: ``memory.limit``,
    ``cpu.quota``/``cpu.period``); a limit removed (-1, 0) is -1, no bound."""
    new = bounds(merged, uvm_memory_mb)
    out: dict[str, int] = {}
    memory = changes.get("memory")
    if isinstance(memory, dict) and memory.get("limit"):  # 0: unchanged, as runc
        out["memory"] = new.get("memory", -1)
    cpu = changes.get("cpu")
    if isinstance(cpu, dict) and (cpu.get("quota") or cpu.get("period")):
        period = (merged.get("cpu") or {}).get("period")
        out["cpu_period"] = new.get("cpu_period", period if isinstance(period, int) and
                                    period > 0 else 100000)
        out["cpu_quota"] = new.get("cpu_quota", -1)
    return out


def check_fits(resources: Mapping[str, Any], uvm_memory_mb: int, exact: bool = False) -> None:
    """Refuse a memory limit the UVM cannot hold: its RAM is fixed at boot, and a container
    limited above what it holds would be killed by the guest's OOM killer below its limit.

    :param exact: the UVM was sized by hcsshim's annotation, which only has to hold the limit
        itself (as at ``create``); else it must hold the limit and the guest's own overhead.
    :raises CgroupError: the limit does not fit.
    """
    from uvmshim.uvm.sizing import GUEST_OVERHEAD_MB

    memory = resources.get("memory")
    limit = memory.get("limit") if isinstance(memory, dict) else None
    if not isinstance(limit, int) or limit <= 0:
        return
    room = uvm_memory_mb if exact else uvm_memory_mb - GUEST_OVERHEAD_MB
    if limit > room << 20:
        own = "" if exact else f", {GUEST_OVERHEAD_MB} MiB of which are the guest's own"
        raise CgroupError(f"a memory limit of {-(-limit >> 20)} MiB does not fit the utility "
                          f"VM: it has {uvm_memory_mb} MiB{own} (fixed when the container was "
                          f"created), so the limit can be at most {room} MiB",
                          where="linux.resources.memory.limit")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_value(path: Path, key: str) -> int:
    """``key``'s value in the flat keyed file ``path`` (``memory.stat``); 0 if absent."""
    from uvmshim.runc.stats import keyed

    try:
        return keyed(path.read_text()).get(key, 0)
    except OSError:
        return 0


def check_room(dirs: list[str], limits: Mapping[str, int]) -> None:
    """Refuse a memory bound below what the UVM (QEMU and the shim) uses on the host now,
    besides reclaimable page cache: the kernel would OOM-kill QEMU (v2) or refuse the write
    with ``EBUSY`` (v1).

    :raises CgroupError: the bound is too low.
    """
    bound = limits.get("memory", -1)
    if bound < 0:
        return
    for name in dirs:
        d = Path(name)
        if (d / "memory.current").exists():
            usage, cache = _read_int(d / "memory.current"), _stat_value(d / "memory.stat",
                                                                          "inactive_file")
        elif (d / "memory.usage_in_bytes").exists():
            usage = _read_int(d / "memory.usage_in_bytes")
            cache = _stat_value(d / "memory.stat", "total_inactive_file")
        else:
            continue
        need = (usage or 0) - cache
        if need > bound:
            raise CgroupError(f"the utility VM uses {need >> 20} MiB on the host ({d}), more "
                              f"than the new bound of {bound >> 20} MiB: QEMU would be "
                              f"OOM-killed", where="linux.resources.memory.limit")


def apply(dirs: list[str], limits: Mapping[str, int]) -> None:
    """Write ``limits`` (see :func:`update_limits`) in the directories :func:`place` made.

    :raises CgroupError: a file cannot be written.
    """
    v2 = _v2()
    for name in dirs:
        _limit(CGROUP_ROOT if v2 else Path(name), Path(name), limits)


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
