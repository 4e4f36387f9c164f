"""An imported image runs in a real UVM, and the overlay shows the right tree (issues #4, #5)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import testimages
from uvmshim import hostpath
from uvmshim.runtime.leaks import find_holdings

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("form", ["oci", "docker-archive"])
def test_imported_image_runs_with_the_right_tree(tmp_path: Path, form: str) -> None:
    forms = testimages.build_all(tmp_path / "src")
    env = {**os.environ, "UVMSHIM_IMAGE_ROOT": str(tmp_path / "store"),
           "UVMSHIM_VM_DIR": str(tmp_path / "vms")}

    def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["uvmshim", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    imported = uvmshim("image", "import", str(forms[form]), "--name", "test")
    assert imported.returncode == 0, imported.stderr
    # The image's entrypoint is ["/bin/sh", "-c"]: the arguments replace its cmd, as in docker.
    res = uvmshim("run", "--image", "test", "--", testimages.CONTAINER_CHECK)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("overlay-ok")
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []
    scratch = hostpath.scratch_dir()
    assert not scratch.exists() or not any(scratch.iterdir())
