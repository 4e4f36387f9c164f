"""Benchmark: boot to agent-ready vs. the floor (the same VM booted to ``python3 -c pass``).

Target (issue #3): uvmshim's boot to agent-ready takes at most 1.2× the floor.

* **agent ready**: ``start_uvm()``, from the moment it launches QEMU (its "booting" progress
  step, i.e. after the boot files were found in the cache) until the guest agent's ``hello``
  answer has arrived over the virtio-serial port (``start_uvm`` is about to yield).
* **floor**: the same kernel, the same initrd contents and the same QEMU command line (checked
  at run time: the argvs may differ only in the initrd path and the state directory), started
  through the same ``QemuMachine``, with only ``/init`` replaced by a script that mounts /proc
  and /dev, runs ``python3 -c pass`` (with the interpreter flags and environment the real
  /init gives the agent: ``-S -s -P``, ``PYTHONHASHSEED=0``) and writes a marker line to the
  serial console. Measured from the same point (just before ``QemuMachine.launch()``) until
  the marker is in the console log, which the host polls every 2 ms.
* **no Python**: the same, with an ``/init`` that writes the marker at once.

The replacement /init comes from a second cpio archive appended to the real initrd (the kernel
unpacks concatenated archives in order, later entries replacing earlier ones). Boots are
interleaved round by round (order rotated each round) to spread drift and noise; one warm-up
round (page cache, KVM probe) is not counted. Figures are medians; the verdict is on the ratio
of the wall-clock medians. Also printed, to judge noise and see where the time goes: the ratio
within each round, QEMU's CPU time at ready, and guest uptimes (the kernel's clock, which starts
some 0.3-0.5 s after QEMU does) when /init got going, the agent's Python was up and ``hello``
was answered, or when the floor's python3 started and finished. On a machine shared with other
work the wall-clock figures scatter by ±20 %: use more ``--boots`` there.

    python bench/bench_boot.py [--boots 5] [--warmup 1]

Needs root and qemu-system-x86_64 (TCG is used when KVM does not work).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _uvm import (
    argv_difference,
    cpu_seconds,
    interleaved,
    median,
    now,
    overlay_initrd,
    require_root,
    run,
    spread,
    uvm_config,
    verdict,
)
from uvmshim.runtime.vm import start_uvm
from uvmshim.uvm.bootfiles import BootFiles, ensure_boot_files
from uvmshim.uvm.qemu.machine import QemuMachine

TARGET = 1.2
MARKER = "UVMSHIM-BENCH-READY"
#: How often the host looks at the console log for the marker.
CONSOLE_POLL = 0.002
BOOT_TIMEOUT = 120.0

FLOOR_INIT = f"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
read t0 _ < /proc/uptime
PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -S -s -P -c pass
read up _ < /proc/uptime
echo "{MARKER} $up $t0" > /dev/console
while :; do sleep 60; done
"""

BARE_INIT = f"""#!/bin/sh
echo "{MARKER}" > /dev/console
while :; do sleep 60; done
"""

AGENT, FLOOR, BARE = "agent", "floor", "no-python"


@dataclass
class Samples:
    """Host-measured boot times (s) and guest uptimes (s) at ready, per variant."""

    host: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    #: agent / floor time of the two boots of the same round (paired, so drift cancels).
    paired: list[float] = field(default_factory=list)
    guest: dict[str, list[float]] = field(default_factory=dict)
    agent_started: list[float] = field(default_factory=list)
    init_started: list[float] = field(default_factory=list)
    floor_python_started: list[float] = field(default_factory=list)
    #: (variant, QEMU argv, state dir, initrd) of every counted boot.
    argvs: list[tuple[str, list[str], Path, Path]] = field(default_factory=list)

    def add(self, variant: str, host: float, guest: float | None, cpu: float | None) -> None:
        self.host.setdefault(variant, []).append(host)
        if cpu is not None:
            self.cpu.setdefault(variant, []).append(cpu)
        if guest is not None and guest >= 0:
            self.guest.setdefault(variant, []).append(guest)


