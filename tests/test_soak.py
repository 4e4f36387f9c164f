"""Soak, shortened (issue 15, point 6): 50 container lives in one UVM leave no growth in open
descriptors or mounts (host, QEMU, guest) and no creeping memory use in the guest or in this
process. QEMU's RSS is printed, not checked: under TCG it grows until the translation cache is
full (see ``bench/soak.py``). ``bench/soak.py`` runs the full soak (500 lives, then 100 cold
runs through the runc CLI) on demand."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

import soak


@pytest.mark.vm
def test_50_container_lives_in_one_uvm_grow_nothing(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    subprocess.run([str(Path(__file__).parent.parent / "examples" / "make-rootfs.sh"),
                    str(rootfs)], check=True, stdout=subprocess.DEVNULL)
    data = tmp_path / "data"
    data.mkdir()
    lines: list[str] = []
    samples = asyncio.run(soak.soak_in_one_uvm(rootfs, data, 50, 10, report=lines.append))
    print("\n".join(lines))
    assert (data / "out").read_text() == "ok\n"
    # From the first sample after warm-up (10 lives) to the last (50): flat.
    for field in ("host_fds", "host_mounts", "qemu_fds", "guest_mounts"):
        assert soak.growth(samples, field) == 0, (field, lines)
    assert soak.growth(samples, "host_rss_kb") < 16 * 1024, lines
    assert soak.growth(samples, "guest_free_kb") > -32 * 1024, lines
