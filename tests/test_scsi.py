"""SCSI manager (hcsshim's ``AddSCSI``/``RemoveSCSI``): slots, refcounts, reuse, conflicts,
attach-only, failed detach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import uvmshim
from uvmshim.errors import ConflictingAttachment, NoAvailableLocation, UvmError, UvmshimError
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.scsi import ScsiMount
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles, run


def test_first_free_slot_controller_then_lun(host: HostFiles) -> None:
    async def go() -> None:
        vm, _backend = simulated_uvm(UvmOptions(scsi_controllers=2))
        mounts = [await vm.add_scsi(host.disk(f"d{i}"), f"/m{i}", read_only=False)
                  for i in range(66)]
        assert [(m.controller, m.lun) for m in mounts[:2]] == [(0, 0), (0, 1)]
        assert (mounts[63].controller, mounts[63].lun) == (0, 63)
        assert (mounts[64].controller, mounts[64].lun) == (1, 0)
        await mounts[1].release()
        again = await vm.add_scsi(host.disk("again"), "/again", read_only=True)
        assert (again.controller, again.lun) == (0, 1)  # the hole is reused first
    run(go())


@pytest.mark.parametrize(("controllers", "capacity"), [(1, 64), (4, 256)])
def test_no_available_location(host: HostFiles, controllers: int, capacity: int) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm(UvmOptions(scsi_controllers=controllers))
        for i in range(capacity):
            await vm.add_scsi(host.disk(f"d{i}"), "", read_only=True)
        with pytest.raises(NoAvailableLocation, match="no available location"):
            await vm.add_scsi(host.disk("one-too-many"), "", read_only=True)
        assert len(backend.disks) == capacity
    run(go())


def test_default_is_four_controllers() -> None:
    vm, _ = simulated_uvm()
    assert vm.scsi.controllers == 4
    assert simulated_uvm(UvmOptions(vpmem_count=4))[0].scsi.controllers == 1


def test_controller_limits() -> None:
    with pytest.raises(UvmError, match="SCSI controller count can't be more than 4"):
        UvmOptions(scsi_controllers=5)


def test_refcount_by_resolved_path_and_reuse_returns_first_guest_path(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        disk = host.disk("d.vhdx")
        link = os.path.join(os.path.dirname(disk), "link.vhdx")
        os.symlink(disk, link)
        a = await vm.add_scsi(disk, "/run/mounts/m1", read_only=False)
        b = await vm.add_scsi(link, "/run/mounts/m2", read_only=False)
        assert b.guest_path == "/run/mounts/m1"
        assert (b.controller, b.lun) == (a.controller, a.lun)
        assert [op.op for op in backend.operations] == ["scsi-attach", "mount-scsi"]
        await a.release()
        assert backend.disks  # still referenced by b
        await a.release()  # a second release of the same handle is a no-op
        assert backend.disks
        await b.release()
        assert backend.live() == {}
        assert vm.scsi.attachments() == []
    run(go())


def test_conflicting_read_only_is_an_error(host: HostFiles) -> None:
    async def go() -> None:
        vm, _ = simulated_uvm()
        disk = host.disk("d.vhdx")
        await vm.add_scsi(disk, "/m1", read_only=True)
        with pytest.raises(ConflictingAttachment, match="already attached read-only at "
                                                        "controller 0, LUN 0"):
            await vm.add_scsi(disk, "/m2", read_only=False)
        assert vm.scsi.attachments()[0]["refcount"] == 1
    run(go())


def test_conflicting_options_is_an_error(host: HostFiles) -> None:
    async def go() -> None:
        vm, _ = simulated_uvm()
        disk = host.disk("d.vhdx")
        await vm.add_scsi(disk, "/m1", read_only=False, options=("noexec",))
        with pytest.raises(ConflictingAttachment, match="cannot also be mounted with"):
            await vm.add_scsi(disk, "/m2", read_only=False, options=("exec",))
        same = await vm.add_scsi(disk, "/m3", read_only=False, options=("noexec", "noexec"))
        assert same.guest_path == "/m1"
    run(go())


def test_physical_and_virtual_of_one_path_conflict(host: HostFiles) -> None:
    async def go() -> None:
        vm, _ = simulated_uvm()
        disk = host.disk("dev")
        await vm.add_scsi_physical_disk(disk, "/m1", read_only=False)
        with pytest.raises(ConflictingAttachment, match="pass-through"):
            await vm.add_scsi(disk, "/m2", read_only=False)
    run(go())


def test_attach_only_then_mount(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        disk = host.disk("d")
        a = await vm.add_scsi(disk, "", read_only=True)
        assert a.guest_path == ""
        assert [op.op for op in backend.operations] == ["scsi-attach"]
        b = await vm.add_scsi(disk, "/later", read_only=True)
        assert b.guest_path == "/later" and "/later" in backend.mounts
        await b.release()
        await a.release()
        ops = [op.op for op in backend.operations]
        assert ops == ["scsi-attach", "mount-scsi", "unmount-scsi", "scsi-detach"]
        assert backend.live() == {}
    run(go())


def test_attach_only_release_still_ejects_in_guest(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        a = await vm.add_scsi(host.disk("d"), "", read_only=False)
        await a.release()
        assert [op.op for op in backend.operations] == [
            "scsi-attach", "unmount-scsi", "scsi-detach"]
        assert backend.operations[1].args["path"] == ""
    run(go())


def test_missing_file(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        with pytest.raises(UvmError, match=r"stat .*/nope.vhdx: no such file or directory"):
            await vm.add_scsi(str(host.root / "nope.vhdx"), "/m", read_only=True)
        assert backend.operations == []
    run(go())


_UNREADABLE_CHECK = """
import asyncio, sys
from uvmshim.errors import UvmError
from uvmshim.uvm.sim import simulated_uvm

