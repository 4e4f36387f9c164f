"""Benchmark: many bind mounts of one container in a real utility VM (issue 15, point 9).

One UVM (``start_uvm()``); for each count N (default 100 and 1,000, in the same run) a spec
with a Plan9 root and N bind mounts of distinct host directories goes through
``create_container_resources`` (every share added on the host and mounted in the guest), then
its resources are released (newest first). Both phases are timed; the total for N=1,000 must
be at most 10 s, and the scaling (time for the largest N over time for the smallest, divided
by the ratio of the counts) should stay near 1 (linear).

    python bench/bench_binds.py [--counts 100 1000] [--one-by-one | --compare N]

``--one-by-one`` adds the binds one share at a time (``UtilityVM.add_plan9`` per bind, one
host round and one agent request, i.e. a guest mount, each): the pre-batching behaviour.
``--compare N`` also does N binds that way in the same UVM afterwards: a same-run baseline.

Needs root and qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _uvm import require_root
from uvmshim.allocator import create_container_resources
from uvmshim.runtime.vm import QemuUvm, start_uvm
from uvmshim.spec import Spec

#: The target of issue 15: 1,000 binds (mount and release) in at most this many seconds.
TARGET_1000 = 10.0


def bind_spec(root: Path, dirs: list[Path]) -> Spec:
    return Spec.from_json({
        "ociVersion": "1.1.0",
        "process": {"args": ["true"], "cwd": "/"},
        "root": {"path": str(root)},
        "linux": {},
        "mounts": [{"destination": f"/b/{i}", "type": "bind", "source": str(d),
                    "options": ["rbind", "ro"]} for i, d in enumerate(dirs)],
    })


async def one_count(uvm: QemuUvm, work: Path, n: int, one_by_one: bool) -> dict[str, float]:
    root = work / "rootfs"
    root.mkdir(parents=True, exist_ok=True)
    dirs = []
    for i in range(n):
        d = work / f"d{i}"
        d.mkdir(exist_ok=True)
        dirs.append(d)
    t0 = time.perf_counter()
    if one_by_one:
        shares = [await uvm.vm.add_plan9(str(root), f"/run/bench/{n}/root", read_only=True)]
        for i, d in enumerate(dirs):
            shares.append(await uvm.vm.add_plan9(str(d), f"/run/bench/{n}/m{i}",
                                                 read_only=True))
        t1 = time.perf_counter()
        for s in reversed(shares):
            await s.release()
    else:
        alloc = await create_container_resources(bind_spec(root, dirs), uvm.vm, f"bench{n}")
        t1 = time.perf_counter()
        await alloc.resources.release()
    t2 = time.perf_counter()
    return {"n": n, "mount": t1 - t0, "release": t2 - t1, "total": t2 - t0}


async def main(counts: list[int], one_by_one: bool, compare: int = 0) -> int:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-binds-") as tmp:
        async with start_uvm() as uvm:
            # Warm-up: the guest loads 9p and mounts the export on first use.
            await one_count(uvm, Path(tmp) / "warm", 2, one_by_one)
            for n in counts:
                work = Path(tmp) / str(n)
                work.mkdir()
                res = await one_count(uvm, work, n, one_by_one)
                results.append(res)
                print(f"{n:6d} binds: mount {res['mount']:7.2f} s  release "
                      f"{res['release']:7.2f} s  total {res['total']:7.2f} s  "
                      f"({res['total'] / n * 1e3:.1f} ms/bind)", flush=True)
            if compare:
                work = Path(tmp) / "compare"
                work.mkdir()
                res = await one_count(uvm, work, compare, True)
                print(f"{compare:6d} binds one share at a time (baseline): mount "
                      f"{res['mount']:7.2f} s  release {res['release']:7.2f} s  total "
                      f"{res['total']:7.2f} s  ({res['total'] / compare * 1e3:.1f} ms/bind)",
                      flush=True)
    first, last = results[0], results[-1]
    if last["n"] > first["n"]:
        scaling = (last["total"] / first["total"]) / (last["n"] / first["n"])
        print(f"scaling {last['n']}/{first['n']}: time ratio "
              f"{last['total'] / first['total']:.1f} for a count ratio "
              f"{last['n'] / first['n']:.0f} (1.0 = linear: {scaling:.2f})")
    thousand = next((r for r in results if r["n"] == 1000), None)
    if thousand is not None:
        ok = thousand["total"] <= TARGET_1000
        print(f"1,000 binds in {thousand['total']:.2f} s: "
              f"{'OK' if ok else 'FAIL'} (target <= {TARGET_1000:g} s)")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--one-by-one", action="store_true",
                        help="one share per add_plan9 call (the pre-batching baseline)")
    parser.add_argument("--compare", type=int, default=0, metavar="N",
                        help="then N binds one share at a time, in the same UVM")
    args = parser.parse_args()
    require_root()
    sys.exit(asyncio.run(main(args.counts, args.one_by_one, args.compare)))
