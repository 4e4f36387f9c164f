"""The UVM's size from the container (uvmshim.uvm.sizing) and host cgroup paths/bounds
(uvmshim.runc.cgroups): no VM."""

from __future__ import annotations

import pytest

from uvmshim.runc.cgroups import CgroupError, bounds, cgroup_path
from uvmshim.uvm.sizing import (
    ANNOTATION_MEMORY_MB,
    ANNOTATION_PROCESSORS,
    HOST_OVERHEAD_MB,
    MEMORY_CLASSES_MB,
    SizingError,
    UvmSize,
    uvm_size,
)

MiB = 1 << 20


def size(resources: dict[str, object] | None = None, annotations: dict[str, str] | None = None,
         **kw: int) -> UvmSize:
    return uvm_size({"resources": resources or {}}, annotations or {},
                    host_mb=kw.get("host_mb", 16384), host_cpus=kw.get("host_cpus", 8))


def test_defaults_and_size_classes() -> None:
    assert size() == UvmSize(512, 2)
    assert size({"memory": {"limit": 64 * MiB}}).memory_mb == 512  # 64 + 256 overhead
    assert size({"memory": {"limit": 300 * MiB}}).memory_mb == 1024
    assert size({"memory": {"limit": 3 * 1024 * MiB}}).memory_mb == 4096
    # any limit lands on one of a few classes: few machine configurations, few templates
    got = {size({"memory": {"limit": m * MiB}}).memory_mb for m in range(1, 8000, 37)}
    assert got <= set(MEMORY_CLASSES_MB) and len(got) == 6  # up to 8 GiB limits
    assert size({"cpu": {"quota": 150000, "period": 100000}}).cpus == 2
    assert size({"cpu": {"quota": 250000, "period": 100000}}).cpus == 4
    assert size({"cpu": {"quota": 50000}}).cpus == 1
    assert size({"cpu": {"cpus": "0-2,5"}}).cpus == 4
    assert size({"cpu": {"quota": 2000000, "period": 100000}}, host_cpus=8).cpus == 8
    assert size(annotations={"io.kubernetes.cri.sandbox-memory": str(900 * MiB)}
                ).memory_mb == 2048


def test_annotations_override() -> None:
    s = size({"memory": {"limit": 64 * MiB}, "cpu": {"quota": 100000}},
             {ANNOTATION_MEMORY_MB: "768", ANNOTATION_PROCESSORS: "3"})
    assert s == UvmSize(768, 3, "annotation", "annotation")


@pytest.mark.parametrize(("resources", "annotations", "message"), [
    ({}, {ANNOTATION_MEMORY_MB: "100"}, "at least 256 MiB"),
    ({}, {ANNOTATION_MEMORY_MB: "lots"}, "whole number"),
    ({}, {ANNOTATION_MEMORY_MB: "999999"}, "the host has 16384 MiB"),
    ({"memory": {"limit": 20000 * MiB}}, {}, "the host has 16384 MiB"),
    ({"memory": {"limit": 2048 * MiB}}, {ANNOTATION_MEMORY_MB: "1024"}, "smaller than"),
    ({}, {ANNOTATION_PROCESSORS: "0"}, "1 to 255 vCPUs"),
    ({"cpu": {"cpus": "a-b"}}, {}, "bad CPU list"),
])
def test_impossible_sizes(resources: dict[str, object], annotations: dict[str, str],
                          message: str) -> None:
    with pytest.raises(SizingError, match=message):
        size(resources, annotations)


def test_cgroup_paths() -> None:
    assert cgroup_path("/libpod_parent/libpod-abc", False) == "libpod_parent/libpod-abc"
    assert cgroup_path("rel/x", False) == "rel/x"
    assert cgroup_path("", False) == ""
    assert cgroup_path("machine-pod1.slice:libpod:abc", True) == \
        "machine.slice/machine-pod1.slice/libpod-abc.scope"
    assert cgroup_path(":crio:abc", True) == "system.slice/crio-abc.scope"
    assert cgroup_path("/a/../../b", False) == "b"  # never above the hierarchy's root
    with pytest.raises(CgroupError):
        cgroup_path("nocolons", True)


def test_bounds() -> None:
    assert bounds({}, 512) == {}
    assert bounds({"memory": {"limit": 64 * MiB}, "cpu": {"quota": 50000, "period": 100000}},
                  512) == {"memory": (512 + HOST_OVERHEAD_MB) * MiB, "cpu_period": 100000,
                           "cpu_quota": 100000}
