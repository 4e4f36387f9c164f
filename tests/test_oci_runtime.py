"""The runc command line without a VM: dispatch, parsing, state, and bad input (issue #6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from uvmshim import procscan
from uvmshim.cli.entry import is_runc_argv
from uvmshim.cli.runc_cmd import main as runc_main
from uvmshim.errors import UvmshimError
from uvmshim.runc import ops
from uvmshim.runc.state import ContainerDir, new_state


def runc(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        runc_main(list(argv))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.mark.parametrize(("argv", "runc_mode"), [
    (["--root", "/x", "state", "a"], True),
    (["--log=/l", "--log-format", "json", "create", "--bundle", "b", "id"], True),
    (["create", "--bundle", "b", "id"], True),
    (["--debug", "kill", "id", "9"], True),
    (["exec", "--process", "p", "id"], True),
    (["features"], True),
    (["run", "--rootfs", "r", "--", "sh"], False),
    (["--debug", "plan", "x"], False),
    (["leaks"], False),
    (["--version"], False),
    ([], False),
])
def test_dispatch(argv: list[str], runc_mode: bool) -> None:
    assert is_runc_argv(argv) is runc_mode


def test_signals() -> None:
    assert [ops.parse_signal(s) for s in ("9", "KILL", "SIGTERM", "usr1", "SIGRTMIN+1")] == \
        [9, 9, 15, 10, 35]
    for bad in ("0", "100", "NOPE", ""):
        with pytest.raises(UvmshimError):
            ops.parse_signal(bad)


@pytest.mark.parametrize("verb", [["state"], ["start"], ["kill"], ["delete"], ["pause"],
                                  ["resume"], ["ps"], ["exec", "--process", "/nonexistent"],
                                  ["events", "--stats"], ["events"]])
def test_unknown_id(tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: list[str]) -> None:
    code, out, err = runc(capsys, "--root", str(tmp_path), *verb, "nosuch")
    assert code == 1
    assert "does not exist" in err or "nosuch" in err or "process" in err
    assert out == ""


def test_delete_force_of_unknown_id_succeeds(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert runc(capsys, "--root", str(tmp_path), "delete", "--force", "nosuch")[0] == 0


def test_json_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.json"
    code, _, err = runc(capsys, "--root", str(tmp_path), "--log", str(log), "--log-format",
                        "json", "kill", "nosuch", "9")
    assert code == 1
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["level"] == "error" and "does not exist" in line["msg"] and "time" in line
    assert "does not exist" in err  # go-runc reads the output, as runc's fatal() writes both


def bundle(tmp_path: Path, config: str | Mapping[str, object] | None,
           rootfs: bool = True) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    if rootfs:
        (b / "rootfs").mkdir()
    if config is not None:
        (b / "config.json").write_text(config if isinstance(config, str) else
                                       json.dumps(config))
    return b


GOOD = {"ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/"}}


@pytest.mark.parametrize(("config", "rootfs", "message"), [
    ("{not json", True, "invalid JSON"),
    ({"root": {"path": 3}, "process": {"args": ["x"]}}, True, "root.path"),
    (GOOD, False, "does not exist"),
    ({**GOOD, "process": {"cwd": "/"}}, True, "process.args"),
    (None, True, "no such file"),
])
def test_create_bad_bundle_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          config: str | Mapping[str, object] | None, rootfs: bool,
                                          message: str) -> None:
    b = bundle(tmp_path, config, rootfs)
    root = tmp_path / "root"
    code, _, err = runc(capsys, "--root", str(root), "create", "--bundle", str(b),
                        "--pid-file", str(tmp_path / "pid"), "c1")
    assert code == 1 and message in err
    assert not (root / "containers" / "c1").exists()
    assert not (tmp_path / "pid").exists()


def test_create_same_id_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = bundle(tmp_path, GOOD)
    root = tmp_path / "root"
    ContainerDir.of(root, "c1").make()
    code, _, err = runc(capsys, "--root", str(root), "create", "--bundle", str(b), "c1")
    assert code == 1 and "container with id exists: c1" in err
    assert (root / "containers" / "c1").is_dir()  # the first one's state is untouched


def test_bad_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = runc(capsys, "--root", str(tmp_path), "state", "../x")
    assert code == 1 and "invalid container id" in err


def test_dead_shim_is_stopped_and_delete_cleans(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cdir = ContainerDir.of(tmp_path, "dead")
    cdir.make()
    proc = subprocess.Popen(["true"])
    proc.wait()
    state = new_state("dead", "/b", "/b/rootfs", {"a": "b"})
    state.update(status="running", pid=proc.pid, shim_start="1")
    cdir.write(state)
    code, out, _ = runc(capsys, "--root", str(tmp_path), "state", "dead")
    assert code == 0
    got = json.loads(out)
    assert got["status"] == "stopped" and got["pid"] == 0 and got["annotations"] == {"a": "b"}
    assert "vm_id" not in got
    code, out, _ = runc(capsys, "--root", str(tmp_path), "list", "--format", "json")
    assert [s["id"] for s in json.loads(out)] == ["dead"]
    code, _, err = runc(capsys, "--root", str(tmp_path), "kill", "dead", "9")
    assert code == 1 and "container not running" in err
    code, _, err = runc(capsys, "--root", str(tmp_path), "start", "dead")
    assert code == 1 and "stopped" in err
    assert runc(capsys, "--root", str(tmp_path), "delete", "dead")[0] == 0
    assert not cdir.exists()


def test_events_of_a_stopped_container_fail_as_runc(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cdir = ContainerDir.of(tmp_path, "gone")
    cdir.make()
    state = new_state("gone", "/b", "/b/rootfs", {})
    state.update(status="stopped")
    cdir.write(state)
    for argv in (["--stats"], [], ["--interval", "1s"]):
        code, out, err = runc(capsys, "--root", str(tmp_path), "events", *argv, "gone")
        assert (code, out) == (1, "") and "container with id gone is not running" in err, err
    for bad, message in (("0s", "duration interval must be greater than 0"),
                         ("soon", "invalid value 'soon' for flag -interval")):
        code, _, err = runc(capsys, "--root", str(tmp_path), "events", "--interval", bad, "gone")
        assert code == 1 and message in err, err


def test_stats_map_cgroup_v2_files_as_runc() -> None:
    from uvmshim.runc.stats import MAX_UINT64, parse_interval, runc_stats

    data = runc_stats({
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\n"
                    "nr_throttled 1\nthrottled_usec 20\n",
        "memory.current": "4096\n", "memory.max": "67108864\n", "memory.peak": "8192\n",
        "memory.stat": "anon 1024\nfile 2048\n", "memory.events": "low 0\nmax 2\noom_kill 1\n",
        "memory.swap.current": "0\n", "memory.swap.max": "max\n",
        "pids.current": "3\n", "pids.max": "max\n"})
    assert data["cpu"] == {"usage": {"total": 1500000, "user": 1000000, "kernel": 500000},
                           "throttling": {"periods": 4, "throttledPeriods": 1,
                                          "throttledTime": 20000}}
    mem = data["memory"]
    assert mem["usage"] == {"usage": 4096, "limit": 64 << 20, "max": 8192, "failcnt": 0}
    assert mem["swap"] == {"usage": 4096, "limit": MAX_UINT64, "failcnt": 0}
    assert mem["kernel"] == {"limit": 0, "failcnt": 0}
    assert (mem["cache"], mem["raw"]) == (2048, {"anon": 1024, "file": 2048})
    assert mem["event_count"] == {"max": 2, "oom_kill": 1}
    assert data["pids"] == {"current": 3}  # no limit: 0, left out as runc's omitempty
    assert runc_stats({"pids.current": "1", "pids.max": "20"})["pids"] == {"current": 1,
                                                                           "limit": 20}
    assert [parse_interval(t) for t in ("5s", "100ms", "1m30s", "2", "1.5s")] == \
        [5, 0.1, 90, 2, 1.5]
    for bad in ("", "5x", "s", "1s2"):
        with pytest.raises(ValueError):
            parse_interval(bad)


def test_spec_features_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runc(capsys, "spec", "--bundle", str(tmp_path))[0] == 0
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec["root"]["path"] == "rootfs" and spec["process"]["args"] == ["sh"]
    code, _, err = runc(capsys, "spec", "--bundle", str(tmp_path))
    assert code == 1 and "exists" in err
    code, out, _ = runc(capsys, "features")
    assert json.loads(out)["ociVersionMax"] == "1.0.2"
    code, out, _ = runc(capsys, "--version")
    assert out.startswith("uvmshim version ") and "spec: 1.0.2" in out


def test_console_script_is_fast_enough() -> None:
    """``state`` must not import asyncio, click or the QEMU code (podman calls us often)."""
    code = ("import sys; from uvmshim.cli.entry import is_runc_argv; "
            "from uvmshim.cli.runc_cmd import main\n"
            "try: main(['--root', '/nonexistent', 'state', 'x'])\n"
            "except SystemExit: pass\n"
            "bad = [m for m in ('asyncio', 'click', 'rich', 'qemu') if m in sys.modules]\n"
            "print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.stdout.strip() == ""


def test_host_namespace_path_fails_create(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A namespace path that is not another uvmshim container's is an error at ``create``
    (before any VM), naming the field; a network namespace path is left to networking."""
    from uvmshim.runc.namespaces import join_target
    from uvmshim.spec import Spec

    ns = [{"type": "ipc", "path": f"/proc/{os.getpid()}/ns/ipc"}, {"type": "pid"}]
    b = bundle(tmp_path, {**GOOD, "linux": {"namespaces": ns}})
    root = tmp_path / "root"
    code, _, err = runc(capsys, "--root", str(root), "create", "--bundle", str(b), "c1")
    assert code == 1 and "linux.namespaces[0].path" in err and "host namespace" in err
    assert not (root / "containers" / "c1").exists()
    net = Spec.from_json({**GOOD, "linux": {"namespaces": [
        {"type": "network", "path": "/run/netns/x"}]}})
    assert join_target(str(root), net) == (None, net)


