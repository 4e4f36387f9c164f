"""Benchmark: SCSI hot-add + guest mount through uvmshim vs. a minimal script doing the same.

Target (issue #3): ``UtilityVM.add_scsi()`` takes at most 1.25× the minimal script.

Both sides work on one running utility VM (``start_uvm()``), the same read-only ext4 image (made
with ``mkfs.ext4 -d``) and the same SCSI slot (the one uvmshim picks, controller 0 LUN 0):

* **uvmshim**: ``vm.add_scsi(img, "/run/mounts/m<i>", read_only=True)`` until it returns (QMP
  ``blockdev-add`` + ``device_add``, then the agent's ``mount_scsi`` request, which finds the
  disk below the controller's PCI device in sysfs and mounts it), then ``release()`` (not timed).
* **minimal script**: the same ``blockdev-add`` and ``device_add`` issued directly on the
  machine's QMP client, then the guest side as one agent ``exec`` of a busybox ``sh`` loop that
  polls the same sysfs path every 1 ms until the block device node exists and mounts it
  (``mount -t ext4 -o ro,noload``, the options uvmshim uses; the script knows the file system;
  a failed mount of a disk that is still settling is retried, as the agent does).
  There is no more direct guest path in this VM: the agent's port is the only channel into the
  guest, and ``exec`` is its most generic request (one round trip, like ``mount_scsi``). Then
  ``umount``, ``device_del`` (waiting for ``DEVICE_DELETED``) and ``blockdev-del``, not timed.

The first iteration of each side is a warm-up and not counted: it loads virtio_scsi, sd_mod,
crc32c and ext4 in the guest (uvmshim loads modules on first use) and lets the controllers be
scanned. Then the sides alternate (A B, B A, ...), with a short pause after each teardown so
that hot-unplug work in the guest does not spill into the next measurement. Figures are
medians; a breakdown (QMP part vs. guest part) and the agent's bare round-trip times are
printed to show where the time goes.

    python bench/bench_scsi.py [--iterations 15]

Needs root, qemu-system-x86_64 and e2fsprogs (mkfs.ext4).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _uvm import median, now, require_root, run, spread, verdict
from uvmshim.protocol import SCSI_TARGET, scsi_controller_pci_address, scsi_linux_lun
from uvmshim.runtime.vm import QemuUvm, start_uvm
from uvmshim.uvm.qemu.host import scsi_wwn

TARGET = 1.25
#: Pause after each teardown (not timed): lets the guest finish hot-unplug work.
SETTLE = 0.3
#: The minimal guest side: wait for the disk at ($1 PCI address, $2 LUN), mount it on $3. A
#: mount that fails is retried too: a just-registered disk can answer ENXIO for a moment.
MOUNT_SCRIPT = """
mkdir -p "$3" || exit 1
n=0
while :; do
  for p in /sys/bus/pci/devices/$1/virtio*/host*/target*:0:{T}/*:0:{T}:$2/block/*; do
    [ -b "/dev/${p##*/}" ] && mount -t ext4 -o ro,noload "/dev/${p##*/}" "$3" && exit 0
  done
  n=$((n + 1)); [ $n -gt 5000 ] && exit 1
  usleep 1000
done
""".replace("{T}", str(SCSI_TARGET))
UMOUNT_SCRIPT = 'umount "$1" && rmdir "$1"'


def make_image(root: Path) -> Path:
    """A 16 MiB ext4 image holding one small file, made with ``mkfs.ext4 -d``."""
    tree = root / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello from the bench disk\n")
    img = root / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "16M"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return img


class Timer:
    """Accumulates the time spent in wrapped coroutine methods during one measurement."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, obj: object, method: str, label: str) -> None:
        """Replace ``obj.method`` (an async method) by a timed wrapper, on this instance only."""
        inner: Callable[..., Awaitable[Any]] = getattr(obj, method)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + now() - start

        setattr(obj, method, timed)


async def via_uvmshim(uvm: QemuUvm, img: Path, i: int, timer: Timer) -> tuple[float, int, int]:
    """Time ``add_scsi`` (attach + guest mount); release after. Returns (s, controller, lun)."""
    timer.spent.clear()
    start = now()
    mount = await uvm.vm.add_scsi(str(img), f"/run/mounts/m{i}", read_only=True)
    elapsed = now() - start
    try:
        if i == 0:
            await check_mounted(uvm, mount.guest_path)
    finally:
        await mount.release()
    return elapsed, mount.controller, mount.lun


async def via_script(uvm: QemuUvm, img: Path, i: int, controller: int,
                     lun: int) -> tuple[float, float]:
    """Time the same QMP commands + one exec that mounts. Returns (total s, QMP part s)."""
    qmp = uvm.machine.qmp
    dev, node = f"bench-c{controller}-l{lun}", f"bench-c{controller}-l{lun}-fmt"
    path = f"/run/mounts/b{i}"
    added = mounted = False
    start = now()
    try:
        await qmp.execute("blockdev-add", {
            "driver": "raw", "node-name": node, "read-only": True,
            "file": {"driver": "file", "node-name": f"{node}-file", "filename": str(img),
                     "read-only": True},
        })
        try:
            await qmp.execute("device_add", {
                "driver": "scsi-hd", "id": dev, "drive": node, "bus": f"scsi{controller}.0",
                "channel": 0, "scsi-id": SCSI_TARGET, "lun": lun,
                "serial": f"uvm-c{controller}-l{lun}", "wwn": scsi_wwn(controller, lun),
            })
            added = True
            qmp_done = now()
            result = await uvm.agent.exec(
                ["sh", "-c", MOUNT_SCRIPT, "sh", scsi_controller_pci_address(controller),
                 str(scsi_linux_lun(lun)), path], timeout=10)
            elapsed = now() - start
            if result.exit_code != 0:
                raise RuntimeError(f"guest mount script failed ({result.exit_code}): "
                                   f"{result.stderr.decode(errors='replace')}")
            mounted = True
            if i == 0:
                await check_mounted(uvm, path)
        finally:
            if mounted:
                await uvm.agent.exec(["sh", "-c", UMOUNT_SCRIPT, "sh", path], timeout=10)
            if added:
                with qmp.listener("DEVICE_DELETED") as listener:
                    await qmp.execute("device_del", {"id": dev})
                    async with asyncio.timeout(10):
                        while True:
                            data = (await listener.get()).get("data")
                            if isinstance(data, dict) and data.get("device") == dev:
                                break
    finally:
        await qmp.execute("blockdev-del", {"node-name": node})
    return elapsed, qmp_done - start


async def check_mounted(uvm: QemuUvm, path: str) -> None:
    """Make sure the disk really is mounted (read its file) — once, outside the timing."""
    r = await uvm.agent.exec(["cat", f"{path}/hello.txt"], timeout=10)
    if r.exit_code != 0 or b"hello" not in r.stdout:
        raise RuntimeError(f"{path} is not the bench disk: {r.stderr.decode(errors='replace')}")


async def round_trips(uvm: QemuUvm, n: int = 7) -> tuple[float, float]:
    """Median agent round trip of ``ping`` and of ``exec true`` (s)."""
    pings, execs = [], []
    for _ in range(n):
        start = now()
        await uvm.agent.ping()
        pings.append(now() - start)
        start = now()
        await uvm.agent.exec(["true"])
        execs.append(now() - start)
    return median(pings), median(execs)


async def bench(iterations: int, say: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="uvmshim-bench-scsi-") as tmp:
        os.chmod(tmp, 0o755)
        img = make_image(Path(tmp))
        say("booting the utility VM")
        async with start_uvm() as uvm:
            timer = Timer()
            timer.wrap(uvm.vm.host, "scsi_attach", "host")
            timer.wrap(uvm.vm.guest, "mount_scsi", "guest")
            ours: list[float] = []
            ours_host: list[float] = []
            ours_guest: list[float] = []
            base: list[float] = []
            base_qmp: list[float] = []
            # Warm-up: the first uvmshim add loads the guest modules; then one of the script.
            first, controller, lun = await via_uvmshim(uvm, img, 0, timer)
            await asyncio.sleep(SETTLE)
            first_script, _ = await via_script(uvm, img, 0, controller, lun)
            await asyncio.sleep(SETTLE)
            say(f"warm-up (not counted): uvmshim {first * 1e3:.0f} ms (loads modules), "
                f"script {first_script * 1e3:.0f} ms; slot controller {controller} LUN {lun}")
            for i in range(1, iterations + 1):
                order = ("uvmshim", "script") if i % 2 else ("script", "uvmshim")
                for side in order:
                    if side == "uvmshim":
                        t, c, n = await via_uvmshim(uvm, img, i, timer)
                        if (c, n) != (controller, lun):
                            raise RuntimeError(f"uvmshim used slot {c}:{n}, not {controller}:{lun}")
                        ours.append(t)
                        ours_host.append(timer.spent.get("host", 0.0))
                        ours_guest.append(timer.spent.get("guest", 0.0))
                    else:
                        t, q = await via_script(uvm, img, i, controller, lun)
                        base.append(t)
                        base_qmp.append(q)
                    await asyncio.sleep(SETTLE)
                say(f"  {i:2}: uvmshim {ours[-1] * 1e3:6.1f} ms, script {base[-1] * 1e3:6.1f} ms")
            ping, exec_true = await round_trips(uvm)

    ms = 1e3
    print()
    print(f"SCSI hot-add + mount, median of {iterations} (warm-up excluded from both):")
    print(f"  uvmshim add_scsi():  {median(ours) * ms:7.1f} ms (range {spread(ours, ms, ' ms')})"
          f"  = host attach {median(ours_host) * ms:.1f} ms + guest mount_scsi "
          f"{median(ours_guest) * ms:.1f} ms")
    print(f"  minimal script:      {median(base) * ms:7.1f} ms (range {spread(base, ms, ' ms')})"
          f"  = QMP {median(base_qmp) * ms:.1f} ms + exec mount loop "
          f"{(median(base) - median(base_qmp)) * ms:.1f} ms")
    print(f"  agent round trip: ping {ping * ms:.1f} ms, exec true {exec_true * ms:.1f} ms")
    ratio = median(ours) / median(base)
    print(f"uvmshim / minimal script: {ratio:.2f}× (target ≤ {TARGET}) {verdict(ratio, TARGET)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=15,
                        help="counted hot-adds of each side (after one warm-up each)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the results")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    require_root()

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    async def go() -> None:
        await bench(args.iterations, say)

    run(go)


if __name__ == "__main__":
    main()
