"""``uvmshim plan`` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import HostFiles, spec_json, write_bundle


def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvmshim", *args], capture_output=True,
                          text=True, timeout=60)


def full_bundle(h: HostFiles, path: Path) -> Path:
    disk = h.disk("d.vhdx")
    obj = spec_json(
        layers=[h.layer("l2"), h.layer("l1"), h.scratch()],
        mounts=[
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": h.dir("data"),
             "options": ["rbind"]},
            {"destination": "/a.json", "type": "bind", "source": h.file("cfg/a.json"),
             "options": ["rbind", "ro"]},
            {"destination": "/disk", "type": "virtual-disk", "source": disk},
            {"destination": "/disk2", "type": "virtual-disk", "source": disk},
            {"destination": "/shared", "type": "bind", "source": "sandbox:///shared"},
        ],
        devices=[{"id": "PCI\\A", "idType": "vpci"}],
        extra={"vendorExtension": {"keep": ["me"]}},
    )
    return write_bundle(path, obj)


def test_plan_json(host: HostFiles, tmp_path: Path) -> None:
    bundle = full_bundle(host, tmp_path / "bundle")
    res = uvmshim("plan", str(bundle), "--id", "C1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"spec", "guest_document", "resources", "operations"} <= set(out)
    spec = out["spec"]
    assert spec["vendorExtension"] == {"keep": ["me"]}
    assert spec["root"]["path"] == "/run/gcs/c/C1/rootfs"
    assert [m["source"] for m in spec["mounts"]] == [
        "proc", "/run/gcs/c/C1/mounts/m1", "/run/gcs/c/C1/mounts/m2/a.json",
        "/run/mounts/m3", "/run/mounts/m3", "sandbox:///shared"]
    assert [m["type"] for m in spec["mounts"]][3:5] == ["none", "none"]
    assert spec["windows"]["devices"][0]["id"] != "PCI\\A"
    kinds = [r["kind"] for r in out["resources"]]
    assert set(kinds) == {"scsi", "plan9", "vpci", "layers"}
    for r in out["resources"]:
        assert {"host_path", "guest_path", "read_only"} <= set(r)
        if r["kind"] == "scsi":
            assert isinstance(r["controller"], int) and isinstance(r["lun"], int)
        if r["kind"] == "plan9":
            assert r["name"] in ("0", "1")
    assert out["guest_document"]["OciBundlePath"] == "/run/gcs/c/C1"
    assert out["operations"][0]["op"] == "scsi-attach"
    assert out["leftovers"] == {}


def test_plan_tables(host: HostFiles, tmp_path: Path) -> None:
    res = uvmshim("plan", str(full_bundle(host, tmp_path / "b")), "--id", "C1")
    assert res.returncode == 0, res.stderr
    for title in ("Resources", "Mounts", "Operations", "nothing left"):
        assert title in res.stdout


def test_plan_no_uvm_leaves_mounts(host: HostFiles, tmp_path: Path) -> None:
    obj = spec_json(layers=["/not/needed"], mounts=[
        {"destination": "/x", "type": "bind", "source": "/not/checked"}])
    res = uvmshim("plan", str(write_bundle(tmp_path / "b", obj)), "--no-uvm", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["spec"] == obj


def test_plan_vpmem_flag(host: HostFiles, tmp_path: Path) -> None:
    obj = spec_json(layers=[host.layer("l"), host.scratch()])
    res = uvmshim("plan", str(write_bundle(tmp_path / "b", obj)), "--vpmem-count", "2",
                  "--json")
    out = json.loads(res.stdout)
    assert [r["kind"] for r in out["resources"]][:1] == ["vpmem"]
    assert out["operations"][1]["path"] == "/run/layers/p0"


def bad(tmp_path: Path, h: HostFiles, case: str) -> tuple[Path, str]:
    b = tmp_path / case
    def bundle(obj: dict[str, Any]) -> Path:
        return write_bundle(b, obj)
    scratch = h.scratch()
    if case == "malformed":
        b.mkdir()
        (b / "config.json").write_text('{"mounts": [}')
        return b, "invalid JSON"
    if case == "wrong-type":
        return bundle({"mounts": [{"destination": 1}]}), "mounts[0].destination: expected a string"
    if case == "no-source":
        no_source = [{"destination": "/x", "type": "bind"}]
        return bundle(spec_json(layers=[scratch], mounts=no_source)), \
            "mounts[0].source: invalid OCI spec - a mount must have both source and a destination"
    if case == "no-destination":
        return bundle(spec_json(layers=[scratch], mounts=[{"source": "/x", "type": "bind"}])), \
            "mounts[0].destination: invalid OCI spec"
    if case == "hugepages":
        return bundle(spec_json(layers=[scratch], mounts=[
            {"destination": "/h", "type": "bind", "source": "hugepages://1G/x"}])), \
            "mounts[0]: only 2M (megabytes) pagesize is supported, got 1G"
    if case == "missing-bind":
        return bundle(spec_json(layers=[scratch], mounts=[
            {"destination": "/h", "type": "bind", "source": "/no/such"}])), \
            "mounts[0]: could not open bind mount target: stat /no/such: no such file"
    if case == "missing-layer":
        return bundle(spec_json(layers=[str(tmp_path / "nolayer"), scratch])), \
            "failed to add LCOW layer: failed to add SCSI layer: stat"
    if case == "too-many-disks":
        mounts = [{"destination": f"/d{i}", "type": "virtual-disk", "source": h.disk(f"d{i}")}
                  for i in range(257)]
        return bundle(spec_json(layers=[scratch], mounts=mounts)), \
            "mounts[255]: adding SCSI virtual disk mount"
    if case == "no-root":
        return bundle(spec_json()), "must provide either Windows.LayerFolders or Root.Path"
    if case == "missing-file":
        return tmp_path / "nothing.json", "no such file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["malformed", "wrong-type", "no-source", "no-destination",
                                  "hugepages", "missing-bind", "missing-layer",
                                  "too-many-disks", "no-root", "missing-file"])
def test_bad_input(host: HostFiles, tmp_path: Path, case: str) -> None:
    path, expected = bad(tmp_path, host, case)
    res = uvmshim("plan", str(path), "--json")
    assert res.returncode == 1
    assert res.stdout == ""
    assert expected in res.stderr
    assert res.stderr.startswith("uvmshim: error: ")
    assert "Traceback" not in res.stderr


def test_debug_shows_the_traceback(host: HostFiles, tmp_path: Path) -> None:
    path, _ = bad(tmp_path, host, "missing-bind")
    res = uvmshim("--debug", "plan", str(path))
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_usage_error_exit_status() -> None:
    res = uvmshim("plan")
    assert res.returncode == 2 and "Missing argument" in res.stderr
