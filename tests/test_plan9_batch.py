"""Bind mounts in batches (issue 15, point 9): a run of binds is one host round and one guest
request, with hcsshim's names, guest paths and newest-first release, and all-or-nothing.

The simulated UVM records a batch as its per-share operations, in the order a real UVM does
them (every host step, then every guest step; releasing: every guest step, then every host
step, newest first). One test runs a batch in a real UVM.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from uvmshim.allocator import create_container_resources
from uvmshim.errors import ReleaseError, UvmshimError
from uvmshim.spec import Spec
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles, make_spec, run


def _binds(host: HostFiles, n: int, *, ro: bool = True) -> list[dict[str, Any]]:
    return [{"destination": f"/b{i}", "type": "bind", "source": host.dir(f"d{i}"),
             "options": ["rbind", "ro"] if ro else ["rbind"]} for i in range(n)]


def _ops(backend: Any) -> list[tuple[str, str]]:
    return [(o.op, str(o.args.get("name", o.args.get("path", ""))))
            for o in backend.operations]


def test_a_run_of_binds_is_one_batch_named_and_released_like_hcsshim(host: HostFiles) -> None:
    spec = make_spec(root_path=host.dir("root"), mounts=_binds(host, 3))
    vm, backend = simulated_uvm()
    alloc = run(create_container_resources(spec, vm, "C1"))
    assert [m.source for m in alloc.spec.mounts] == [
        f"/run/gcs/c/C1/mounts/m{i}" for i in range(3)]
    assert _ops(backend) == [
        ("plan9-add", "0"), ("mount-plan9", "0"),  # the root share: on its own
        ("plan9-add", "1"), ("plan9-add", "2"), ("plan9-add", "3"),  # one host round
        ("mount-plan9", "1"), ("mount-plan9", "2"), ("mount-plan9", "3"),  # one request
    ]
    assert all(o.args["read_only"] for o in backend.operations[2:])
    backend.operations.clear()
    run(alloc.resources.release())
    assert _ops(backend) == [
        ("unmount-plan9", "3"), ("unmount-plan9", "2"), ("unmount-plan9", "1"),
        ("plan9-remove", "3"), ("plan9-remove", "2"), ("plan9-remove", "1"),
        ("unmount-plan9", "0"), ("plan9-remove", "0"),
    ]
    assert backend.live() == {}


def test_a_disk_between_binds_keeps_the_spec_order(host: HostFiles, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    mounts = _binds(host, 3)
    mounts.insert(1, {"destination": "/disk", "type": "virtual-disk", "source": str(disk)})
    vm, backend = simulated_uvm()
    alloc = run(create_container_resources(
        make_spec(root_path=host.dir("root"), mounts=mounts), vm, "C1"))
    kinds = [r.describe()["kind"] for r in alloc.resources]
    assert kinds == ["plan9", "plan9", "scsi", "plan9", "plan9"]
    run(alloc.resources.release())
    assert backend.live() == {}


@pytest.mark.parametrize("fail", [3, 4, 6])  # the first host add, the second, a guest mount
def test_a_failed_batch_leaves_nothing(host: HostFiles, fail: int) -> None:
    spec = make_spec(root_path=host.dir("root"), mounts=_binds(host, 3))
    vm, backend = simulated_uvm(fail_at=[fail])
    with pytest.raises(UvmshimError, match="injected failure") as info:
        run(create_container_resources(spec, vm, "C1"))
    assert backend.live() == {}
    assert vm.plan9.shares() == []
    if fail in (3, 4):  # the host names the bind that failed
        assert info.value.where == f"mounts[{fail - 3}]"
        assert f"/b{fail - 3}" in str(info.value)


def test_a_failed_release_in_a_batch_keeps_only_that_share(host: HostFiles) -> None:
    spec = make_spec(root_path=host.dir("root"), mounts=_binds(host, 3))
    vm, backend = simulated_uvm()
    alloc = run(create_container_resources(spec, vm, "C1"))
    backend.fail_at(len(backend.operations) + 2)  # the guest step of share 2
    with pytest.raises(ReleaseError) as info:
        run(alloc.resources.release())
    assert "failed to remove plan9 share 2 from sim-uvm" in str(info.value.errors[0])
    assert list(backend.shares) == ["2"] and [s["name"] for s in vm.plan9.shares()] == ["2"]
    run(alloc.resources.release())  # the retry releases exactly that one
    assert backend.live() == {} and len(alloc.resources) == 0


def test_writable_binds_denied_name_the_mount(host: HostFiles) -> None:
    from uvmshim.uvm.options import UvmOptions

    vm, backend = simulated_uvm(UvmOptions(no_writable_file_shares=True))
    spec = make_spec(mounts=[*_binds(host, 1), *_binds(host, 2, ro=False)[1:]],
                     extra={"root": {"path": host.dir("root"), "readonly": True}})
    with pytest.raises(UvmshimError, match="writable shares is denied") as info:
        run(create_container_resources(spec, vm, "C1"))
    assert info.value.where == "mounts[1]"
    assert backend.live() == {}


@pytest.mark.vm
def test_a_batch_in_a_real_uvm(tmp_path: Path) -> None:
    """50 binds (directories, one file, read-only and writable) in one batch: the guest sees
    each share's content at its path, read-only ones are read-only, and release leaves
    neither links in the guest nor binds on the host."""
    from uvmshim.runtime.vm import start_uvm
    from uvmshim.uvm.qemu import mounts as host_mounts

    root = tmp_path / "root"
    root.mkdir()
    specs: list[dict[str, Any]] = []
    for i in range(50):
        d = tmp_path / f"d{i}"
        d.mkdir()
        (d / "f").write_text(f"{i}\n")
        specs.append({"destination": f"/b{i}", "type": "bind", "source": str(d),
                      "options": ["rbind", "ro"] if i % 2 else ["rbind"]})
    (tmp_path / "one").write_text("file\n")
    specs.append({"destination": "/one", "type": "bind", "source": str(tmp_path / "one"),
                  "options": ["bind", "ro"]})
    spec = Spec.from_json({"ociVersion": "1.1.0", "process": {"args": ["true"]},
                           "root": {"path": str(root)}, "linux": {}, "mounts": specs})

    async def main() -> None:
        async with start_uvm(memory_mb=256, cpus=1) as uvm:
            alloc = await create_container_resources(spec, uvm.vm, "batch1")
            paths = [m.source for m in alloc.spec.mounts]
            script = "; ".join(
                [f"cat {p}/f" for p in paths[:50]] + [f"cat {paths[50]}",
                 f"touch {paths[0]}/w && echo rw-ok", f"touch {paths[1]}/w || echo ro-ok"])
            res = await uvm.agent.exec(["sh", "-c", script], timeout=60)
            out = res.stdout.decode()
            assert out.split("\n")[:51] == [str(i) for i in range(50)] + ["file"], out
            assert "rw-ok" in out and "ro-ok" in out
            assert (tmp_path / "d0" / "w").exists() and not (tmp_path / "d1" / "w").exists()
            state_dir = uvm.machine.state_dir
            assert len(host_mounts.mounts_under(state_dir)) >= 51
            await alloc.resources.release()
            res = await uvm.agent.exec(["sh", "-c", "ls /run/gcs/c/batch1/mounts | wc -l"])
            assert res.stdout.decode().strip() == "0"
            share_dir = str(uvm.machine.paths.share_dir) + "/"
            left = [m.mount_point for m in host_mounts.mounts_under(state_dir)
                    if m.mount_point.startswith(share_dir)]
            assert left == [], left

    asyncio.run(main())
