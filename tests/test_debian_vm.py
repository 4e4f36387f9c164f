"""A real-world image in a real UVM: Debian bookworm minbase (see ``tests/debian.py``).

The image is built with debootstrap (from the mirror apt uses here) at most once a day and
cached; it is imported with dm-verity (the default) and one container runs ``apt-get
--version`` and a Python one-liner in it. minbase has no Python: the image includes
``python3-minimal``, which is enough for ``python3 -c``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import debian
from uvmshim.runtime.leaks import find_holdings

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("debootstrap"),
                                 reason="needs root and debootstrap")]

ONE_LINER = ("import platform, sys; "
             "print('python', platform.python_version(), sys.implementation.name)")


def test_debian_minbase_runs_apt_and_python(tmp_path: Path) -> None:
    layout = debian.debian_image()
    env = {**os.environ, "UVMSHIM_IMAGE_ROOT": str(tmp_path / "store"),
           "UVMSHIM_VM_DIR": str(tmp_path / "vms")}

    def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["uvmshim", *args], capture_output=True, text=True, env=env,
                              timeout=600)

    res = uvmshim("image", "import", str(layout), "--name", "debian")
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "store").rglob("verity.json"))
    res = uvmshim("run", "--image", "debian", "--", "sh", "-c",
                  f"apt-get --version | head -n 1 && python3 -c \"{ONE_LINER}\" && "
                  "cat /etc/debian_version")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("apt 2.6."), lines
    assert lines[1].startswith("python 3.11.") and lines[1].endswith(" cpython"), lines
    assert lines[2].startswith("12."), lines
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []
