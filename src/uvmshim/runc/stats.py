"""``events``: the guest's cgroup v2 files of a container as runc's ``types.Stats``. STDLIB ONLY.

The agent reads the container's files in the guest (``container_stats``); this maps them the way
runc's cgroup v2 driver (``libcontainer/cgroups/fs2``) and ``convertLibcontainerStats`` do, into
the ``data`` of runc's event ``{"type": "stats", "id": ID, "data": {...}}``:

``cpu.usage``
    ``total``, ``user``, ``kernel`` from ``cpu.stat``'s ``usage_usec``, ``user_usec``,
    ``system_usec``, in nanoseconds; ``cpu.throttling`` from ``nr_periods``, ``nr_throttled``,
    ``throttled_usec``.
``memory``
    ``usage`` (``memory.current``, ``limit`` ``memory.max`` — ``max`` is 2^64-1 —, ``max``
    ``memory.peak``), ``swap`` (as runc: swap + memory, for cgroup v1's meaning), ``cache``
    (``file``), ``raw`` (all of ``memory.stat``), ``event_count`` (``memory.events``).
``pids``
    ``current``, ``limit`` (``pids.max``; no limit is 0, as runc).

Zero values are left out where runc's JSON tags say ``omitempty``. What the guest cannot tell
(blkio, hugetlb, network interfaces of the UVM) is empty, as runc's for a cgroup without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_UINT64 = (1 << 64) - 1


def _uint(text: str | None) -> int:
    """A cgroup value: a number, or ``max`` (2^64-1, as runc's ``GetCgroupParamUint``)."""
    word = (text or "").strip().split("\n", 1)[0].strip()
    if word == "max":
        return MAX_UINT64
    try:
        return max(0, int(word))
    except ValueError:
        return 0


def keyed(text: str | None) -> dict[str, int]:
    """A flat keyed file (``cpu.stat``, ``memory.stat``, ``memory.events``)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key and value.strip().isdigit():
            out[key] = int(value)
    return out


def _omit_zero(entry: dict[str, int], *keys: str) -> dict[str, int]:
    return {k: v for k, v in entry.items() if v or k not in keys}


def _memory_entry(usage: int, limit: int, peak: int) -> dict[str, int]:
    return _omit_zero({"limit": limit, "usage": usage, "max": peak, "failcnt": 0},
                      "usage", "max")


def runc_stats(files: Mapping[str, str]) -> dict[str, Any]:
    """runc's ``types.Stats`` (JSON form) from the container's cgroup v2 files."""
    cpu = keyed(files.get("cpu.stat"))
    usage = {"total": cpu.get("usage_usec", 0) * 1000, "kernel": cpu.get("system_usec", 0) * 1000,
             "user": cpu.get("user_usec", 0) * 1000}
    throttling = {"periods": cpu.get("nr_periods", 0),
                  "throttledPeriods": cpu.get("nr_throttled", 0),
                  "throttledTime": cpu.get("throttled_usec", 0) * 1000}

    raw = keyed(files.get("memory.stat"))
    mem_usage, mem_limit = _uint(files.get("memory.current")), _uint(files.get("memory.max"))
    swap_usage = _uint(files.get("memory.swap.current")) + mem_usage
    swap_limit = _uint(files.get("memory.swap.max")) if "memory.swap.max" in files else 0
    if swap_limit != MAX_UINT64:
        swap_limit = min(MAX_UINT64, swap_limit + mem_limit)
    events = keyed(files.get("memory.events"))
    memory: dict[str, Any] = {
        "cache": raw.get("file", 0),
        "usage": _memory_entry(mem_usage, mem_limit, _uint(files.get("memory.peak"))),
        "swap": _memory_entry(swap_usage, swap_limit, 0),
        "kernel": _memory_entry(0, 0, 0),
        "kernelTCP": _memory_entry(0, 0, 0),
        "raw": raw,
        "event_count": {k: v for k, v in (("low", events.get("low", 0)),
                                          ("high", events.get("high", 0)),
                                          ("max", events.get("max", 0)),
                                          ("oom", events.get("oom", 0)),
                                          ("oom_kill", events.get("oom_kill", 0))) if v},
    }
    if not memory["cache"]:
        del memory["cache"]
    if not raw:
        del memory["raw"]

    pids_limit = _uint(files.get("pids.max"))
    pids = {"current": _uint(files.get("pids.current")),
            "limit": 0 if pids_limit == MAX_UINT64 else pids_limit}
    return {
        "cpu": {"usage": _omit_zero(usage, "total"),
                "throttling": {k: v for k, v in throttling.items() if v}},
        "cpuset": {"cpu_exclusive": 0, "mem_hardwall": 0, "mem_exclusive": 0,
                   "memory_migrate": 0, "memory_spread_page": 0, "memory_spread_slab": 0,
                   "memory_pressure": 0, "sched_load_balance": 0,
                   "sched_relax_domain_level": 0},
        "memory": memory,
        "pids": {k: v for k, v in pids.items() if v},
        "blkio": {},
        "hugetlb": {},
        "intel_rdt": {},
        "network_interfaces": None,
    }


def oom_kills(files: Mapping[str, str]) -> int:
    """How many processes the guest's OOM killer killed in the container's cgroup."""
    return keyed(files.get("memory.events")).get("oom_kill", 0)


def parse_interval(text: str) -> float:
    """A Go duration (``5s``, ``100ms``, ``1m30s``, ``1.5s``; a bare number is seconds) in
    seconds; ``ValueError`` if malformed."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, i, sign = 0.0, 0, 1.0
    if text[:1] in "+-" and text:
        sign, text = (-1.0 if text[0] == "-" else 1.0), text[1:]
    if not text:
        raise ValueError("empty duration")
    while i < len(text):
        j = i
        while j < len(text) and (text[j].isdigit() or text[j] == "."):
            j += 1
        k = j
        while k < len(text) and not (text[k].isdigit() or text[k] == "."):
            k += 1
        number, unit = text[i:j], text[j:k]
        if not number or unit not in units:
            raise ValueError(f"invalid duration {text!r}")
        total += float(number) * units[unit]
        i = k
    return sign * total
