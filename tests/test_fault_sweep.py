"""Fail every operation of a spec that exercises every branch, one at a time."""

from __future__ import annotations

import copy

import pytest

from uvmshim.allocator import create_container_resources
from uvmshim.errors import UvmshimError
from uvmshim.spec import Spec
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles, make_spec, run


def everything(h: HostFiles) -> Spec:
    disk = h.disk("d.vhdx")
    return make_spec(
        layers=[h.layer("l2"), h.layer("l1"), h.scratch()],
        mounts=[
            {"destination": "/dir", "type": "bind", "source": h.dir("dir"), "options": ["rbind"]},
            {"destination": "/file", "type": "bind", "source": h.file("f/file.txt"),
             "options": ["rbind"]},
            {"destination": "/ro", "type": "bind", "source": h.dir("ro"),
             "options": ["rbind", "ro"]},
            {"destination": "/disk", "type": "virtual-disk", "source": disk},
            {"destination": "/disk2", "type": "virtual-disk", "source": disk},
            {"destination": "/pd", "type": "physical-disk", "source": h.disk("sdx")},
            {"destination": "/shared", "type": "bind", "source": "sandbox:///shared"},
            {"destination": "/huge", "type": "bind", "source": "hugepages://2M/h"},
        ],
        devices=[{"id": "PCI\\A", "idType": "vpci"}, {"id": "PCI\\G/1", "idType": "gpu"}],
        annotations={"io.microsoft.lcow.gpuvhdpath": h.disk("gpu.vhd")},
    )


def test_fault_sweep(host: HostFiles) -> None:
    spec = everything(host)
    vm, backend = simulated_uvm()
    run(create_container_resources(spec, vm, "C1"))
    total = len(backend.operations)
    assert total > 20
    kinds = {op.op for op in backend.operations}
    assert {"combine-layers", "plan9-add", "scsi-attach", "vpci-add", "install-drivers"} <= kinds

    before = copy.deepcopy(spec.to_json())
    for k in range(1, total + 1):
        vm, backend = simulated_uvm(fail_at=[k])
        with pytest.raises(UvmshimError) as info:
            run(create_container_resources(spec, vm, "C1"))
        failed = backend.operations[k - 1]
        assert f"injected failure of operation {k} ({failed.side} {failed.op})" in str(info.value)
        assert backend.live() == {}, f"operation {k} ({failed.op}) left {backend.live()}"
        assert vm.inventory() == {"scsi": [], "plan9": [], "vpmem": [], "vpci": []}
        assert spec.to_json() == before