@dataclass
class Boot:
    """One boot: wall seconds to ready, QEMU CPU seconds at ready, guest uptimes, argv."""

    secs: float
    cpu: float | None
    guest: dict[str, float]
    argv: list[str]
    state: Path


async def boot_agent(boot: BootFiles) -> Boot:
    """Boot through ``start_uvm``; guest stamps: init_started, agent_started, uptime (hello)."""
    marks: dict[str, float] = {}

    def progress(msg: str) -> None:
        if "booting" in msg:
            marks["launch"] = now()

    start = now()
    async with start_uvm(progress=progress, template=False) as uvm:  # a boot, not a clone
        ready = now()
        cpu = cpu_seconds(uvm.machine.pid)
        info = uvm.agent.guest_info
        stamps = {k: float(info[k]) for k in ("init_started", "agent_started", "uptime")
                  if isinstance(info.get(k), int | float)}
        argv, state = uvm.machine.argv, uvm.machine.state_dir
    # If start_uvm stops reporting "booting", fall back to timing all of it (slightly more).
    return Boot(ready - marks.get("launch", start), cpu, stamps, argv, state)


async def boot_floor(boot: BootFiles, initrd: Path) -> Boot:
    """Boot ``initrd`` through ``QemuMachine`` until the console marker; guest stamps (if the
    marker has them): uptime (marker written), python_started."""
    machine = QemuMachine(uvm_config(boot, initrd))
    start = now()
    async with machine:
        line = await wait_console(machine, MARKER)
        ready = now()
        cpu = cpu_seconds(machine.pid)
        argv, state = machine.argv, machine.state_dir
    stamps = dict(zip(("uptime", "python_started"), map(float, line.split()[1:]), strict=False))
    return Boot(ready - start, cpu, stamps, argv, state)


async def wait_console(machine: QemuMachine, marker: str,
                       timeout: float = BOOT_TIMEOUT) -> str:
    """Poll the VM's serial console log until a line starting with ``marker`` is complete."""
    deadline = now() + timeout
    buf = b""
    with open(machine.console_log, "rb") as f:
        while True:
            buf += f.read()
            for raw in buf.splitlines(keepends=True):
                text = raw.decode(errors="replace").strip()
                if text.startswith(marker) and raw.endswith(b"\n"):
                    return text
            if machine.returncode is not None:
                raise RuntimeError(f"QEMU exited ({machine.returncode}) before the marker; "
                                   f"console:\n{buf.decode(errors='replace')[-2000:]}")
            if now() > deadline:
                raise RuntimeError(f"no {marker} on the console after {timeout:.0f} s; "
                                   f"console:\n{buf.decode(errors='replace')[-2000:]}")
            await asyncio.sleep(CONSOLE_POLL)


async def one_boot(variant: str, boot: BootFiles, initrds: dict[str, Path],
                   samples: Samples | None) -> float:
    if variant == AGENT:
        b = await boot_agent(boot)
        initrd = boot.initrd
    else:
        initrd = initrds[variant]
        b = await boot_floor(boot, initrd)
    if samples is not None:
        samples.add(variant, b.secs, b.guest.get("uptime"), b.cpu)
        samples.argvs.append((variant, b.argv, b.state, initrd))
        for key, dest in (("agent_started", samples.agent_started),
                          ("init_started", samples.init_started),
                          ("python_started", samples.floor_python_started)):
            if key in b.guest:
                dest.append(b.guest[key])
    return b.secs


