"""Plan9, vPMEM, vPCI, the mount counter and container resources.

hcsshim's ``AddPlan9``, ``AddVPMem``, ``AssignDevice``, the UVM mount counter and
``internal/resources``; docs/design.md (sections 2 and 6) maps them onto uvmshim.
"""

from __future__ import annotations

from typing import Any

import pytest

from uvmshim.errors import (
    NoAvailableLocation,
    ReleaseError,
    UvmError,
    UvmshimError,
    VPMemTooLarge,
)
from uvmshim.layers import add_lcow_layer
from uvmshim.resources import ContainerResources
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles, run

# --- Plan9 ---------------------------------------------------------------------------------


def test_plan9_names_count_from_zero_and_are_never_reused(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        d = host.dir("d")
        a = await vm.add_plan9(d, "/g/a", read_only=False)
        b = await vm.add_plan9(d, "/g/b", read_only=True)  # same host path: a new share
        assert (a.name, b.name) == ("0", "1")
        await a.release()
        c = await vm.add_plan9(d, "/g/c", read_only=False)
        assert c.name == "2"
        assert sorted(backend.shares) == ["1", "2"]
    run(go())


@pytest.mark.parametrize(("read_only", "restrict", "flags"),
                         [(False, False, 4), (True, False, 5), (False, True, 132),
                          (True, True, 133)])
def test_plan9_flags(host: HostFiles, read_only: bool, restrict: bool, flags: int) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        host.file("d/f.txt")
        share = await vm.add_plan9(host.dir("d") + "/", "/g", read_only=read_only,
                                   restrict=restrict, allowed_names=["f.txt"])
        assert share.flags == flags
        assert backend.shares["0"]["allowed_files"] == (["f.txt"] if restrict else [])
    run(go())


def test_plan9_errors(host: HostFiles) -> None:
    async def go() -> None:
        vm, _ = simulated_uvm()
        with pytest.raises(UvmError, match="^uvmPath must be passed to AddPlan9$"):
            await vm.add_plan9(host.dir("d"), "", read_only=True)
        vm2, _ = simulated_uvm(UvmOptions(no_writable_file_shares=True))
        with pytest.raises(UvmError, match="^adding writable shares is denied: operation "
                                           "denied$"):
            await vm2.add_plan9(host.dir("d"), "/g", read_only=False)
        assert (await vm2.add_plan9(host.dir("d"), "/g", read_only=True)).name == "0"
    run(go())


def test_plan9_release_is_guest_then_host_and_retryable(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        share = await vm.add_plan9(host.dir("d"), "/g", read_only=False)
        backend.fail_at(4)  # the host remove
        with pytest.raises(UvmshimError, match="^failed to remove plan9 share: failed to "
                                               "remove plan9 share 0 from sim-uvm: "):
            await share.release()
        assert "0" in backend.shares and not backend.mounts
        await share.release()
        await share.release()
        assert [op.op for op in backend.operations] == [
            "plan9-add", "mount-plan9", "unmount-plan9", "plan9-remove", "plan9-remove"]
        assert backend.live() == {} and vm.plan9.shares() == []
    run(go())


# --- vPMEM ---------------------------------------------------------------------------------


def test_vpmem_off_by_default_layers_go_to_scsi(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        path, handle = await add_lcow_layer(vm, host.layer("l") + "/layer.vhd")
        assert path == "/run/mounts/m1" and handle.describe()["kind"] == "scsi"
        assert not backend.pmem
    run(go())


def test_vpmem_default_mode(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm(UvmOptions(vpmem_count=2))
        p0, h0 = await add_lcow_layer(vm, host.layer("a") + "/layer.vhd")
        p0b, h0b = await add_lcow_layer(vm, host.layer("a") + "/layer.vhd")
        p1, _ = await add_lcow_layer(vm, host.layer("b") + "/layer.vhd")
        p2, h2 = await add_lcow_layer(vm, host.layer("c") + "/layer.vhd")
        assert (p0, p0b, p1) == ("/run/layers/p0", "/run/layers/p0", "/run/layers/p1")
        # no free device: falls back to SCSI, and the counter gives m1
        assert p2 == "/run/mounts/m1" and h2.describe()["kind"] == "scsi"
        await h0.release()
        assert 0 in backend.pmem  # refcounted
        await h0b.release()
        assert 0 not in backend.pmem and "/run/layers/p0" not in backend.mounts
    run(go())


def test_vpmem_too_large_falls_back_to_scsi(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm(UvmOptions(vpmem_count=2, vpmem_max_size=4096))
        big = host.disk("big/layer.vhd", size=4097)
        path, _handle = await add_lcow_layer(vm, big)
        assert path == "/run/mounts/m1" and not backend.pmem
        with pytest.raises(VPMemTooLarge, match="layer size is to large for VPMEM max size"):
            await vm.add_vpmem(big)
        small = host.disk("small/layer.vhd", size=4096)
        assert (await vm.add_vpmem(small)).guest_path == "/run/layers/p0"
    run(go())


def test_vpmem_no_slot_and_missing_file(host: HostFiles) -> None:
    async def go() -> None:
        vm, _ = simulated_uvm(UvmOptions(vpmem_count=1))
        await vm.add_vpmem(host.disk("a"))
        with pytest.raises(NoAvailableLocation):
            await vm.add_vpmem(host.disk("b"))
        with pytest.raises(UvmError, match="failed to add VPMEM layer: stat .*missing"):
            await add_lcow_layer(vm, str(host.root / "missing"))
    run(go())


def test_vpmem_option_limits() -> None:
    with pytest.raises(UvmError, match="VPMem device count cannot be greater than 128"):
        UvmOptions(vpmem_count=129)
    with pytest.raises(UvmError, match="VPMemSizeBytes must be a multiple of 4096"):
        UvmOptions(vpmem_count=1, vpmem_max_size=4095)
    assert UvmOptions(vpmem_count=3, fully_physically_backed=True).effective_vpmem_count == 0


def test_fully_physically_backed_never_uses_vpmem(host: HostFiles) -> None:
    async def go() -> None:
        vm, backend = simulated_uvm(UvmOptions(vpmem_count=3, fully_physically_backed=True))
        path, _ = await add_lcow_layer(vm, host.layer("a") + "/layer.vhd")
        assert path == "/run/mounts/m1" and not backend.pmem
    run(go())


# --- vPCI ----------------------------------------------------------------------------------


def test_vpci_refcount_keeps_the_first_guid() -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        a = await vm.assign_device("PCI\\X", 0)
        b = await vm.assign_device("PCI\\X", 0)
        c = await vm.assign_device("PCI\\X", 1)
        assert a.vmbus_guid == b.vmbus_guid != c.vmbus_guid
        await a.release()
        assert a.vmbus_guid in backend.pci
        await b.release()
        await b.release()
        assert a.vmbus_guid not in backend.pci
    run(go())


def test_vpci_failed_removal_stays_tracked() -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        a = await vm.assign_device("PCI\\X", 0)
        backend.fail_at(3)
        with pytest.raises(UvmshimError, match="^failed to remove VPCI device: injected"):
            await a.release()
        assert vm.vpci.devices() != []
        await a.release()
        assert vm.vpci.devices() == [] and backend.live() == {}
    run(go())


# --- counter -------------------------------------------------------------------------------


def test_mount_counter_starts_at_one_and_never_goes_back() -> None:
    vm, _ = simulated_uvm()
    assert [vm.mount_counter() for _ in range(3)] == [1, 2, 3]
    assert simulated_uvm()[0].mount_counter() == 1  # per UVM


# --- ContainerResources --------------------------------------------------------------------


class Recorder:
    def __init__(self, log: list[str], name: str, failures: int = 0) -> None:
        self.log, self.name, self.failures, self.released = log, name, failures, False

    async def release(self) -> None:
        if self.released:
            return
        self.log.append(self.name)
        if self.failures:
            self.failures -= 1
            raise UvmError(f"{self.name} failed")
        self.released = True

    def describe(self) -> dict[str, Any]:
        return {"kind": "test", "name": self.name}


def test_release_newest_first_then_layers() -> None:
    log: list[str] = []
    r = ContainerResources("c")
    r.set_layers(Recorder(log, "layers"))
    r.add(Recorder(log, "a"), Recorder(log, "b"))
    r.add(Recorder(log, "c"))
    run(r.release())
    assert log == ["c", "b", "a", "layers"]
    run(r.release())  # second release: a no-op
    assert log == ["c", "b", "a", "layers"] and len(r) == 0


def test_release_attempts_everything_and_reports_all_failures() -> None:
    log: list[str] = []
    r = ContainerResources("c")
    r.set_layers(Recorder(log, "layers"))
    r.add(Recorder(log, "a", failures=1), Recorder(log, "b"), Recorder(log, "c", failures=1))
    with pytest.raises(ReleaseError) as info:
        run(r.release())
    assert log == ["c", "b", "a", "layers"]  # the layers are released despite failures
    assert [str(e) for e in info.value.errors] == ["c failed", "a failed"]
    assert str(info.value) == ("failed to release one or more container resources: "
                               "c failed; a failed")
    # A second release retries exactly the failed ones.
    run(r.release())
    assert log == ["c", "b", "a", "layers", "c", "a"]
    run(r.release())
    assert log == ["c", "b", "a", "layers", "c", "a"]
