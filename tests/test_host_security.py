"""The host against a hostile guest and hostile images, through ``uvmshim run`` (issue #14).

* A qcow2 image that names a host file as its backing file or external data file is refused
  with a clear error before QEMU sees it (exit status 1, no traceback, nothing left behind).
* A container cannot plant a symlink in a writable share: afterwards no path in the shared
  directory resolves outside it.

The QMP-level checks (QEMU cannot open host files even when asked directly, descriptors only,
allowed chains) are in ``test_qemu_machine.py``; header parsing in ``test_qemu_host.py``.
Needs root, QEMU, qemu-img and the UVM boot files (built on first use).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from uvmshim.runtime.leaks import find_holdings

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img"),
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("rootfs") / "r"
    subprocess.run([str(ROOT / "examples" / "make-rootfs.sh"), str(path)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return str(path)


def _uvmshim_run(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["uvmshim", "run", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "UVMSHIM_VM_DIR": str(base)},
    )  # fmt: skip


def _nothing_left(base: Path) -> None:
    held = find_holdings(base)
    assert held.vms == [] and held.qemu_pids == [] and held.mounts == [], held.as_dict()


def _crafted_images(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The issue's reproductions: a qcow2 over ``/etc/shadow`` and one whose data file is a
    root-only host file; returns (backed, with_data, the data file)."""
    src = tmp_path / "q"
    src.mkdir()
    (src / "hello").write_text("hi\n")
    ext = tmp_path / "e.img"
    subprocess.run(["mkfs.ext4", "-q", "-b", "1024", "-d", str(src), str(ext), "4M"], check=True)
    backed = tmp_path / "l.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=512", "-S", "512",
                    str(ext), str(backed)], check=True)  # fmt: skip
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", "/etc/shadow", str(backed)],
                   check=True)  # fmt: skip
    victim = tmp_path / "root-only.raw"
    victim.write_bytes(b"ROOT ONLY\n" + b"\0" * (4 << 20))
    victim.chmod(0o600)
    with_data = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={victim}",
                    str(with_data), "4M"], check=True)  # fmt: skip
    return backed, with_data, victim


def test_cli_refuses_images_that_name_host_files(rootfs: str, tmp_path: Path) -> None:
    backed, with_data, victim = _crafted_images(tmp_path)
    before = victim.read_bytes()
    cases = [
        (backed, ":ro", "is a qcow2 overlay on the backing file '/etc/shadow'"),
        (with_data, "", f"keeps its data in the external data file '{victim}'"),
    ]
    for img, mode, message in cases:
        base = tmp_path / f"vms-{img.stem}"
        res = _uvmshim_run(base, "--rootfs", rootfs, "--disk", f"{img}:/d{mode}", "--",
                           "sh", "-c", "head -c 99 /d/hello; echo written > /d/x")  # fmt: skip
        assert res.returncode == 1, res.stdout + res.stderr
        assert res.stderr.startswith("uvmshim: error: "), res.stderr
        assert message in res.stderr and str(img) in res.stderr
        assert "hint: make it self-contained (qemu-img convert -O qcow2" in res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
        _nothing_left(base)
    assert victim.read_bytes() == before


def test_container_cannot_plant_symlinks_in_a_writable_share(rootfs: str, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "data.txt").write_text("host data\n")
    base = tmp_path / "vms"
    script = (
        "for t in /etc/shadow ../../../.. data.txt /; do"
        "  ln -s $t /share/x 2>&1; echo rc=$?;"
        "  ln -s $t /share/sub/y 2>&1; echo rc=$?;"
        "done;"
        "cat /share/data.txt; echo guest > /share/sub/new.txt; echo rc=$?"
    )
    res = _uvmshim_run(base, "--rootfs", rootfs, "-v", f"{shared}:/share", "--",
                       "sh", "-c", script)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines.count("rc=1") == 8, res.stdout  # every ln -s failed ...
    assert lines.count("rc=0") == 1 and "host data" in lines  # ... the share itself works
    assert "Operation not permitted" in res.stdout
    assert (shared / "sub" / "new.txt").read_text() == "guest\n"
    # No path in the shared directory leads out of it, whatever a host tool follows.
    real_root = os.path.realpath(shared)
    for path in [shared, *shared.rglob("*")]:
        assert not path.is_symlink(), path
        resolved = os.path.realpath(path)
        assert resolved == real_root or resolved.startswith(real_root + "/"), path
    _nothing_left(base)