async def bench(boots: int, warmup: int, say: Callable[[str], None]) -> bool:
    boot = await ensure_boot_files(progress=lambda m: say(f"  ({m})"))
    variants = [AGENT, FLOOR, BARE]
    samples = Samples()
    with tempfile.TemporaryDirectory(prefix="uvmshim-bench-boot-") as tmp:
        initrds = {FLOOR: Path(tmp) / "floor.cpio", BARE: Path(tmp) / "bare.cpio"}
        for name, script in ((FLOOR, FLOOR_INIT), (BARE, BARE_INIT)):
            overlay_initrd(boot.initrd, initrds[name], {"init": (script.encode(), 0o755)})
        say(f"boot files {boot.key}; {boots} boots of each of {', '.join(variants)} "
            f"(+{warmup} warm-up round), interleaved")
        plan = interleaved(warmup + boots, variants)
        for r, order in enumerate(plan):
            counted = r >= warmup
            line = []
            times: dict[str, float] = {}
            for variant in order:
                secs = await one_boot(variant, boot, initrds, samples if counted else None)
                times[variant] = secs
                line.append(f"{variant} {secs:.2f}s")
            if counted:
                samples.paired.append(times[AGENT] / times[FLOOR])
            say(f"  {'round ' + str(r - warmup + 1) if counted else 'warm-up'}: "
                + ", ".join(line))

    # Every boot against the first agent boot: a floor with other flags, or boot files rebuilt
    # by start_uvm() during the run (another kernel or initrd), would make the figures unfair.
    _, ref_argv, ref_state, _ = next(a for a in samples.argvs if a[0] == AGENT)
    fair = True
    for variant, argv, state, initrd in samples.argvs:
        if variant == AGENT:
            initrd = boot.initrd
        diff = argv_difference(ref_argv, ref_state, boot.initrd, argv, state, initrd)
        if diff:
            fair = False
            print(f"WARNING: a {variant} boot's QEMU argv differs: {'; '.join(diff)}")

    def fig(variant: str) -> str:
        xs = samples.host[variant]
        g = samples.guest.get(variant)
        c = samples.cpu.get(variant)
        guest = f", guest uptime {median(g):.2f} s" if g else ""
        cpu = f", QEMU CPU {median(c):.2f} s" if c else ""
        return f"{median(xs):5.2f} s (range {spread(xs, 1000, ' ms')}{guest}{cpu})"

    print()
    print(f"QEMU command line identical apart from initrd and state dir: "
          f"{'yes' if fair else 'NO'}")
    print(f"boot to /init without Python:             {fig(BARE)}")
    print(f"floor: /init runs python3 -c pass:        {fig(FLOOR)}")
    print(f"uvmshim: start_uvm() to agent ready:      {fig(AGENT)}")
    inits = [x for x in samples.init_started if x >= 0]
    starts = [x for x in samples.agent_started if x >= 0]
    if inits and starts:
        print(f"  agent boot, guest uptime: /init mounts done {median(inits):.2f} s, agent "
              f"Python running {median(starts):.2f} s, hello answered "
              f"{median(samples.guest[AGENT]):.2f} s")
    if samples.floor_python_started:
        started = median(samples.floor_python_started)
        print(f"  floor boot, guest uptime: python3 started {started:.2f} s, "
              f"marker written {median(samples.guest[FLOOR]):.2f} s")
    ratio = median(samples.host[AGENT]) / median(samples.host[FLOOR])
    print(f"  same-round agent/floor ratios: median {median(samples.paired):.2f}, "
          f"range {min(samples.paired):.2f}..{max(samples.paired):.2f}")
    if samples.cpu.get(AGENT) and samples.cpu.get(FLOOR):
        cpu_ratio = median(samples.cpu[AGENT]) / median(samples.cpu[FLOOR])
        print(f"  QEMU CPU time to ready, agent / floor: {cpu_ratio:.2f}× (TCG boots are "
              "CPU-bound; a second view of the same boots)")
    ok = verdict(ratio, TARGET) == "OK" and fair
    print(f"agent ready / floor (medians, wall clock): {ratio:.2f}× (target ≤ {TARGET}) "
          f"{verdict(ratio, TARGET) if fair else 'INVALID (flags differ)'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5, help="counted boots of each variant")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the results")
    args = parser.parse_args()
    if args.boots < 1 or args.warmup < 0:
        parser.error("--boots must be >= 1 and --warmup >= 0")
    require_root()

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    async def go() -> None:
        await bench(args.boots, args.warmup, say)

    run(go)


if __name__ == "__main__":
    main()
