"""Property tests: random specs on the simulated UVM (hypothesis)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uvmshim.allocator import create_container_resources
from uvmshim.errors import UvmshimError
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles, make_spec, run

MOUNT_KINDS = ["dir", "file", "disk", "pdisk", "sandbox", "hugepages", "tmpfs", "missing"]

FIXTURE_OK = [HealthCheck.function_scoped_fixture]

mount_strategy = st.tuples(st.sampled_from(MOUNT_KINDS), st.integers(0, 3), st.booleans())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> HostFiles:
    h = HostFiles(tmp_path_factory.mktemp("prop"))
    for i in range(4):
        h.dir(f"dir{i}")
        h.file(f"files/f{i}")
        h.disk(f"disks/d{i}")
        h.disk(f"pdisks/p{i}")
        h.layer(f"layer{i}")
    h.scratch()
    return h


def build(files: HostFiles, kinds: list[tuple[str, int, bool]], layers: int,
          plan9_root: bool) -> Any:
    root = files.root
    mounts: list[dict[str, Any]] = []
    for n, (kind, k, ro) in enumerate(kinds):
        opts = ["rbind", "ro"] if ro else ["rbind"]
        dest = f"/m{n}"
        if kind == "dir":
            mounts.append({"destination": dest, "type": "bind", "source": f"{root}/dir{k}",
                           "options": opts})
        elif kind == "file":
            mounts.append({"destination": dest, "type": "bind",
                           "source": f"{root}/files/f{k}", "options": opts})
        elif kind == "disk":
            # one disk, one read-only setting, so that reuse is legal
            mounts.append({"destination": dest, "type": "virtual-disk",
                           "source": f"{root}/disks/d{k}",
                           "options": ["ro"] if k % 2 else []})
        elif kind == "pdisk":
            mounts.append({"destination": dest, "type": "physical-disk",
                           "source": f"{root}/pdisks/p{k}"})
        elif kind == "sandbox":
            mounts.append({"destination": dest, "type": "bind", "source": f"sandbox:///s{k}"})
        elif kind == "hugepages":
            mounts.append({"destination": dest, "type": "bind",
                           "source": f"hugepages://2M/h{k}"})
        elif kind == "tmpfs":
            mounts.append({"destination": dest, "type": "tmpfs", "source": "tmpfs"})
        else:
            mounts.append({"destination": dest, "type": "bind", "source": f"{root}/nope{k}"})
    if plan9_root:
        return make_spec(root_path=f"{root}/dir0", mounts=mounts)
    folders = [f"{root}/layer{i}" for i in range(layers)] + [f"{root}/scratch"]
    return make_spec(layers=folders, mounts=mounts)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(kinds=st.lists(mount_strategy, max_size=12), layers=st.integers(0, 4),
       plan9_root=st.booleans(), controllers=st.integers(1, 4), vpmem=st.integers(0, 2))
def test_allocate_then_release_leaves_nothing(files: HostFiles, kinds: list[tuple[str, int, bool]],
                                              layers: int, plan9_root: bool, controllers: int,
                                              vpmem: int) -> None:
    spec = build(files, kinds, layers, plan9_root)
    before = spec.to_json()
    vm, backend = simulated_uvm(UvmOptions(scsi_controllers=controllers, vpmem_count=vpmem))
    try:
        a = run(create_container_resources(spec, vm, "C1"))
    except UvmshimError:
        assert any(k == "missing" for k, _, _ in kinds)
        assert backend.live() == {}
        assert spec.to_json() == before
        return
    assert not any(k == "missing" for k, _, _ in kinds)

    # No two live attachments share a slot, and the backend agrees with the manager.
    slots = [(d["controller"], d["lun"]) for d in vm.scsi.attachments()]
    assert len(slots) == len(set(slots)) == len(backend.disks)
    # Every rewritten bind source lies under the container root; every disk under /run/mounts/.
    for before_m, after_m in zip(spec.mounts, a.spec.mounts, strict=True):
        if before_m.type == "bind" and not before_m.source.startswith(("sandbox://",
                                                                       "hugepages://")):
            assert after_m.source.startswith("/run/gcs/c/C1/mounts/m")
        elif before_m.type in ("virtual-disk", "physical-disk"):
            assert after_m.source.startswith("/run/mounts/m") and after_m.type == "none"
        else:
            assert after_m == before_m
    assert spec.to_json() == before

    run(a.resources.release())
    assert backend.live() == {}
    assert vm.inventory() == {"scsi": [], "plan9": [], "vpmem": [], "vpci": []}


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(n=st.integers(1, 6), kinds=st.lists(mount_strategy, max_size=6))
def test_many_containers_in_one_uvm_share_disks_and_release_cleanly(
        files: HostFiles, n: int, kinds: list[tuple[str, int, bool]]) -> None:
    kinds = [k for k in kinds if k[0] != "missing"]
    vm, backend = simulated_uvm()
    allocations = [run(create_container_resources(build(files, kinds, 1, False), vm, f"C{i}"))
                   for i in range(n)]
    disk_paths = {m.source for m in build(files, kinds, 1, False).mounts
                  if m.type in ("virtual-disk", "physical-disk")}
    layer_and_scratch = 2 if n else 0
    # A disk used by several containers is attached once; the scratch is shared too.
    assert len(backend.disks) == len(disk_paths) + layer_and_scratch
    roots = {a.spec.root.path for a in allocations if a.spec.root is not None}
    assert len(roots) == n
    for a in reversed(allocations):
        run(a.resources.release())
    assert backend.live() == {}


def test_counter_paths_are_unique(tmp_path: Path) -> None:
    h = HostFiles(tmp_path)
    vm, _ = simulated_uvm()
    spec = make_spec(layers=[h.layer("a"), h.scratch()], mounts=[
        {"destination": f"/d{i}", "type": "virtual-disk", "source": h.disk(f"d{i}")}
        for i in range(5)])
    a = run(create_container_resources(spec, vm, "C1"))
    sources = [m.source for m in a.spec.mounts]
    assert sources == [f"/run/mounts/m{i}" for i in itertools.islice(itertools.count(2), 5)]
