"""Shared helpers of the UVM benchmarks (``bench_boot.py``, ``bench_scsi.py``).

Not a benchmark itself. Everything that boots a VM here does it inside ``async with`` (or
``try``/``finally``), so every VM is shut down on success, on an error and on Ctrl-C
(``asyncio.run`` turns Ctrl-C into a cancellation of the main task).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from uvmshim.uvm.bootfiles import BootFiles
from uvmshim.uvm.initrd.cpio import CpioWriter
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.qemu.config import QemuConfig

#: Guest memory and vCPUs: what :func:`uvmshim.runtime.vm.start_uvm` uses by default.
MEMORY_MB = 512
CPUS = 2


def now() -> float:
    """The clock every figure is measured with."""
    return time.perf_counter()


def uvm_config(boot: BootFiles, initrd: Path | None = None) -> QemuConfig:
    """The :class:`QemuConfig` that ``start_uvm()`` builds by default, optionally another initrd.

    The benchmarks check at run time (:func:`argv_difference`) that the QEMU command line really
    is the product's, so a change to ``start_uvm`` cannot silently make the comparison unfair.
    """
    opts = UvmOptions()
    return QemuConfig(
        kernel=boot.kernel, initrd=initrd or boot.initrd, memory_mb=MEMORY_MB, cpus=CPUS,
        scsi_controllers=opts.scsi_controller_count,
        vpmem_slots=opts.effective_vpmem_count,
        hotplug_ports=max(4, opts.effective_vpmem_count),
    )


def argv_difference(a: Sequence[str], a_state: Path, a_initrd: Path,
                    b: Sequence[str], b_state: Path, b_initrd: Path) -> list[str]:
    """Arguments in which two QEMU argvs differ, other than their state directory and initrd."""

    def norm(argv: Sequence[str], state: Path, initrd: Path) -> list[str]:
        return [arg.replace(str(state), "<state>").replace(str(initrd), "<initrd>")
                for arg in argv]

    na, nb = norm(a, a_state, a_initrd), norm(b, b_state, b_initrd)
    if len(na) != len(nb):
        return [f"{len(na)} vs {len(nb)} arguments"]
    return [f"{x!r} vs {y!r}" for x, y in zip(na, nb, strict=True) if x != y]


def overlay_initrd(base: Path, out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write ``base`` followed by a second newc archive holding ``files`` (name → data, mode).

    The kernel unpacks concatenated archives in order and a later entry replaces an earlier one,
    so the result boots with every file of ``base`` except those replaced here (e.g. ``init``).
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(base, tmp)
    with open(tmp, "ab") as f:
        # The base archive ends padded to 512 bytes; newc headers need 4-byte alignment.
        if f.tell() % 4:
            f.write(b"\0" * (-f.tell() % 4))
        w = CpioWriter(f)
        for name, (data, mode) in files.items():
            w.add_bytes(name, data, mode=mode)
        w.close()
    os.replace(tmp, out)


def median(xs: Sequence[float]) -> float:
    """The median (raises on an empty list: a benchmark with no samples is a bug)."""
    return statistics.median(xs)


def spread(xs: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    """``min..max`` of ``xs`` (for judging noise next to a median)."""
    return f"{min(xs) * scale:.0f}..{max(xs) * scale:.0f}{unit}"


def verdict(ratio: float, target: float) -> str:
    """``OK`` or ``MISSED``."""
    return "OK" if ratio <= target else "MISSED"


def interleaved(rounds: int, variants: Sequence[str]) -> list[list[str]]:
    """Per round, the variants in an order rotated by one each round (A B C, B C A, ...).

    Interleaving spreads slow drift of the machine (other load, thermal) evenly over the
    variants; rotating keeps a variant from always following the same other one.
    """
    n = len(variants)
    return [[variants[(r + i) % n] for i in range(n)] for r in range(rounds)]


def require_root() -> None:
    """Exit with a message unless running as root (the VMs need bind mounts and setpriv)."""
    if os.geteuid() != 0:
        sys.exit("this benchmark boots utility VMs: run it as root")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``asyncio.run(main())``; Ctrl-C cancels it (VMs are shut down) and exits with 130."""
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("interrupted; every VM was shut down", file=sys.stderr)
        sys.exit(130)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` so far (None if it is gone).

    Under TCG a boot is CPU-bound, so QEMU's CPU time to a milestone is a second view of its
    cost beside the wall-clock time (10 ms resolution; contention inflates it too, less so).
    """
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")": state is field 3 of stat(5), so utime (14) and stime (15) are at 11, 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
