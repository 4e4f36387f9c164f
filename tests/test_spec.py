from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from uvmshim.errors import SpecError
from uvmshim.spec import Mount, Spec, load_spec

FULL: dict[str, Any] = {
    "ociVersion": "1.1.0",
    "process": {"terminal": False, "args": ["sh"], "env": ["A=1"], "x-unknown": [1, 2]},
    "root": {"path": "rootfs", "readonly": True, "someday": "field"},
    "hostname": "h",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/d", "type": "bind", "source": "/x", "options": ["rbind", "ro"],
         "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]},
        {"destination": "/t"},
    ],
    "annotations": {"a": "b"},
    "windows": {"layerFolders": ["/l1", "/s"], "devices": [{"id": "X", "idType": "gpu"}],
                "network": {"networkNamespace": "ns", "other": 1}, "ignoreFlushesDuringBoot": True},
    "linux": {"cgroupsPath": "/c", "resources": {"pids": {"limit": 3}}},
    "hooks": {"prestart": [{"path": "/bin/true"}]},
    "vendorThing": {"nested": [None, True, 1.5]},
}


def test_round_trip_keeps_every_field_and_key_order() -> None:
    spec = Spec.from_json(json.loads(json.dumps(FULL)))
    out = spec.to_json()
    assert out == FULL
    assert json.dumps(out) == json.dumps(FULL)


def test_typed_access() -> None:
    spec = Spec.from_json(FULL)
    assert spec.root is not None and spec.root.path == "rootfs" and spec.root.readonly
    assert [m.destination for m in spec.mounts] == ["/proc", "/d", "/t"]
    assert spec.mounts[1].read_only and not spec.mounts[0].read_only
    assert spec.mounts[2].source == "" and spec.mounts[2].type == ""
    assert spec.windows is not None
    assert spec.windows.layer_folders == ("/l1", "/s")
    assert spec.windows.devices is not None and spec.windows.devices[0].id_type == "gpu"
    assert spec.windows.network_namespace == "ns"
    assert spec.linux == FULL["linux"] and spec.hooks == FULL["hooks"]
    assert spec.annotations == {"a": "b"}


def test_rewrite_changes_only_the_rewritten_fields() -> None:
    spec = Spec.from_json(FULL)
    m = replace(spec.mounts[1], source="/guest", type="none")
    new = replace(spec, mounts=(spec.mounts[0], m, spec.mounts[2]))
    out = new.to_json()
    assert out["mounts"][1] == {**FULL["mounts"][1], "source": "/guest", "type": "none"}
    assert spec.to_json() == FULL  # the original is untouched


def test_read_only_is_exactly_ro_case_insensitive() -> None:
    assert Mount(options=("RO",)).read_only
    assert not Mount(options=("readonly",)).read_only
    assert not Mount(options=("rw", "ro=1")).read_only


def test_go_repr() -> None:
    m = Mount(destination="/x", type="bind", source="/y", options=("rbind", "ro"))
    assert m.go_repr() == "{Destination:/x Type:bind Source:/y Options:[rbind ro]}"


@pytest.mark.parametrize(
    ("obj", "where", "what"),
    [
        ([], "(top level)", "expected an object, got an array"),
        ({"mounts": {}}, "mounts", "expected an array of mounts, got an object"),
        ({"mounts": [{"destination": 5}]}, "mounts[0].destination", "expected a string"),
        ({"mounts": [{}, "x"]}, "mounts[1]", "expected an object, got a string"),
        ({"mounts": [{"options": ["a", 1]}]}, "mounts[0].options[1]", "expected a string"),
        ({"root": {"path": 1}}, "root.path", "expected a string"),
        ({"root": {"readonly": "yes"}}, "root.readonly", "expected a boolean"),
        ({"root": []}, "root", "expected an object"),
        ({"annotations": {"k": 1}}, "annotations['k']", "expected a string"),
        ({"windows": {"layerFolders": "x"}}, "windows.layerFolders", "an array of strings"),
        ({"windows": {"devices": [{"id": 1}]}}, "windows.devices[0].id", "expected a string"),
        ({"windows": {"network": {"networkNamespace": []}}},
         "windows.network.networkNamespace", "expected a string"),
        ({"linux": 3}, "linux", "expected an object"),
    ],
)
def test_wrong_types_name_the_json_path(obj: object, where: str, what: str) -> None:
    with pytest.raises(SpecError) as info:
        Spec.from_json(obj)
    assert info.value.where == where
    assert what in info.value.message


def test_load_bundle_dir_and_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(FULL))
    assert load_spec(tmp_path).to_json() == FULL
    assert load_spec(tmp_path / "config.json").to_json() == FULL


def test_load_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.where == f"{tmp_path / 'config.json'}:3:3"
    assert "invalid JSON" in info.value.message


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.json")


def test_load_wrong_type_names_file_and_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"mounts": [{"source": 1}]}')
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: mounts[0].source: ")
