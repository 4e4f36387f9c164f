"""Soak: many container lives in one UVM, then many cold runs through the runc CLI (issue 15,
point 6). Every 50 it prints what must stay flat: QEMU's and this process's RSS and open
descriptors, the host's mount count and (in the UVM) the guest's mount count and free memory.

    python bench/soak.py [--cycles 500] [--runs 100] [--every 50]

Phase 1 (``--cycles``): one UVM (``start_uvm()``); each cycle creates a container with a bind
mount, starts it (``sh -c 'echo ok > /d/out'``), waits for it and deletes it.
Phase 2 (``--runs``): ``uvmshim --root R run --bundle B <id>`` as a child process, each a UVM
of its own (a clone of the template); QEMU must be gone after each, and nothing left behind.

Run on demand (about 10 minutes under TCG); ``tests/test_soak.py`` runs a 50-cycle phase 1 and
asserts no growth. Needs root and qemu-system-x86_64.

Under TCG, QEMU's RSS is not flat at first: it grows by about 20-25 MiB per container life (each
runs new guest code) until TCG's translation buffer is full (1 GiB by default in QEMU 7.2, in
regions of ~64 MiB that show up one by one in ``/proc/<qemu>/smaps``); then it plateaus. That is
QEMU's code cache, not a leak (``-accel tcg,tb-size=N`` would bound it); descriptors, mounts
and guest memory stay flat from the first sample on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvmshim.runtime.container import Container
from uvmshim.runtime.vm import QemuUvm, start_uvm
from uvmshim.spec import Spec
from uvmshim.uvm.qemu import mounts

#: The container each cycle runs: it writes through its bind mount.
SCRIPT = "rm -f /d/out && echo ok > /d/out"


@dataclass
class Sample:
    """What must stay flat, at one point of a soak."""

    at: int
    host_rss_kb: int
    host_fds: int
    host_mounts: int
    qemu_rss_kb: int = 0
    qemu_fds: int = 0
    guest_mounts: int = 0
    guest_free_kb: int = 0
    #: Phase 2: the runs' VM directories still there (each run's QEMU is gone with it).
    vm_dirs_left: int = 0
    #: Phase 2: the largest RSS of any process the runs started (QEMU's, in practice).
    children_max_rss_kb: int = 0

    def line(self) -> str:
        guest = (f"  qemu rss {self.qemu_rss_kb / 1024:6.1f} MiB fds {self.qemu_fds:3d}  "
                 f"guest mounts {self.guest_mounts:3d} free {self.guest_free_kb / 1024:6.1f} MiB"
                 if self.qemu_rss_kb else
                 f"  VM directories left {self.vm_dirs_left}, largest child (QEMU) rss "
                 f"{self.children_max_rss_kb / 1024:6.1f} MiB")
        return (f"{self.at:5d}: host rss {self.host_rss_kb / 1024:6.1f} MiB fds "
                f"{self.host_fds:3d} mounts {self.host_mounts:4d}{guest}")


def _rss_kb(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid: int | str = "self") -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _host_mounts(under: Path) -> int:
    """Host mounts at or below ``under`` (ours only: other VMs on the host come and go)."""
    return len(mounts.mounts_under(under))


def host_sample(at: int, mounts_under: Path) -> Sample:
    return Sample(at, _rss_kb(), _fds(), _host_mounts(mounts_under))


async def uvm_sample(uvm: QemuUvm, at: int) -> Sample:
    s = host_sample(at, uvm.machine.state_dir)
    pid = uvm.machine.pid
    if pid is not None:
        s.qemu_rss_kb, s.qemu_fds = _rss_kb(pid), _fds(pid)
    res = await uvm.agent.exec(
        ["sh", "-c", "wc -l < /proc/mounts; grep MemAvailable /proc/meminfo"], timeout=30)
    out = res.stdout.decode().split()
    s.guest_mounts = int(out[0])
    s.guest_free_kb = int(out[2])
    return s


def soak_spec(rootfs: Path, data: Path) -> Spec:
    return Spec.from_json({
        "ociVersion": "1.1.0",
        "process": {"args": ["sh", "-c", SCRIPT], "cwd": "/",
                    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "root": {"path": str(rootfs)},
        "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"},
                                 {"type": "uts"}]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/d", "type": "bind", "source": str(data),
                    "options": ["rbind"]}],
    })


async def one_cycle(uvm: QemuUvm, spec: Spec, cid: str) -> None:
    c = Container(uvm.vm, uvm.agent, cid, spec)
    await c.create()
    try:
        out = bytearray()

        async def drain() -> None:
            async for _, data in c.output():
                out.extend(data)

        relay = asyncio.create_task(drain())
        await c.start()
        code = await c.wait()
        await relay
        if code != 0:
            raise RuntimeError(f"container {cid} exited {code}: {out.decode(errors='replace')}")
    finally:
        await c.delete()


async def soak_in_one_uvm(rootfs: Path, data: Path, cycles: int, every: int,
                          report: Any = print) -> list[Sample]:
    """``cycles`` container lives in one UVM; a sample before the first and every ``every``."""
    spec = soak_spec(rootfs, data)
    samples: list[Sample] = []
    async with start_uvm() as uvm:
        samples.append(await uvm_sample(uvm, 0))
        report(samples[-1].line())
        for i in range(1, cycles + 1):
            await one_cycle(uvm, spec, f"soak{i}")
            if i % every == 0:
                samples.append(await uvm_sample(uvm, i))
                report(samples[-1].line())
    return samples


def cold_runs(rootfs: Path, data: Path, runs: int, every: int, work: Path,
              report: Any = print) -> list[Sample]:
    """``runs`` runs of ``uvmshim run`` (runc's CLI), each a UVM of its own."""
    root = work / "runc-root"
    vm_dir = work / "vms"  # the runs' VM directories: ours alone, to count what stays
    vm_dir.mkdir()
    bundle = work / "bundle"
    bundle.mkdir()
    spec = soak_spec(rootfs, data).to_json()
    (bundle / "config.json").write_text(json.dumps(spec))
    env = dict(os.environ, UVMSHIM_VM_DIR=str(vm_dir))
    samples = [host_sample(0, vm_dir)]
    report(samples[-1].line())
    for i in range(1, runs + 1):
        res = subprocess.run(
            [sys.executable, "-c", "from uvmshim.cli.runc_cmd import main; main()",
             "--root", str(root), "run", "--bundle", str(bundle), f"cold{i}"],
            capture_output=True, text=True, timeout=300, check=False, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"run {i}: exit {res.returncode}: {res.stderr.strip()}")
        if i % every == 0:
            samples.append(host_sample(i, vm_dir))
            samples[-1].vm_dirs_left = len(os.listdir(vm_dir))
            samples[-1].children_max_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            report(samples[-1].line())
    return samples


def growth(samples: list[Sample], field_name: str) -> int:
    """How much ``field_name`` grew from the second sample (after warm-up) to the last."""
    first = samples[0] if len(samples) < 3 else samples[1]
    return int(getattr(samples[-1], field_name)) - int(getattr(first, field_name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("this benchmark boots utility VMs: run it as root")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        subprocess.run([str(Path(__file__).parent.parent / "examples" / "make-rootfs.sh"),
                        str(rootfs)], check=True, stdout=subprocess.DEVNULL)
        data = work / "data"
        data.mkdir()
        t0 = time.monotonic()
        print(f"phase 1: {args.cycles} create/start/delete cycles in one UVM")
        one = asyncio.run(soak_in_one_uvm(rootfs, data, args.cycles, args.every))
        print(f"  {time.monotonic() - t0:.0f} s")
        t0 = time.monotonic()
        print(f"phase 2: {args.runs} cold runs through the runc CLI")
        two = cold_runs(rootfs, data, args.runs, args.every, work)
        print(f"  {time.monotonic() - t0:.0f} s")
    print("growth after warm-up (phase 1): "
          + ", ".join(f"{f} {growth(one, f):+d}" for f in (
              "host_rss_kb", "host_fds", "host_mounts", "qemu_rss_kb", "qemu_fds",
              "guest_mounts", "guest_free_kb")))
    print("growth (phase 2): " + ", ".join(f"{f} {growth(two, f):+d}" for f in (
        "host_rss_kb", "host_fds", "host_mounts", "vm_dirs_left")))
    flat = all(growth(one, f) == 0 for f in ("host_fds", "host_mounts", "qemu_fds",
                                              "guest_mounts")) and \
        all(growth(two, f) == 0 for f in ("host_fds", "host_mounts", "vm_dirs_left"))
    print("flat" if flat else "NOT FLAT")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