def test_namespace_paths_of_a_container_join_it(tmp_path: Path) -> None:
    """``/proc/<shim pid>/ns/*`` of a live container (podman pods) → ``container://<id>``."""
    from uvmshim.runc.namespaces import join_target
    from uvmshim.spec import Spec

    cdir = ContainerDir.of(tmp_path, "infra")
    cdir.make()
    state = new_state("infra", "/b", "/b/rootfs", {})
    me = os.getpid()
    state.update(status="running", pid=me, shim_start=procscan.start_time(me))
    cdir.write(state)
    spec = Spec.from_json({**GOOD, "linux": {"namespaces": [
        {"type": "ipc", "path": f"/proc/{me}/ns/ipc"},
        {"type": "uts", "path": f"/proc/{me}/ns/uts"},
        {"type": "network", "path": f"/proc/{me}/ns/net"}, {"type": "mount"}]}})
    target, joined = join_target(str(tmp_path), spec)
    assert target == "infra"
    assert [n.get("path") for n in (joined.linux or {})["namespaces"]] == [
        "container://infra", "container://infra", "container://infra", None]


def test_exec_flags_build_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``exec ID CMD`` with runc's flags: the process object the guest's crun gets."""
    from uvmshim.cli import runc_cmd

    base = {"args": ["sh"], "cwd": "/", "env": ["A=1"], "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                             "permitted": ["CAP_CHOWN"]}}
    monkeypatch.setattr(ops, "container_process", lambda root, cid: json.loads(json.dumps(base)))
    args = runc_cmd._parser().parse_args([
        "exec", "--cwd", "/tmp", "-e", "B=2", "-u", "5:6", "-g", "7,8", "--cap", "net_admin",
        "-c", "CAP_CHOWN", "--no-new-privs", "--process-label", "lbl", "--apparmor", "prof",
        "c1", "id", "-u"])
    p = runc_cmd._exec_process(args)
    assert p["args"] == ["id", "-u"] and p["cwd"] == "/tmp" and p["env"] == ["A=1", "B=2"]
    assert p["user"] == {"uid": 5, "gid": 6, "additionalGids": [7, 8]}
    for name in ("bounding", "effective", "permitted"):
        assert p["capabilities"][name] == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    assert "ambient" not in p["capabilities"]  # no inheritable set: as runc
    assert p["noNewPrivileges"] is True
    assert (p["selinuxLabel"], p["apparmorProfile"]) == ("lbl", "prof")
    args = runc_cmd._parser().parse_args(["exec", "-g", "x", "c1", "true"])
    with pytest.raises(UvmshimError, match="additional-gids"):
        runc_cmd._exec_process(args)