async def go():
    vm, _ = simulated_uvm()
    try:
        await vm.add_scsi(sys.argv[1], "/m", read_only=True)
    except UvmError as err:
        print(err)
        return
    print("attached")

asyncio.run(go())
"""


def test_unreadable_file(tmp_path: Path) -> None:
    """A disk the caller can't open is refused. Root opens anything, so (as root) the check
    runs in a child process as ``nobody`` without capabilities."""
    shared = Path(tempfile.mkdtemp(prefix="uvmshim-unreadable-"))
    try:
        shared.chmod(0o755)
        disk = shared / "d"
        disk.write_bytes(b"\0" * 512)
        disk.chmod(0)
        argv = [sys.executable, "-c", _UNREADABLE_CHECK, str(disk)]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
        # nobody may not reach the checkout (a clone in a 0700 temp dir): give it a copy.
        src = shared / "src"
        shutil.copytree(Path(uvmshim.__file__).parent, src / "uvmshim",
                        ignore=shutil.ignore_patterns("__pycache__"))
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=shared,
                             env={**os.environ, "PYTHONPATH": str(src)})
        assert "failed to grant VM access" in out.stdout, out.stdout + out.stderr
    finally:
        shutil.rmtree(shared)


def test_guest_mount_failure_rolls_back_the_host_attach(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm(fail_at=[2])
        with pytest.raises(UvmshimError, match="failed to modify UVM with new SCSI mount: "
                                           "injected failure of operation 2"):
            await vm.add_scsi(host.disk("d"), "/m", read_only=True)
        assert [op.op for op in backend.operations] == ["scsi-attach", "mount-scsi",
                                                        "scsi-detach"]
        assert backend.live() == {} and vm.scsi.attachments() == []
    run(go())


def test_failed_detach_stays_tracked_and_is_retryable(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        disk = host.disk("d")
        a = await vm.add_scsi(disk, "/m", read_only=False)
        b = await vm.add_scsi(disk, "/m2", read_only=False)
        await b.release()
        backend.fail_at(len(backend.operations) + 2)  # the host detach, after the unmount
        with pytest.raises(UvmshimError, match=r"^failed to remove SCSI device: failed to remove "
                                           r"SCSI disk .*/d from container sim-uvm: injected"):
            await a.release()
        att = vm.scsi.attachments()
        assert len(att) == 1 and att[0]["refcount"] == 0 and att[0]["state"] == "detach-failed"
        assert backend.disks and not backend.mounts
        # The same path can't be reused while the detach is pending ...
        with pytest.raises(UvmError, match="after a failed detach"):
            await vm.add_scsi(disk, "/m3", read_only=False)
        # ... releasing the other handle again does not underflow anything ...
        await b.release()
        assert vm.scsi.attachments()[0]["refcount"] == 0
        # ... and retrying the failed release detaches (without a second unmount).
        await a.release()
        assert backend.live() == {} and vm.scsi.attachments() == []
        assert [op.op for op in backend.operations[-2:]] == ["scsi-detach", "scsi-detach"]
    run(go())


def test_concurrent_adds_of_one_disk_attach_once(host: HostFiles) -> None:
    import asyncio

    async def go() -> None:
        vm, backend = simulated_uvm()
        disk = host.disk("d")
        results = await asyncio.gather(*(vm.add_scsi(disk, f"/m{i}", read_only=True)
                                         for i in range(5)))
        assert {r.guest_path for r in results} == {"/m0"}
        assert [op.op for op in backend.operations] == ["scsi-attach", "mount-scsi"]
        for r in results:
            await r.release()
        assert backend.live() == {}
    run(go())


def test_handle_describe(host: HostFiles) -> None:
    async def go() -> None:
        vm, _ = simulated_uvm()
        m: ScsiMount = await vm.add_scsi(host.disk("d"), "/g", read_only=True, options=["ro"])
        d = m.describe()
        assert d["kind"] == "scsi" and d["controller"] == 0 and d["lun"] == 0
        assert d["guest_path"] == "/g" and d["read_only"] is True
    run(go())
