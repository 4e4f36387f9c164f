"""The utility VM's size from the container's resources (or hcsshim's annotations).

A container's processes run in the UVM, so the UVM must hold the container's memory limit and
its own overhead, and have about as many vCPUs as the container may use:

memory
    ``linux.resources.memory.limit`` + :data:`GUEST_OVERHEAD_MB` (the guest kernel, the agent,
    crun, the page cache of the root filesystem), at least :data:`MIN_MEMORY_MB`, rounded *up*
    to a size class (:data:`MEMORY_CLASSES_MB`: powers of two). A pod sandbox may carry the pod's
    total in containerd's ``io.kubernetes.cri.sandbox-memory`` annotation (bytes); it is used
    like a limit. No limit: :data:`DEFAULT_MEMORY_MB`.
vCPUs
    ``ceil(cpu.quota / cpu.period)``, else the number of CPUs in ``cpu.cpus``, rounded up to a
    power of two and at most the host's CPUs; none of these: :func:`default_cpus` (hcsshim's
    2, but at most half the host's CPUs: each vCPU is a busy host thread, under TCG above all,
    and QEMU's own threads and the host need the rest — on a 2-CPU host one vCPU starts and runs
    a small container about a quarter faster than two).

The size classes keep the number of distinct machine configurations, and so of templates (which
are keyed by the machine configuration, :mod:`uvmshim.uvm.qemu.template`), small: any memory
limit maps to one of a handful of classes and any CPU limit to 1, 2, 4, … vCPUs.

hcsshim's annotations :data:`ANNOTATION_MEMORY_MB` and :data:`ANNOTATION_PROCESSORS` override
the computed values exactly (not rounded). A size the host cannot give (more memory than it has,
fewer than :data:`MIN_MEMORY_MB`, 0 or more than :data:`MAX_CPUS` vCPUs, a container limit
the largest class cannot hold) is an error at ``create``.

``uvmshim run`` sizes its UVM the same way, except for what the user gives (``--memory``,
``--cpus``), which wins; a given memory size must still hold the container's limit and the
guest's overhead (:func:`resolve_size`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from uvmshim.errors import UvmshimError

ANNOTATION_MEMORY_MB = "io.microsoft.virtualmachine.computetopology.memory.sizeinmb"
ANNOTATION_PROCESSORS = "io.microsoft.virtualmachine.computetopology.processor.count"
#: containerd's annotation on a pod sandbox: the pod's memory limit in bytes.
ANNOTATION_SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"

DEFAULT_MEMORY_MB = 512
MIN_MEMORY_MB = 256
GUEST_OVERHEAD_MB = 256
MEMORY_CLASSES_MB = tuple(512 << i for i in range(8))  # 512 MiB … 64 GiB
DEFAULT_CPUS = 2
MAX_CPUS = 255  # QEMU's x86 machines without an IOMMU
#: What QEMU itself needs on the host besides the guest's RAM (TCG's translation cache,
#: device state, the shim): the host cgroup's memory bound adds it (:mod:`uvmshim.runc.cgroups`).
HOST_OVERHEAD_MB = 384


class SizingError(UvmshimError):
    """The UVM cannot have the size the container asks for."""


@dataclass(frozen=True)
class UvmSize:
    memory_mb: int
    cpus: int
    #: How each was found: "default", "limit", "annotation", "sandbox", "given"
    #: (:func:`resolve_size`).
    memory_from: str = "default"
    cpus_from: str = "default"


def host_memory_mb() -> int:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):  # noqa: SIM115 - tiny file
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 20


def _annotation(annotations: Mapping[str, str], key: str) -> int | None:
    value = annotations.get(key)
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        raise SizingError(f"expected a whole number, got {value!r}",
                          where=f"annotations[{key!r}]") from None


def _cpuset_count(cpus: str) -> int:
    count = 0
    for part in cpus.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            count += (int(hi) - int(lo) + 1) if hi else 1
        except ValueError:
            raise SizingError(f"bad CPU list {cpus!r}", where="linux.resources.cpu.cpus") \
                from None
    return count


def memory_class(mb: int) -> int:
    """The smallest size class that holds ``mb``."""
    for size in MEMORY_CLASSES_MB:
        if mb <= size:
            return size
    raise SizingError(f"a UVM of {mb} MiB is larger than the largest size class "
                      f"({MEMORY_CLASSES_MB[-1]} MiB)", where="linux.resources.memory.limit",
                      hint=f"set {ANNOTATION_MEMORY_MB} to size the UVM yourself")


def uvm_size(linux: Mapping[str, Any] | None, annotations: Mapping[str, str],
             *, host_mb: int | None = None, host_cpus: int | None = None) -> UvmSize:
    """The UVM size for a container (see the module doc).

    :raises SizingError: an impossible or malformed size.
    """
    return resolve_size(linux, annotations, host_mb=host_mb, host_cpus=host_cpus)


def resolve_size(linux: Mapping[str, Any] | None, annotations: Mapping[str, str], *,
                 memory_mb: int | None = None, cpus: int | None = None,
                 host_mb: int | None = None, host_cpus: int | None = None) -> UvmSize:
    """The UVM size for a container when the user may have given it (``uvmshim run
    --memory/--cpus``): what is given wins over the spec and the annotations (``"given"``),
    the rest is :func:`uvm_size`'s.

    :raises SizingError: a given memory size that cannot hold the container's memory limit
        and the guest's own :data:`GUEST_OVERHEAD_MB` (the guest's OOM killer would kill the
        container below its limit), or an impossible size from the spec.
    """
    if memory_mb is None:
        memory_mb, memory_from = _memory(linux, annotations, host_mb)
    else:
        memory_from = "given"
        limit = _memory_limit(linux)
        if limit:
            need = _need_mb(limit)
            if memory_mb < need:
                hint = f"give --memory {need} or more, or leave it out"
                with contextlib.suppress(SizingError):
                    hint += (" to size the UVM from the spec "
                             f"({_memory(linux, annotations, host_mb)[0]} MiB)")
                raise SizingError(
                    f"a utility VM of {memory_mb} MiB cannot hold the container's memory "
                    f"limit of {need - GUEST_OVERHEAD_MB} MiB and the guest's own "
                    f"{GUEST_OVERHEAD_MB} MiB: it needs at least {need} MiB", where="--memory",
                    hint=hint)
    if cpus is None:
        cpus, cpus_from = _cpus(linux, annotations, host_cpus)
    else:
        cpus_from = "given"
    return UvmSize(memory_mb, cpus, memory_from, cpus_from)


def _resources(linux: Mapping[str, Any] | None, key: str) -> Any:
    resources = (linux or {}).get("resources") or {}
    return resources.get(key) if isinstance(resources, dict) else None


def _memory_limit(linux: Mapping[str, Any] | None) -> int:
    """``linux.resources.memory.limit`` in bytes; 0 if there is none."""
    memory = _resources(linux, "memory")
    limit = memory.get("limit") if isinstance(memory, dict) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0


def _need_mb(limit: int) -> int:
    """MiB a UVM needs for a container memory limit of ``limit`` bytes and the guest itself."""
    return -(-limit >> 20) + GUEST_OVERHEAD_MB


def _memory(linux: Mapping[str, Any] | None, annotations: Mapping[str, str],
            host_mb: int | None) -> tuple[int, str]:
    host_mb = host_memory_mb() if host_mb is None else host_mb
    memory_mb, memory_from = DEFAULT_MEMORY_MB, "default"
    limit = _memory_limit(linux)
    sandbox = _annotation(annotations, ANNOTATION_SANDBOX_MEMORY)
    if limit:
        memory_mb, memory_from = memory_class(max(_need_mb(limit), MIN_MEMORY_MB)), "limit"
    elif sandbox is not None and sandbox > 0:
        memory_mb, memory_from = memory_class(max(_need_mb(sandbox), MIN_MEMORY_MB)), "sandbox"
    given = _annotation(annotations, ANNOTATION_MEMORY_MB)
    if given is not None:
        memory_mb, memory_from = given, "annotation"
        if given < MIN_MEMORY_MB:
            raise SizingError(f"a UVM needs at least {MIN_MEMORY_MB} MiB, not {given}",
                              where=f"annotations[{ANNOTATION_MEMORY_MB!r}]")
        if limit and given << 20 < limit:
            raise SizingError(f"the UVM ({given} MiB) is smaller than the container's memory "
                              f"limit ({limit >> 20} MiB)",
                              where=f"annotations[{ANNOTATION_MEMORY_MB!r}]")
    if memory_mb > host_mb:
        where = (f"annotations[{ANNOTATION_MEMORY_MB!r}]" if memory_from == "annotation"
                 else "linux.resources.memory.limit")
        raise SizingError(f"the UVM would need {memory_mb} MiB of memory; the host has "
                          f"{host_mb} MiB", where=where)
    return memory_mb, memory_from


def default_cpus(host_cpus: int | None = None) -> int:
    """vCPUs of a UVM whose container sets no CPU limit: :data:`DEFAULT_CPUS`, at most half
    of the host's CPUs, at least one."""
    host_cpus = host_cpus or os.cpu_count() or 1
    return max(1, min(DEFAULT_CPUS, host_cpus // 2))


def _cpus(linux: Mapping[str, Any] | None, annotations: Mapping[str, str],
          host_cpus: int | None) -> tuple[int, str]:
    host_cpus = host_cpus or os.cpu_count() or 1
    cpu = _resources(linux, "cpu")
    cpus, cpus_from = default_cpus(host_cpus), "default"
    want = 0
    if isinstance(cpu, dict):
        quota, period = cpu.get("quota"), cpu.get("period") or 100000
        if isinstance(quota, int) and quota > 0 and isinstance(period, int) and period > 0:
            want = math.ceil(quota / period)
        elif isinstance(cpu.get("cpus"), str) and cpu["cpus"].strip():
            want = _cpuset_count(cpu["cpus"])
    if want > 0:
        cpus, cpus_from = min(1 << (want - 1).bit_length(), host_cpus), "limit"
    given = _annotation(annotations, ANNOTATION_PROCESSORS)
    if given is not None:
        if not 1 <= given <= MAX_CPUS:
            raise SizingError(f"a UVM has 1 to {MAX_CPUS} vCPUs, not {given}",
                              where=f"annotations[{ANNOTATION_PROCESSORS!r}]")
        cpus, cpus_from = given, "annotation"
    return cpus, cpus_from
