"""Benchmark: ``uvmshim image pull`` of the Debian image from a loopback registry, vs. podman.

The Debian bookworm minbase image of ``tests/debian.py`` is pushed (gzip-compressed) to a
distribution registry started on 127.0.0.1; then, interleaved, ``--repeat`` times each, into
fresh stores:

* ``uvmshim image pull`` (skopeo copy into an OCI layout, then the import: layer disks with
  dm-verity, and without it);
* ``skopeo copy docker://… oci-archive:…`` then ``podman load`` of that archive (into a fresh
  podman storage root): the same download, then podman's own unpacking into its storage.

Prints the median seconds of each and the ratios, all measured in the same run.

    python bench/bench_pull.py [--repeat 3] [--dir DIR] [--json]

Needs root, skopeo, docker-registry, podman and debootstrap (for the image, cached daily).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import debian
import registry


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def uvmshim_pull(ref: str, work: Path, verity: bool) -> float:
    store = work / "store"
    env = {**os.environ, "UVMSHIM_IMAGE_ROOT": str(store)}
    try:
        return timed(["uvmshim", "image", "pull", "--no-tls-verify",
                      *([] if verity else ["--no-verity"]), ref], env)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def podman_pull(ref: str, work: Path) -> float:
    root, runroot, archive = work / "podman-root", work / "podman-run", work / "img.tar"
    try:
        t0 = time.perf_counter()
        subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                        f"oci-archive:{archive}"], check=True, capture_output=True)
        subprocess.run(["podman", "--root", str(root), "--runroot", str(runroot),
                        "--storage-driver", "overlay", "load", "-q", "-i", str(archive)],
                       check=True, capture_output=True)
        return time.perf_counter() - t0
    finally:
        subprocess.run(["podman", "--root", str(root), "--runroot", str(runroot), "system",
                        "reset", "-f"], capture_output=True)
        for p in (root, runroot, archive):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: $TMPDIR or /tmp)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    layout = debian.debian_image()
    size = debian.layer_tar(layout).stat().st_size
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir=args.dir) as tmp:
        work = Path(tmp)
        with registry.serve(work / "registry") as (host, _):
            ref = f"{host}/debian:bookworm-minbase"
            registry.push(layout, debian.REF, ref, compress=True)
            times: dict[str, list[float]] = {"uvmshim": [], "uvmshim-no-verity": [],
                                             "podman": []}
            for _ in range(args.repeat):
                times["uvmshim"].append(uvmshim_pull(ref, work, True))
                times["uvmshim-no-verity"].append(uvmshim_pull(ref, work, False))
                times["podman"].append(podman_pull(ref, work))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Debian image: {size / 1e6:.1f} MB layer tar, pushed gzip-compressed to {host}")
    labels = {"uvmshim": "uvmshim image pull (verity)",
              "uvmshim-no-verity": "uvmshim image pull --no-verity",
              "podman": "skopeo copy + podman load"}
    for k, label in labels.items():
        print(f"{label:34} {med[k]:6.2f} s  ({size / 1e6 / med[k]:6.1f} MB/s of layer tar)")
    print(f"uvmshim pull / (skopeo copy + podman load): {med['uvmshim'] / med['podman']:.2f} "
          f"(verity), {med['uvmshim-no-verity'] / med['podman']:.2f} (no verity)")
    if args.json:
        print(json.dumps({"layer_mb": round(size / 1e6, 1),
                          "seconds": {k: round(v, 3) for k, v in med.items()},
                          "ratio_vs_podman": round(med["uvmshim"] / med["podman"], 3)}))


if __name__ == "__main__":
    main()
