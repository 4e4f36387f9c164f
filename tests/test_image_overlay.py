"""The imported layer disks under a real kernel overlay, on the host (as root: it mounts).

Each ``layer.vhd`` is attached read-only to a loop
device limited to the disk's size (the VHD footer excluded), mounted ``ro,noload`` as the guest
does, stacked with a tmpfs upper, and :data:`testimages.CONTAINER_CHECK` runs
chrooted in it. Everything is unmounted and detached again, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import testimages
from uvmshim.image import ImageStore, import_image

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("losetup") or not os.path.exists(testimages.BUSYBOX),
    reason="mounts loop devices: needs root, losetup and busybox-static")


def sh(*argv: str | Path) -> str:
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def mounted(tmp: Path, layer_dirs: list[Path]) -> Iterator[Path]:
    """The overlay of ``layer_dirs`` (top-most first) with a tmpfs upper, at ``tmp/root``."""
    loops: list[str] = []
    mounts: list[Path] = []
    try:
        lowers = []
        for i, d in enumerate(layer_dirs):
            vhd = d / "layer.vhd"
            loops.append(sh("losetup", "-r", "-f", "--show", "--sizelimit",
                            str(vhd.stat().st_size - 512), vhd))
            mnt = tmp / f"l{i}"
            mnt.mkdir()
            sh("mount", "-t", "ext4", "-o", "ro,noload", loops[-1], mnt)
            mounts.append(mnt)
            lowers.append(os.fspath(mnt))
        rw, root = tmp / "rw", tmp / "root"
        rw.mkdir()
        root.mkdir()
        sh("mount", "-t", "tmpfs", "tmpfs", rw)
        mounts.append(rw)
        (rw / "u").mkdir()
        (rw / "w").mkdir()
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={':'.join(lowers)},upperdir={rw}/u,workdir={rw}/w", root)
        mounts.append(root)
        yield root
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", m], check=False)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def test_container_check_passes_on_the_overlay(tmp_path: Path) -> None:
    images = testimages.build_all(tmp_path / "img")
    rec = asyncio.run(import_image(images["docker-archive"],
                                   store=ImageStore(tmp_path / "store")))
    with mounted(tmp_path, list(reversed(rec.layer_dirs))) as root:
        (root / "check.sh").write_text(testimages.CONTAINER_CHECK)
        res = subprocess.run(["chroot", root, "/bin/sh", "/check.sh"], capture_output=True,
                             text=True)
    assert res.returncode == 0 and "overlay-ok" in res.stdout, res.stdout + res.stderr
