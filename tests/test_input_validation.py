"""Every input path validated up front (issue 15, points 4, 6 and 7): no traceback on any
input, ``plan`` refuses what ``run`` would refuse with the same message, JSON limits, no
NaN in or out, relative paths against the bundle, ids and image names checked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from uvmshim.allocator import create_container_resources, linux_container_document
from uvmshim.errors import GuestError, SpecError, UvmshimError
from uvmshim.protocol.messages import ErrorKind
from uvmshim.spec import Spec, load_bundle, load_spec, parse_json
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles, make_spec, run, spec_json, write_bundle


def uvmshim(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvmshim", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stderr, res.stderr


@pytest.fixture
def host(tmp_path: Path) -> HostFiles:
    return HostFiles(tmp_path)


# JSON: depth, size, NUL, NaN ------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nest deeper than 64 levels"),
    ('{"a":' * 70 + "1" + "}" * 70, "nest deeper than 64 levels"),
    ('{"process": {"user": {"uid": NaN, "gid": 0}}}', "NaN is not valid JSON"),
    ('{"x": Infinity}', "Infinity is not valid JSON"),
    ('{"x": -Infinity}', "-Infinity is not valid JSON"),
    ('{"mounts": [{"destination": "/x", "type": "bind", "source": "/tmp\\u0000x"}]}',
     "mounts[0].source: a string must not contain a NUL character"),
    ('{"annotations": {"a\\u0000": "x"}}', "a key must not contain a NUL character"),
], ids=["deep-100000", "deep-70", "nan", "inf", "-inf", "nul", "nul-key"])
def test_bad_json_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert message in str(info.value)
    res = uvmshim("plan", str(tmp_path))
    assert res.returncode == 1 and message in res.stderr
    no_traceback(res)


def test_spec_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uvmshim import spec as spec_module

    monkeypatch.setattr(spec_module, "MAX_SPEC_BYTES", 1000)
    (tmp_path / "config.json").write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(SpecError, match="larger than"):
        load_spec(tmp_path)
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")  # never blocks: refused before reading
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(tmp_path)


@pytest.mark.parametrize("process, where", [
    ({"args": ["sh", 1]}, "process.args[1]"),
    ({"args": "sh -c x"}, "process.args"),
    ({"args": ["sh"], "env": [None]}, "process.env[0]"),
    ({"args": ["sh"], "user": {"uid": 1.5, "gid": 0}}, "process.user.uid"),
    ({"args": ["sh"], "user": {"uid": -1, "gid": 0}}, "process.user.uid"),
    ({"args": ["sh"], "user": {"uid": 0, "gid": 1 << 32}}, "process.user.gid"),
    ({"args": ["sh"], "user": {"uid": 0, "gid": 0, "additionalGids": ["1"]}},
     "process.user.additionalGids[0]"),
    ({"args": ["sh"], "terminal": "yes"}, "process.terminal"),
    ({"args": ["sh"], "cwd": 7}, "process.cwd"),
])
def test_process_fields_that_reach_crun_are_typed(process: dict[str, Any], where: str) -> None:
    with pytest.raises(SpecError) as info:
        Spec.from_json({"process": process})
    assert info.value.where == where


def test_plan_json_never_prints_nan(host: HostFiles, tmp_path: Path) -> None:
    from uvmshim.cli.main import dump_json

    with pytest.raises(ValueError):
        dump_json({"x": float("nan")})
    bundle = write_bundle(tmp_path / "b", spec_json(root_path=host.dir("r")))
    res = uvmshim("plan", str(bundle), "--json")
    assert res.returncode == 0, res.stderr
    assert "NaN" not in res.stdout and "Infinity" not in res.stdout
    parse_json(res.stdout)


# plan refuses what run refuses ----------------------------------------------------------------


def _special_files(tmp_path: Path) -> dict[str, str]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    return {"fifo": str(fifo), "socket": str(sock_path), "empty": str(empty)}


def _bad_specs(host: HostFiles, tmp_path: Path) -> list[tuple[dict[str, Any], str]]:
    f = _special_files(tmp_path)
    root = host.dir("rootfs")

    def bind(src: str) -> dict[str, Any]:
        return spec_json(root_path=root, mounts=[
            {"destination": "/x", "type": "bind", "source": src}])

    def disk(src: str) -> dict[str, Any]:
        return spec_json(root_path=root, mounts=[
            {"destination": "/x", "type": "virtual-disk", "source": src}])

    return [
        (bind(f["fifo"]), "is a FIFO: only directories and regular files can be shared"),
        (bind(f["socket"]), "is a socket: only directories and regular files"),
        (bind("/dev/null"), "is a character device: only directories and regular files"),
        (disk(host.dir("adir")), "is a directory, not a regular file"),
        (disk("/dev/null"), "is a character device, not a regular file"),
        (disk(f["empty"]), "disk image " + f["empty"] + " is empty"),
        (spec_json(root_path=host.file("rootfile")), "is not a directory"),
        (spec_json(root_path=str(tmp_path / "nope")), "does not exist"),
        (bind("sandbox:///../../etc"), "'.' and '..' are not allowed"),
        (bind("sandbox:///a/./b"), "'.' and '..' are not allowed"),
        (bind("hugepages://2M/../x"), "'.' and '..' are not allowed"),
    ]


def test_plan_refuses_what_run_refuses(host: HostFiles, tmp_path: Path) -> None:
    for i, (obj, message) in enumerate(_bad_specs(host, tmp_path)):
        spec = Spec.from_json(obj)
        vm, backend = simulated_uvm()
        with pytest.raises(UvmshimError) as info:
            run(create_container_resources(spec, vm, "c"))
        assert message in str(info.value), (i, str(info.value))
        assert backend.operations == [], "refused before any host or guest operation"
        bundle = write_bundle(tmp_path / f"b{i}", obj)
        res = uvmshim("plan", str(bundle))
        assert res.returncode == 1 and message in res.stderr, (i, res.stderr)
        no_traceback(res)


def test_no_uvm_plan_leaves_sources_alone(host: HostFiles, tmp_path: Path) -> None:
    spec = make_spec(root_path=host.dir("r"), mounts=[
        {"destination": "/x", "type": "bind", "source": "/dev/null"}])
    a = run(create_container_resources(spec, None, "c"))
    assert a.spec.to_json() == spec.to_json()


# relative paths against the bundle --------------------------------------------------------------


def test_relative_paths_resolve_against_the_bundle(host: HostFiles, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "data.img").write_bytes(b"\0" * 512)
    (bundle / "dir").mkdir()
    write_bundle(bundle, spec_json(root_path="rootfs", mounts=[
        {"destination": "/d", "type": "virtual-disk", "source": "data.img"},
        {"destination": "/b", "type": "bind", "source": "./dir"},
        {"destination": "/s", "type": "bind", "source": "sandbox:///s"},
        {"destination": "/t", "type": "tmpfs", "source": "tmpfs"},
    ]))
    spec = load_bundle(bundle)
    assert spec.root is not None and spec.root.path == str(bundle / "rootfs")
    assert [m.source for m in spec.mounts] == [
        str(bundle / "data.img"), str(bundle / "dir"), "sandbox:///s", "tmpfs"]
    # From another directory, plan finds the disk next to config.json, not in the cwd.
    res = uvmshim("plan", str(bundle / "config.json"), "--json", cwd=str(host.dir("else")))
    assert res.returncode == 0, res.stderr
    attach = [op for op in json.loads(res.stdout)["operations"] if op["op"] == "scsi-attach"]
    assert attach[0]["path"] == str(bundle / "data.img")


# the /dev mount runc and crun add -------------------------------------------------------------


def test_spec_without_dev_mount_gets_the_template_tmpfs(host: HostFiles) -> None:
    spec = make_spec(root_path=host.dir("r"), mounts=[
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts"}])
    doc = linux_container_document(spec, "/run/gcs/c/x", "")
    mounts = doc["OciSpecification"]["mounts"]
    assert mounts[0] == {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
    assert [m["destination"] for m in mounts[1:]] == ["/proc", "/dev/pts"]
    with_dev = make_spec(root_path=host.dir("r"), mounts=[
        {"destination": "/dev/", "type": "tmpfs", "source": "tmpfs", "options": ["size=1k"]}])
    doc = linux_container_document(with_dev, "/run/gcs/c/x", "")
    assert len(doc["OciSpecification"]["mounts"]) == 1


# the command lines ----------------------------------------------------------------------------


def test_run_unknown_option_is_a_usage_error(host: HostFiles) -> None:
    res = uvmshim("run", "--bogus", "--rootfs", host.dir("r"), "--", "true")
    assert res.returncode == 2 and "No such option '--bogus'" in res.stderr
    no_traceback(res)


def test_run_bad_name_is_refused(host: HostFiles) -> None:
    res = uvmshim("run", "--name", "../x", "--rootfs", host.dir("r"), "--", "true")
    assert res.returncode == 1 and "invalid container id format" in res.stderr
    no_traceback(res)


def test_run_memory_sizes(host: HostFiles, tmp_path: Path) -> None:
    """``--memory`` takes MiB or a unit; one that cannot hold the bundle's memory limit is
    refused before a UVM boots."""
    import click

    from uvmshim.cli.main import memory_option

    ctx = click.Context(click.Command("run"))
    param = click.Option(["--memory"])
    assert [memory_option(ctx, param, v) for v in ("300", "300m", "300M", "2g", "2GiB",
                                                   "512MB", None)] == \
        [300, 300, 300, 2048, 2048, 512, None]
    for bad in ("12x", "1.5g", "-1", "", "63"):
        with pytest.raises(click.BadParameter):
            memory_option(ctx, param, bad)
    bundle = tmp_path / "b"
    write_bundle(bundle, spec_json(root_path=host.dir("r")))
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["resources"] = {"memory": {"limit": 700 << 20}}
    (bundle / "config.json").write_text(json.dumps(config))
    res = uvmshim("run", "--memory", "300m", "--bundle", str(bundle))
    assert res.returncode == 1, res.stderr
    assert "uvmshim: error: --memory: a utility VM of 300 MiB cannot hold the container's " \
        "memory limit of 700 MiB" in res.stderr and "--memory 956" in res.stderr, res.stderr
    no_traceback(res)
    res = uvmshim("run", "--memory", "lots", "--bundle", str(bundle))
    assert res.returncode == 2 and "not a memory size" in res.stderr, res.stderr


@pytest.mark.parametrize("bad", ["a\n", "a\nb", "\n", "..", "a/b", "é", ""])
def test_runc_ids_are_checked_whole(bad: str) -> None:
    from uvmshim.runc.state import check_id

    with pytest.raises(UvmshimError, match="invalid container id format"):
        check_id(bad)
    check_id("ok-id_1.2+x")


@pytest.mark.parametrize("name", ["../../x", "/abs", "a//b", "a/./b", "x\ny", "-x", "a b"])
def test_image_import_name_is_checked(tmp_path: Path, name: str) -> None:
    res = uvmshim("image", "import", str(tmp_path), "--name", name)
    assert res.returncode == 1 and "invalid image name" in res.stderr, res.stderr
    no_traceback(res)


def test_crun_errors_exit_as_podman_does() -> None:
    from uvmshim.cli.main import exit_status

    def crun(reason: str) -> GuestError:
        return GuestError("container_start", ErrorKind.CRUN, reason)

    assert exit_status(crun("crun: executable file `nope` not found in $PATH")) == 127
    assert exit_status(crun("crun: open executable: Permission denied")) == 126
    assert exit_status(crun("crun: mount `/x` to `/y`: Invalid argument")) == 125
    assert exit_status(GuestError("mount_scsi", ErrorKind.FAILED, "x")) == 1
    assert exit_status(UvmshimError("x")) == 1


def test_crun_log_is_read_for_errors_only(tmp_path: Path) -> None:
    from uvmshim.agent.runtime import crun_error

    log = tmp_path / "crun.log"
    assert crun_error(str(log)) == ""
    log.write_text(json.dumps({"msg": "a warning", "level": "warning"}) + "\n"
                   + json.dumps({"msg": "executable file `x` not found", "level": "error"})
                   + "\n")
    assert crun_error(str(log)) == "executable file `x` not found"
