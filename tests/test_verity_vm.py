"""dm-verity layers in a real UVM: a layer changed on the host cannot be read in the guest.

The image has the busybox base layer and a top layer holding ``/data/canary`` (a few blocks of
a recognisable text) and ``/data/other``. After the import one byte of the canary's data is
flipped in the top layer's ``layer.vhd``: reading ``/data/other`` (another block) still works,
reading ``/data/canary`` fails with an I/O error in the container, and ``uvmshim run`` exits
non-zero naming dm-verity and the layer. Then a byte of the ext4 superblock is flipped: the
guest refuses to mount the layer at all, and the error says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import testimages
from uvmshim.runtime.leaks import find_holdings

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(not os.path.exists(testimages.BUSYBOX), reason="no busybox")]

#: 13 000 bytes (four blocks), no line twice: the test finds its blocks in the disk.
CANARY = b"".join(b"canary line %05d\n" % i for i in range(1000))


def top_layer() -> testimages.Layer:
    t = testimages.TarBuilder()
    t.dir("data")
    t.add("data/canary", data=CANARY)
    t.add("data/other", data=b"untouched\n")
    return t.close()


def veritysetup_verify(layer_dir: Path) -> subprocess.CompletedProcess[str]:
    v = json.loads((layer_dir / "verity.json").read_text())
    vhd = layer_dir / "layer.vhd"
    return subprocess.run(
        ["veritysetup", "verify", vhd, vhd, v["root_hash"], f"--hash-offset={v['hash_offset']}"],
        capture_output=True, text=True)


def test_changed_layer_is_refused_in_the_guest(tmp_path: Path) -> None:
    testimages.write_oci_layout(tmp_path / "img", [testimages.base_layer(), top_layer()])
    env = {**os.environ, "UVMSHIM_IMAGE_ROOT": str(tmp_path / "store"),
           "UVMSHIM_VM_DIR": str(tmp_path / "vms")}

    def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["uvmshim", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    res = uvmshim("image", "import", str(tmp_path / "img"), "--name", "vt")
    assert res.returncode == 0, res.stderr
    dirs = json.loads(uvmshim("image", "ls", "--json").stdout)[0]
    top = tmp_path / "store" / "layers" / dirs["diff_ids"][-1].replace(":", "/")
    if shutil.which("veritysetup"):
        assert veritysetup_verify(top).returncode == 0

    script = "cat /data/other && wc -c < /data/canary"
    res = uvmshim("run", "--image", "vt", "--", script)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == ["untouched", str(len(CANARY))]

    # Flip one byte in the middle of the canary's second block, on the host.
    vhd = top / "layer.vhd"
    raw = bytearray(vhd.read_bytes())
    at = raw.find(CANARY[:4096]) + 4096 + 100
    assert at > 4096 + 100 and raw.count(CANARY[:4096]) == 1
    with open(vhd, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[at] ^ 0x01]))
    if shutil.which("veritysetup"):
        assert veritysetup_verify(top).returncode != 0

    res = uvmshim("run", "--image", "vt", "--", script)
    assert res.returncode != 0, res.stdout + res.stderr
    assert res.stdout.split()[:1] == ["untouched"]  # other blocks still read
    assert "I/O error" in res.stderr or "Input/output error" in res.stderr, res.stderr
    assert "dm-verity" in res.stderr and str(vhd) in res.stderr, res.stderr
    assert "data block" in res.stderr  # the kernel's word on which block

    # A changed superblock: the guest cannot even mount the layer, and says why.
    with open(vhd, "r+b") as f:
        f.seek(1024 + 0x20)  # s_blocks_per_group
        b = f.read(1)
        f.seek(1024 + 0x20)
        f.write(bytes([b[0] ^ 0x01]))
    res = uvmshim("run", "--image", "vt", "--", "true")
    assert res.returncode != 0
    assert "failed dm-verity verification" in res.stderr and str(vhd) in res.stderr, res.stderr
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []
