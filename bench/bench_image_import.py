"""Benchmark: image import throughput vs. ``mkfs.ext4 -d`` of the same tree (the floor).

One synthetic layer (many small files, some large ones, made from slices of busybox so that it
compresses like real binaries) is written as an OCI layout, gzip-compressed and uncompressed,
and imported into a fresh store. The floor is ``mkfs.ext4 -d`` (same options as the importer)
of the same tree, already unpacked: the part of an import that no importer built on mkfs can
avoid. Each compression is imported with the dm-verity hash tree (the default) and without it
(``--no-verity``). Throughput is MB (10^6 bytes) of uncompressed layer tar per second, median
of ``--repeat`` runs, measured in the same run; ``--json`` also prints the numbers as JSON.

    python bench/bench_image_import.py [--mb 64] [--repeat 3] [--dir /dev/shm] [--json]
    python bench/bench_image_import.py --debian     # the Debian bookworm minbase image

Needs root, e2fsprogs and busybox-static (run as CI runs the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# The busybox test images live with the tests (they are not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import testimages
from uvmshim.image import ImageStore, ImportEvent, import_image, vhd

BLOCK = 4096
INODE_SIZE = 256


def make_layer(total: int) -> testimages.Layer:
    """A layer of about ``total`` bytes: 3/4 in small files (1-64 KiB), 1/4 in 4 MiB files."""
    blob = Path(testimages.BUSYBOX).read_bytes()
    t = testimages.TarBuilder()
    t.dir("usr")
    t.dir("usr/lib")
    t.dir("usr/share")
    small, i = 0, 0
    while small < total * 3 // 4:
        size = 1024 << (i % 7)  # 1 KiB .. 64 KiB
        off = (i * 7919) % (len(blob) - size)
        if i % 100 == 0:
            t.dir(f"usr/share/d{i // 100}")
        t.add(f"usr/share/d{i // 100}/f{i}", data=blob[off:off + size])
        small += size
        i += 1
    big = 0
    while big < total // 4:
        size = 4 << 20
        data = (blob * (size // len(blob) + 1))[:size]
        t.add(f"usr/lib/big{big // size}.so", data=data, mode=0o755)
        big += size
    return t.close()


def measure(root: Path) -> tuple[int, int]:
    """Blocks and inodes ``mkfs.ext4 -d`` needs for the tree at ``root`` (an estimate)."""
    inodes, blocks = 1, 1
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        names = dirnames + filenames
        dirent = 24 + sum(8 + (len(os.fsencode(n)) + 3) // 4 * 4 for n in names)
        blocks += -(-dirent // (BLOCK - 64))
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                nb = -(-st.st_size // BLOCK)
                blocks += nb + nb // 2048
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                blocks += 1
            if os.listxattr(os.path.join(dirpath, n), follow_symlinks=False):
                blocks += 1
    return blocks, inodes


def fs_bytes(root: Path) -> tuple[int, int]:
    """The size (CHS-exact) and inode count for ``mkfs.ext4 -d`` of ``root``, with headroom
    (as the mkfs-based importer sized it)."""
    blocks, inodes = measure(root)
    inodes = inodes + inodes // 8 + 64
    blocks = blocks + blocks // 16
    itable = -(-inodes * INODE_SIZE // BLOCK)
    groups = -(-(blocks + itable) // 32768)
    total = blocks + itable + groups * 8 + 64
    return vhd.round_to_geometry(max(total * BLOCK, 2 << 20)), inodes


def floor_seconds(layer: testimages.Layer, work: Path) -> float:
    """``mkfs.ext4 -d`` of the layer's tree (unpacked beforehand, not timed)."""
    tree = work / "tree"
    tree.mkdir()
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
        tf.extractall(tree, filter="fully_trusted")
    size, inodes = fs_bytes(tree)
    img = work / "floor.img"
    with open(img, "wb") as f:
        f.truncate(size)
    os.sync()  # the unpacked tree's writeback would disturb the timing
    t0 = time.perf_counter()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I",
                    str(INODE_SIZE), "-N", str(inodes), "-m", "0", "-O",
                    "^has_journal,^resize_inode", "-E", "lazy_itable_init=0", "-d", tree, img],
                   check=True)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(tree)
    img.unlink()
    return elapsed


