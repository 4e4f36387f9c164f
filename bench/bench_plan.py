"""Benchmark: plan specs with 1, 100, 1,000 and 10,000 bind mounts on the simulated UVM.

Targets (issue #2): at most 50 µs per mount at 1,000 mounts, and linear growth (10,000 mounts in
at most 12× the time of 1,000). The baseline, measured in the same run, is the same allocation
with no mounts at all (layers + scratch only); its cost is subtracted from the per-mount figure.

    python bench/bench_plan.py [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from uvmshim.allocator import create_container_resources
from uvmshim.spec import Spec
from uvmshim.uvm.sim import simulated_uvm


def make_spec(root: Path, mounts: int) -> Spec:
    dirs = [root / f"d{i}" for i in range(16)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    layer = root / "layer"
    layer.mkdir(exist_ok=True)
    (layer / "layer.vhd").write_bytes(b"\0")
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    (scratch / "sandbox.vhdx").write_bytes(b"\0")
    obj: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "mounts": [{"destination": f"/m{i}", "type": "bind", "source": str(dirs[i % 16]),
                    "options": ["rbind", "ro"] if i % 2 else ["rbind"]} for i in range(mounts)],
        "windows": {"layerFolders": [str(layer), str(scratch)]},
        "linux": {},
    }
    return Spec.from_json(obj)


def time_plan(spec: Spec, repeat: int) -> float:
    async def once() -> float:
        vm, _ = simulated_uvm()
        start = time.perf_counter()
        a = await create_container_resources(spec, vm, "bench")
        elapsed = time.perf_counter() - start
        await a.resources.release()
        return elapsed

    # The best of several runs, as timeit does: other load on this shared machine only ever
    # adds time. (The allocator pauses the cyclic GC itself, so a collection can't land in
    # one run and not another.)
    gc.collect()
    return min(asyncio.run(once()) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = time_plan(make_spec(root, 0), args.repeat)
        print(f"baseline (layers + scratch, 0 mounts): {base * 1e6:9.1f} µs")
        results: dict[int, float] = {}
        for n in (1, 100, 1_000, 10_000):
            t = time_plan(make_spec(root, n), args.repeat)
            results[n] = t
            per = (t - base) / n * 1e6
            print(f"{n:>6} mounts: {t * 1e3:9.2f} ms total, {per:7.2f} µs per mount, "
                  f"{t / base:8.1f}× baseline")
        per_1000 = (results[1_000] - base) / 1_000 * 1e6
        growth = results[10_000] / results[1_000]
        print(f"per mount at 1,000: {per_1000:.2f} µs (target ≤ 50) "
              f"{'OK' if per_1000 <= 50 else 'MISSED'}")
        print(f"10,000 / 1,000 time ratio: {growth:.2f}× (target ≤ 12) "
              f"{'OK' if growth <= 12 else 'MISSED'}")


if __name__ == "__main__":
    main()
