"""allocate_linux_resources and the create-time steps around it.

hcsshim's ``allocateLinuxResources``, ``CreateContainer``, ``MountLCOWLayers``,
``handleAssignedDevicesLCOW`` and ``createLinuxContainerDocument``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from uvmshim.allocator import create_container_resources
from uvmshim.devices import device_info_from_path
from uvmshim.errors import UvmshimError
from uvmshim.spec import Spec
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.sim import SimulatedBackend, simulated_uvm

from helpers import HostFiles, make_spec, run, spec_json


def alloc(spec: Spec, cid: str = "C1", options: UvmOptions | None = None,
          ) -> tuple[Any, SimulatedBackend]:
    vm, backend = simulated_uvm(options)
    return run(create_container_resources(spec, vm, cid)), backend


def alloc_error(spec: Spec, cid: str = "C1") -> UvmshimError:
    vm, backend = simulated_uvm()
    with pytest.raises(UvmshimError) as info:
        run(create_container_resources(spec, vm, cid))
    assert backend.live() == {}, "a failed allocation must leave nothing behind"
    return info.value


# --- root filesystem (layers, scratch or a Plan9 root) ------------------------------------


def test_layer_branch(host: HostFiles) -> None:
    layers = [host.layer("l2"), host.layer("l1"), host.scratch()]
    a, backend = alloc(make_spec(layers=layers, root_path="ignored"))
    assert a.spec.root.path == "/run/gcs/c/C1/rootfs"  # the layer branch wins over root.path
    assert a.resources.lcow_scratch_path == "/run/gcs/c/C1/scratch/C1"
    ops = [(o.op, o.args.get("path")) for o in backend.operations]
    assert ops == [
        ("scsi-attach", layers[0] + "/layer.vhd"), ("mount-scsi", "/run/mounts/m1"),
        ("scsi-attach", layers[1] + "/layer.vhd"), ("mount-scsi", "/run/mounts/m2"),
        ("scsi-attach", layers[2] + "/sandbox.vhdx"), ("mount-scsi", "/run/gcs/c/C1"),
        ("combine-layers", None),
    ]
    combine = backend.operations[-1].args
    assert combine == {"container_id": "C1", "rootfs": "/run/gcs/c/C1/rootfs",
                       "layers": ["/run/mounts/m1", "/run/mounts/m2"],
                       "scratch": "/run/gcs/c/C1/scratch/C1"}
    assert backend.operations[0].args["read_only"] is True
    assert backend.operations[4].args["read_only"] is False
    run(a.resources.release())
    rel = [(o.op, o.args.get("path") or o.args.get("rootfs")) for o in backend.operations[7:]]
    assert rel == [  # overlay, then scratch, then the layers top-most first
        ("remove-combined-layers", "/run/gcs/c/C1/rootfs"),
        ("unmount-scsi", "/run/gcs/c/C1"), ("scsi-detach", None),
        ("unmount-scsi", "/run/mounts/m1"), ("scsi-detach", None),
        ("unmount-scsi", "/run/mounts/m2"), ("scsi-detach", None),
    ]
    assert backend.live() == {}


def test_scratch_only(host: HostFiles) -> None:
    _a, backend = alloc(make_spec(layers=[host.scratch()]))
    assert backend.operations[-1].args["layers"] == []


def test_shared_scratch_uses_the_first_attachers_root(host: HostFiles) -> None:
    import os

    sandbox_scratch = host.scratch("sbx")
    workload = host.dir("wl")
    os.symlink(sandbox_scratch + "/sandbox.vhdx", workload + "/sandbox.vhdx")
    vm, backend = simulated_uvm()
    run(create_container_resources(make_spec(layers=[sandbox_scratch]), vm, "S"))
    b = run(create_container_resources(make_spec(layers=[workload]), vm, "W"))
    assert b.resources.lcow_scratch_path == "/run/gcs/c/S/scratch/W"
    assert len(backend.disks) == 1


def test_plan9_root_branch(host: HostFiles) -> None:
    rootfs = host.dir("rootfs")
    spec = Spec.from_json({**spec_json(root_path=rootfs), "root": {"path": rootfs,
                                                                    "readonly": True}})
    a, backend = alloc(spec)
    assert a.spec.root.path == "/run/gcs/c/C1/rootfs" and a.spec.root.readonly
    assert a.resources.lcow_scratch_path == ""
    assert a.guest_document["ScratchDirPath"] == ""
    assert [o.op for o in backend.operations] == ["plan9-add", "mount-plan9"]
    assert backend.shares["0"] == {"path": rootfs, "read_only": True, "allowed_files": []}


def test_no_root() -> None:
    err = alloc_error(make_spec())
    assert err.message == "must provide either Windows.LayerFolders or Root.Path"
    err = alloc_error(Spec.from_json({**spec_json(layers=[]), "root": None}))
    assert err.message == "must provide either Windows.LayerFolders or Root.Path"


def test_layer_errors(host: HostFiles) -> None:
    missing_layer = str(host.root / "nolayer")
    err = alloc_error(make_spec(layers=[missing_layer, host.scratch()]))
    assert err.message.startswith("failed to mount container storage: failed to add LCOW "
                                  "layer: failed to add SCSI layer: stat ")
    assert err.message.endswith("/nolayer/layer.vhd: no such file or directory")
    assert err.where == "windows.layerFolders"
    err = alloc_error(make_spec(layers=[host.layer("l"), host.dir("empty-scratch")]))
    assert err.message.startswith("failed to mount container storage: failed to eval "
                                  "symlinks on scratch path: failed to resolve path: open ")


# --- mounts (the loop over Spec.Mounts) ---------------------------------------------------


def test_mount_branches(host: HostFiles) -> None:
    disk = host.disk("d.vhdx")
    dev = host.disk("dev-sdx")
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": host.dir("data"),
         "options": ["rbind"]},
        {"destination": "/etc/a.json", "type": "bind", "source": host.file("cfg/a.json"),
         "options": ["rbind", "RO"]},
        {"destination": "/disk", "type": "virtual-disk", "source": disk},
        {"destination": "/pd", "type": "physical-disk", "source": dev, "options": ["ro"]},
        {"destination": "/disk-again", "type": "virtual-disk", "source": disk},
        {"destination": "/shared", "type": "bind", "source": "sandbox:///shared"},
        {"destination": "/huge", "type": "bind", "source": "hugepages://2M/h"},
        {"destination": "/t", "type": "tmpfs"},
        {"destination": "/sbx-disk", "type": "virtual-disk", "source": host.disk("sbx")},
    ]
    a, backend = alloc(make_spec(layers=[host.scratch()], mounts=mounts))
    got = [(m.type, m.source) for m in a.spec.mounts]
    assert got == [
        ("proc", "proc"),
        ("bind", "/run/gcs/c/C1/mounts/m1"),
        ("bind", "/run/gcs/c/C1/mounts/m2/a.json"),
        ("none", "/run/mounts/m1"),
        ("none", "/run/mounts/m2"),
        ("none", "/run/mounts/m1"),  # reuse: the first attacher's path; m3 is used up
        ("bind", "sandbox:///shared"),
        ("bind", "hugepages://2M/h"),
        ("tmpfs", ""),
        ("none", "/run/mounts/m4"),
    ]
    assert a.spec.mounts[2].options == ("rbind", "RO")  # options are never changed
    assert backend.shares["0"]["allowed_files"] == []
    assert backend.shares["1"] == {"path": host.root.as_posix() + "/cfg/", "read_only": True,
                                   "allowed_files": ["a.json"]}
    pd = [o for o in backend.operations if o.op == "scsi-attach" and o.args["passthrough"]]
    assert len(pd) == 1 and pd[0].args["read_only"] is True
    assert len(backend.disks) == 4  # scratch, d.vhdx once, the physical disk, sbx
    run(a.resources.release())
    assert backend.live() == {}


def test_disk_type_with_sandbox_source_is_still_a_disk(host: HostFiles) -> None:
    spec = make_spec(layers=[host.scratch()], mounts=[
        {"destination": "/x", "type": "virtual-disk", "source": "sandbox:///nope"}])
    err = alloc_error(spec)
    assert "adding SCSI virtual disk mount {Destination:/x Type:virtual-disk " \
           "Source:sandbox:///nope Options:[]}: stat sandbox:///nope" in err.message


def test_no_uvm_validates_and_leaves_mounts(host: HostFiles) -> None:
    mounts = [{"destination": "/data", "type": "bind", "source": "/does/not/matter"},
              {"destination": "/d", "type": "virtual-disk", "source": "/nope"}]
    spec = make_spec(layers=["/x", "/y"], mounts=mounts)
    a = run(create_container_resources(spec, None, "C1"))
    assert a.spec.to_json() == spec.to_json()
    assert a.guest_document is None and len(a.resources) == 0
    bad = make_spec(root_path="/r", mounts=[{"destination": "/x", "type": "bind"}])
    with pytest.raises(UvmshimError, match="a mount must have both source and a destination"):
        run(create_container_resources(bad, None, "C1"))


@pytest.mark.parametrize(
    ("mount", "message", "where"),
    [
        ({"destination": "/x", "type": "bind"},
         "invalid OCI spec - a mount must have both source and a destination: "
         "{Destination:/x Type:bind Source: Options:[]}", "mounts[1].source"),
        ({"type": "virtual-disk", "source": "/d", "options": ["ro"]},
         "invalid OCI spec - a mount must have both source and a destination: "
         "{Destination: Type:virtual-disk Source:/d Options:[ro]}", "mounts[1].destination"),
        ({"destination": "/x", "type": "bind", "source": "hugepages://2M"},
         "hugepages://2M mount path is invalid, expected format: "
         "hugepages://<hugepage-size>/<hugepage-src-location>", "mounts[1]"),
        ({"destination": "/x", "type": "bind", "source": "hugepages://"},
         "hugepages:// mount path is invalid, expected format: "
         "hugepages://<hugepage-size>/<hugepage-src-location>", "mounts[1]"),
        ({"destination": "/x", "type": "bind", "source": "hugepages://1G/x"},
         "only 2M (megabytes) pagesize is supported, got 1G", "mounts[1]"),
        ({"destination": "/x", "type": "bind", "source": "/no/such/dir"},
         "could not open bind mount target: stat /no/such/dir: no such file or directory",
         "mounts[1]"),
    ],
)
def test_mount_errors(host: HostFiles, mount: dict[str, Any], message: str, where: str) -> None:
    first = {"destination": "/ok", "type": "bind", "source": host.dir("ok")}
    spec = make_spec(layers=[host.layer("l"), host.scratch()], mounts=[first, mount])
    before = copy.deepcopy(spec.to_json())
    err = alloc_error(spec)
    assert err.message == message and err.where == where
    assert spec.to_json() == before


def test_hugepages_trailing_slash_is_accepted(host: HostFiles) -> None:
    spec = make_spec(root_path=host.dir("r"), mounts=[
        {"destination": "/x", "type": "bind", "source": "hugepages://2M/"}])
    a, _ = alloc(spec)
    assert a.spec.mounts[0].source == "hugepages://2M/"


def test_unknown_and_empty_types_skip_validation(host: HostFiles) -> None:
    spec = make_spec(root_path=host.dir("r"), mounts=[{"type": "Bind"}, {"source": "x"},
                                                      {"destination": "/y", "type": "BIND"}])
    a, backend = alloc(spec)
    assert a.spec.to_json()["mounts"] == spec.to_json()["mounts"]
    assert [o.op for o in backend.operations] == ["plan9-add", "mount-plan9"]


def test_more_disks_than_slots(host: HostFiles) -> None:
    mounts = [{"destination": f"/d{i}", "type": "virtual-disk", "source": host.disk(f"d{i}")}
              for i in range(66)]
    vm, backend = simulated_uvm(UvmOptions(scsi_controllers=1))
    with pytest.raises(UvmshimError) as info:
        run(create_container_resources(make_spec(layers=[host.scratch()], mounts=mounts),
                                       vm, "C1"))
    assert info.value.where == "mounts[63]"
    assert info.value.message.endswith("Options:[]}: no available location")
    assert backend.live() == {}


# --- devices (handleAssignedDevicesLCOW) --------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("PCIP\\VEN_10DE\\6&17F903&0&00400000/3", ("PCIP\\VEN_10DE\\6&17F903&0&00400000", 3)),
    ("PCIP\\VEN_10DE\\6&17F903&0&00400000", ("PCIP\\VEN_10DE\\6&17F903&0&00400000", 0)),
    ("ROOT\\DISPLAY\\0000", ("ROOT\\DISPLAY", 0)),  # hcsshim's trap, kept
    ("X\\70000", ("X\\70000", 0)),  # not a uint16
])
def test_device_info_from_path(raw: str, expected: tuple[str, int]) -> None:
    assert device_info_from_path(raw) == expected


def test_devices_rewritten_in_order(host: HostFiles) -> None:
    devices = [{"id": "PCI\\A/1", "idType": "vpci"}, {"id": "PCI\\B", "idType": "vpci-instance-id"}]
    a, backend = alloc(make_spec(root_path=host.dir("r"), devices=devices))
    out = a.spec.windows.devices
    assert [d.id_type for d in out] == ["vpci", "vpci-instance-id"]
    assert [d.id for d in out] == list(backend.pci)
    assert list(backend.pci.values()) == ["PCI\\A", "PCI\\B"]
    assert a.guest_document["OciSpecification"]["windows"] == {
        "devices": [d.to_json() for d in out]}


def test_unsupported_device_type(host: HostFiles) -> None:
    err = alloc_error(make_spec(root_path=host.dir("r"), devices=[
        {"id": "A", "idType": "vpci"}, {"id": "X", "idType": "vpci-location-path"}]))
    assert err.message == "specified device X has unsupported type vpci-location-path"
    assert err.where == "windows.devices[1].idType"


def test_gpu_needs_the_driver_vhd(host: HostFiles) -> None:
    gpu = [{"id": "PCI\\G", "idType": "gpu"}]
    err = alloc_error(make_spec(root_path=host.dir("r"), devices=gpu))
    assert err.message == "failed to add gpu vhd to sim-uvm: no gpu vhd specified"
    vhd = host.disk("gpu.vhd")
    a, backend = alloc(make_spec(root_path=host.dir("r"), devices=gpu,
                                 annotations={"io.microsoft.lcow.gpuvhdpath": vhd}))
    install = [o for o in backend.operations if o.op == "install-drivers"]
    assert install[0].args == {"rw_path": "/run/nvidia", "disk_path": "/run/mounts/m1"}
    run(a.resources.release())
    assert backend.live() == {}


def test_kernel_drivers_annotation(host: HostFiles) -> None:
    d1, d2 = host.disk("drv1.vhd"), host.disk("drv2.vhd")
    _a, backend = alloc(make_spec(root_path=host.dir("r"), annotations={
        "io.microsoft.virtualmachine.kerneldrivers": f"{d1},{d2}"}))
    install = [o.args for o in backend.operations if o.op == "install-drivers"]
    assert [i["disk_path"] for i in install] == ["/run/mounts/m1", "/run/mounts/m2"]
    assert all(i["rw_path"].startswith("/run/drivers/") for i in install)
    err = alloc_error(make_spec(root_path=host.dir("r"), annotations={
        "io.microsoft.virtualmachine.kerneldrivers": f"{d1},/nope"}))
    assert err.message.startswith("failed to find path to drivers at /nope: stat /nope")


# --- create-time steps (CreateContainer) --------------------------------------------------


@pytest.mark.parametrize(("annotations", "message"), [
    ({"io.kubernetes.cri.container-type": "pod"},
     "invalid 'io.kubernetes.cri.container-type': 'pod'"),
    ({"io.kubernetes.cri.container-type": "sandbox"},
     "cannot specify 'io.kubernetes.cri.container-type' without 'io.kubernetes.cri.sandbox-id'"),
    ({"io.kubernetes.cri.sandbox-id": "s"},
     "cannot specify 'io.kubernetes.cri.sandbox-id' without 'io.kubernetes.cri.container-type'"),
])
def test_sandbox_annotation_errors(host: HostFiles, annotations: dict[str, str],
                                   message: str) -> None:
    assert alloc_error(make_spec(root_path=host.dir("r"), annotations=annotations)).message \
        == message


def test_effective_id_is_used_for_the_root(host: HostFiles) -> None:
    vm, _ = simulated_uvm()
    a = run(create_container_resources(make_spec(layers=[host.scratch()]), vm, ""))
    assert len(a.container_id) == 36
    assert a.spec.root is not None and a.spec.root.path == f"/run/gcs/c/{a.container_id}/rootfs"
    assert a.resources.lcow_scratch_path == \
        f"/run/gcs/c/{a.container_id}/scratch/{a.container_id}"


def test_pod_sandbox_layers_belong_to_the_uvm(host: HostFiles) -> None:
    vm, backend = simulated_uvm()
    ann = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "P"}
    a = run(create_container_resources(
        make_spec(layers=[host.layer("l"), host.scratch()], annotations=ann), vm, "P"))
    assert a.sandbox.is_sandbox and a.resources.layers is None and len(vm.owned) == 1
    run(a.resources.release())
    assert backend.disks  # still there: they go with the UVM
    run(vm.release_owned())
    assert backend.live() == {}


def test_failed_sandbox_allocation_releases_its_layers(host: HostFiles) -> None:
    ann = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "P"}
    spec = make_spec(layers=[host.layer("l"), host.scratch()], annotations=ann,
                     mounts=[{"destination": "/x", "type": "bind", "source": "/nope"}])
    vm, backend = simulated_uvm()
    with pytest.raises(UvmshimError):
        run(create_container_resources(spec, vm, "P"))
    assert backend.live() == {} and vm.owned == []


def test_no_linux_section(host: HostFiles) -> None:
    obj = spec_json(root_path=host.dir("r"))
    del obj["linux"]
    err = alloc_error(Spec.from_json(obj))
    assert err.where == "linux" and "Linux containers only" in err.message


# --- the guest document (createLinuxContainerDocument) ------------------------------------


def test_guest_document(host: HostFiles) -> None:
    obj = spec_json(layers=[host.scratch()], devices=[{"id": "PCI\\A", "idType": "vpci"}],
                    annotations={"io.microsoft.virtualmachine.lcow.privileged": "true"})
    obj["windows"]["network"] = {"networkNamespace": "ns1"}
    obj["hooks"] = {"prestart": [{"path": "/x"}], "createContainer": [{"path": "/bin/cc"}],
                    "startContainer": [{"path": "/bin/sc", "args": ["sc"]}]}
    devices = [{"allow": False, "access": "rwm"},
               {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]
    obj["linux"] = {"cgroupsPath": "/kubepods/x", "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                    "resources": {"devices": devices, "pids": {"limit": 1}, "blockIO": {},
                                  "hugepageLimits": [], "network": {}, "memory": {"limit": 9}}}
    a, _ = alloc(Spec.from_json(obj))
    doc = a.guest_document
    assert list(doc) == ["SchemaVersion", "OciBundlePath", "OciSpecification", "ScratchDirPath"]
    assert doc["SchemaVersion"] == {"Major": 2, "Minor": 1}
    assert doc["OciBundlePath"] == "/run/gcs/c/C1"
    assert doc["ScratchDirPath"] == "/run/gcs/c/C1/scratch/C1"
    oci = doc["OciSpecification"]
    # The hooks that run in the container's namespaces go to the guest's crun (a
    # createContainer path made to resolve in the container's root); the host runs the others.
    assert oci["hooks"] == {"createContainer": [{"path": "/run/gcs/c/C1/rootfs/bin/cc"}],
                            "startContainer": [{"path": "/bin/sc", "args": ["sc"]}]}
    # Every resource the guest's crun can apply stays (unlike hcsshim's createLCOWSpec);
    # network (cgroup v1's net_cls/net_prio) goes.
    assert oci["linux"] == {"cgroupsPath": "", "resources": {
        "devices": devices, "pids": {"limit": 1}, "blockIO": {}, "hugepageLimits": [],
        "memory": {"limit": 9}}}
    hcs = a.hcsshim_document["OciSpecification"]
    assert "hooks" not in hcs
    assert hcs["linux"] == {"cgroupsPath": "", "resources": {"memory": {"limit": 9}}}
    assert oci["windows"]["network"] == {"networkNamespace": "ns1"}
    assert oci["windows"]["devices"][0]["id"] == a.spec.windows.devices[0].id
    assert "layerFolders" not in oci["windows"]
    assert oci["root"]["path"] == "/run/gcs/c/C1/rootfs"


def test_guest_document_drops_windows_without_namespace_or_devices(host: HostFiles) -> None:
    a, _ = alloc(make_spec(layers=[host.scratch()]))
    assert "windows" not in a.guest_document["OciSpecification"]
    assert "seccomp" not in str(a.guest_document)


def test_input_spec_is_never_changed(host: HostFiles) -> None:
    spec = make_spec(layers=[host.layer("l"), host.scratch()], mounts=[
        {"destination": "/d", "type": "bind", "source": host.dir("d")},
        {"destination": "/v", "type": "virtual-disk", "source": host.disk("v")}])
    before = copy.deepcopy(spec.to_json())
    a, _ = alloc(spec)
    assert spec.to_json() == before
    assert a.spec is not spec and a.spec.to_json() != before


def test_allocation_restores_the_cyclic_gc(host: HostFiles) -> None:
    import gc

    assert gc.isenabled()
    alloc(make_spec(layers=[host.scratch()]))
    alloc_error(make_spec())
    assert gc.isenabled()
    gc.disable()
    try:
        alloc(make_spec(layers=[host.scratch()]))
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