def disk_used(root: Path) -> int:
    """Bytes of disk the files under ``root`` take."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def import_seconds(layer: testimages.Layer, work: Path, compression: str, verity: bool = True,
                   *, watch_disk: bool = False) -> tuple[float, float, float]:
    """Time a full import; also the unpack part (until the last blob byte was read), and, with
    ``watch_disk``, the peak disk use of the store during the import over the final layer's
    (1.0 without: the sampling thread walks the store every 10 ms, which costs the import
    time, so timed runs go without it)."""
    img = work / f"img-{compression}"
    testimages.write_oci_layout(img, [layer], compression=compression)
    store = ImageStore(work / f"store-{compression}")
    last_byte = [0.0]
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], disk_used(store.root))

    def progress(ev: ImportEvent) -> None:
        if ev.kind == "layer-bytes":
            last_byte[0] = time.perf_counter()

    sampler = threading.Thread(target=sample)
    os.sync()  # the layout's writeback would disturb the timing
    if watch_disk:
        sampler.start()
    t0 = time.perf_counter()
    try:
        rec = asyncio.run(import_image(img, store=store, progress=progress, verity=verity))
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        if watch_disk:
            sampler.join()
    final = sum((d / "layer.vhd").stat().st_blocks * 512 for d in rec.layer_dirs)
    shutil.rmtree(img)
    shutil.rmtree(store.root)
    return elapsed, last_byte[0] - t0, max(peak[0], final) / final


Variant = tuple[str, bool]  # (compression, verity)


def interleaved(layer: testimages.Layer, work: Path, variants: list[Variant], rounds: int,
                on_round: Callable[[int], None] | None = None
                ) -> tuple[list[float], dict[Variant, list[float]], dict[Variant, list[float]],
                           list[float]]:
    """``rounds`` rounds of the floor, then each variant's import: the floor's times, each
    variant's import and unpack times, and the peak-disk ratios (from one more, untimed,
    import of each variant).

    Interleaved, so that host noise hits all variants alike; the order rotates, so that the one
    right after the floor (which leaves a tree to delete and an image to discard) is not always
    the same.
    """
    floor: list[float] = []
    imp: dict[Variant, list[float]] = {v: [] for v in variants}
    unpack: dict[Variant, list[float]] = {v: [] for v in variants}
    peaks: list[float] = []
    for r in range(rounds):
        if on_round is not None:
            on_round(r)
        floor.append(floor_seconds(layer, work))
        for comp, verity in variants[r % len(variants):] + variants[:r % len(variants)]:
            total, part, _ = import_seconds(layer, work, comp, verity)
            imp[comp, verity].append(total)
            unpack[comp, verity].append(part)
    for comp, verity in variants:
        peaks.append(import_seconds(layer, work, comp, verity, watch_disk=True)[2])
    return floor, imp, unpack, peaks


def rootfs_layer(rootfs: Path) -> testimages.Layer:
    """A layer of the directory tree ``rootfs`` (GNU tar, PAX format, xattrs, numeric ids)."""
    tar = subprocess.run(["tar", "--format=pax", "--numeric-owner", "--xattrs",
                          "--xattrs-include=*", "--sort=name", "-C", rootfs, "-cf", "-", "."],
                         capture_output=True, check=True).stdout
    return testimages.Layer(tar)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="layer size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None,
                    help="work directory: store and staging (default: $TMPDIR or /tmp)")
    ap.add_argument("--rootfs", type=Path, default=None,
                    help="import a tar of this tree (e.g. a debootstrap) instead of the "
                         "synthetic layer")
    ap.add_argument("--debian", action="store_true",
                    help="import the Debian bookworm minbase layer of tests/debian.py (built "
                         "with debootstrap, cached for the day)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    if args.debian:
        import debian

        layer = testimages.Layer(debian.layer_tar(debian.debian_image()).read_bytes())
    elif args.rootfs:
        layer = rootfs_layer(args.rootfs)
    else:
        layer = make_layer(args.mb << 20)
    mb = len(layer.tar) / 1e6
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
        entries = len(tf.getmembers())
    print(f"layer: {mb:.1f} MB tar, {len(layer.gz) / 1e6:.1f} MB gzip, {entries} entries; "
          f"work dir on {args.dir or tempfile.gettempdir()}")
    with tempfile.TemporaryDirectory(prefix="bench-image-", dir=args.dir) as tmp:
        work = Path(tmp)
        variants = [(comp, verity) for comp in ("gzip", "none") for verity in (True, False)]
        floor, imp, unpack, peaks = interleaved(layer, work, variants, args.repeat)
    f = statistics.median(floor)
    print(f"{'floor: mkfs.ext4 -d':32} {mb / f:8.1f} MB/s  ({f:.2f} s)")
    imports: list[dict[str, object]] = []
    results: dict[str, object] = {"layer_mb": round(mb, 2), "entries": entries,
                                  "floor_mb_s": round(mb / f, 1), "imports": imports}
    for comp, verity in variants:
        t = statistics.median(imp[comp, verity])
        u = statistics.median(unpack[comp, verity])
        label = f"import, {comp} layer, " + ("verity" if verity else "no verity")
        print(f"{label:32} {mb / t:8.1f} MB/s  ({t:.2f} s, unpack {u:.2f} s)  "
              f"import/floor throughput = {f / t:.2f}")
        imports.append({"compression": comp, "verity": verity, "mb_s": round(mb / t, 1),
                        "seconds": round(t, 3), "vs_floor": round(f / t, 3)})
    print(f"peak disk during import / final layer disk: {max(peaks):.3f}")
    results["peak_disk_ratio"] = round(max(peaks), 3)
    if args.json:
        print(json.dumps(results))
    os.sync()


if __name__ == "__main__":
    main()
