"""The UVM's size from the container (uvmshim.uvm.sizing) and host cgroup paths/bounds
(uvmshim.runc.cgroups): no VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from uvmshim.runc import cgroups
from uvmshim.runc.cgroups import CgroupError, bounds, cgroup_path
from uvmshim.uvm.sizing import (
    ANNOTATION_MEMORY_MB,
    ANNOTATION_PROCESSORS,
    HOST_OVERHEAD_MB,
    MEMORY_CLASSES_MB,
    SizingError,
    UvmSize,
    resolve_size,
    uvm_size,
)

MiB = 1 << 20


def size(resources: dict[str, object] | None = None, annotations: dict[str, str] | None = None,
         **kw: int) -> UvmSize:
    return uvm_size({"resources": resources or {}}, annotations or {},
                    host_mb=kw.get("host_mb", 16384), host_cpus=kw.get("host_cpus", 8))


def test_defaults_and_size_classes() -> None:
    assert size() == UvmSize(512, 2)
    # no CPU limit: hcsshim's 2 vCPUs, at most half the host's CPUs
    assert [size(host_cpus=n).cpus for n in (1, 2, 3, 4, 64)] == [1, 1, 1, 2, 2]
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


def test_given_sizes_win_and_must_hold_the_limit() -> None:
    """``uvmshim run --memory/--cpus`` (:func:`resolve_size`): what is given wins over the
    spec and the annotations; what is not given is sized as the runc path sizes it."""
    linux = {"resources": {"memory": {"limit": 700 * MiB},
                           "cpu": {"quota": 300000, "period": 100000}}}
    assert resolve_size(linux, {}, host_mb=16384, host_cpus=8) == \
        UvmSize(1024, 4, "limit", "limit")  # 700 + 256 -> the 1024 MiB class
    assert resolve_size(linux, {}, memory_mb=2000, host_mb=16384, host_cpus=8) == \
        UvmSize(2000, 4, "given", "limit")
    assert resolve_size(linux, {ANNOTATION_PROCESSORS: "3"}, cpus=1, host_mb=16384) == \
        UvmSize(1024, 1, "limit", "given")
    assert resolve_size(None, {ANNOTATION_MEMORY_MB: "768"}, memory_mb=600,
                        host_cpus=8) == \
        UvmSize(600, 2, "given", "default")
    assert resolve_size(linux, {}, memory_mb=956, host_mb=16384).memory_mb == 956  # just fits
    with pytest.raises(SizingError) as err:
        resolve_size(linux, {}, memory_mb=300, host_mb=16384)
    assert err.value.where == "--memory"
    assert "memory limit of 700 MiB" in str(err.value) and "at least 956 MiB" in str(err.value)
    assert "--memory 956" in str(err.value.hint) and "(1024 MiB)" in str(err.value.hint)
    # a spec the host cannot size is still an error when nothing is given
    with pytest.raises(SizingError, match="the host has 512 MiB"):
        resolve_size(linux, {}, host_mb=512)


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


def test_update_bounds_follow_the_new_resources() -> None:
    spec = {"memory": {"limit": 64 * MiB}, "cpu": {"quota": 50000, "period": 100000},
            "pids": {"limit": 10}}
    change = {"cpu": {"quota": 150000}, "pids": {"limit": 20}}
    merged = cgroups.merge_resources(spec, change)
    assert merged == {"memory": {"limit": 64 * MiB}, "cpu": {"quota": 150000, "period": 100000},
                      "pids": {"limit": 20}}
    assert spec["cpu"] == {"quota": 50000, "period": 100000}  # not changed in place
    # only what the update touches; pids never on the host
    assert cgroups.update_limits(change, merged, 512) == {"cpu_quota": 200000,
                                                          "cpu_period": 100000}
    change = {"memory": {"limit": 128 * MiB}, "cpu": {"period": 50000}}
    assert cgroups.update_limits(change, cgroups.merge_resources(merged, change), 1024) == {
        "memory": (1024 + HOST_OVERHEAD_MB) * MiB, "cpu_quota": 150000 + 25000,
        "cpu_period": 50000}
    change = {"memory": {"limit": -1}, "cpu": {"quota": -1}}  # no limit: no bound
    assert cgroups.update_limits(change, cgroups.merge_resources(spec, change), 512) == {
        "memory": -1, "cpu_quota": -1, "cpu_period": 100000}
    assert cgroups.update_limits({"memory": {"limit": 0}}, spec, 512) == {}  # 0: unchanged


def test_update_memory_must_fit_the_uvm() -> None:
    cgroups.check_fits({"memory": {"limit": 256 * MiB}}, 512)  # + 256 MiB guest overhead
    cgroups.check_fits({"memory": {"limit": -1}, "cpu": {"quota": 10**9}}, 512)
    with pytest.raises(CgroupError, match=r"memory\.limit: a memory limit of 257 MiB does "
                       r"not fit the utility VM: it has 512 MiB.*at most 256 MiB"):
        cgroups.check_fits({"memory": {"limit": 257 * MiB}}, 512)
    cgroups.check_fits({"memory": {"limit": 512 * MiB}}, 512, exact=True)  # as at create
    with pytest.raises(CgroupError, match="at most 512 MiB"):
        cgroups.check_fits({"memory": {"limit": 513 * MiB}}, 512, exact=True)


@pytest.mark.parametrize("v2", [True, False])
def test_update_writes_the_host_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       v2: bool) -> None:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    d = tmp_path / ("c1" if v2 else "memory/c1")
    d.mkdir(parents=True)
    if v2:
        (tmp_path / "cgroup.controllers").write_text("memory cpu pids\n")
        files = {"memory.max": "max\n", "cpu.max": "max 100000\n",
                 "memory.current": str(600 * MiB), "memory.stat": f"inactive_file {100 * MiB}\n"}
    else:
        files = {"memory.limit_in_bytes": "9223372036854771712\n",
                 "cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n",
                 "memory.usage_in_bytes": str(600 * MiB),
                 "memory.stat": f"total_inactive_file {100 * MiB}\n"}
    for name, text in files.items():
        (d / name).write_text(text)
    limits = {"memory": 896 * MiB, "cpu_quota": 200000, "cpu_period": 50000}
    cgroups.check_room([str(d)], limits)  # 500 MiB besides reclaimable cache
    cgroups.apply([str(d)], limits)
    if v2:
        assert (d / "memory.max").read_text() == str(896 * MiB)
        assert (d / "cpu.max").read_text() == "200000 50000"
    else:
        assert (d / "memory.limit_in_bytes").read_text() == str(896 * MiB)
        assert (d / "cpu.cfs_quota_us").read_text() == "200000"
        assert (d / "cpu.cfs_period_us").read_text() == "50000"
    cgroups.apply([str(d)], {"memory": -1, "cpu_quota": -1, "cpu_period": 100000})
    if v2:
        assert (d / "memory.max").read_text() == "max"
        assert (d / "cpu.max").read_text() == "max 100000"
    else:
        assert (d / "memory.limit_in_bytes").read_text() == "-1"
        assert (d / "cpu.cfs_quota_us").read_text() == "-1"
    with pytest.raises(CgroupError, match=r"uses 500 MiB on the host .* more than the new "
                       r"bound of 400 MiB: QEMU would be OOM-killed"):
        cgroups.check_room([str(d)], {"memory": 400 * MiB})
    cgroups.check_room([str(d)], {"memory": -1})
