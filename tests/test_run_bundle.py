"""``uvmshim run --bundle`` on real UVMs (issue #10): the bundle's OCI hooks run as in the runc
path (uvmshim.runtime.hooks), and the UVM is sized from the spec (uvmshim.uvm.sizing).

Each test checks afterwards that nothing is left: no VM directory, no QEMU process.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from uvmshim.runtime.leaks import find_holdings

from helpers import busybox_rootfs, uvmshim_binary

pytestmark = pytest.mark.vm

APPLETS = ["sh", "echo", "cat", "grep"]


def make_bundle(tmp: Path, args: list[str], resources: dict[str, object] | None = None,
                **extra: object) -> Path:
    """A bundle with a busybox root of its own (the guest hooks write into it)."""
    rootfs = busybox_rootfs(tmp / "rootfs", dirs=("bin", "proc", "sys", "dev", "etc", "tmp"),
                            applets=APPLETS, files={})
    b = tmp / "bundle"
    b.mkdir()
    subprocess.run([uvmshim_binary(), "spec", "--bundle", str(b)], check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["process"]["args"] = args
    spec["process"]["terminal"] = False
    if resources is not None:
        spec["linux"]["resources"] = resources
    spec.update(extra)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def run(tmp: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``uvmshim run ARGV`` with its own VM directory; the result and the run's pid."""
    env = {**os.environ, "UVMSHIM_VM_DIR": str(tmp / "vms")}
    proc = subprocess.Popen([uvmshim_binary(), "run", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert "Traceback" not in err, err
    held = find_holdings(tmp / "vms")
    assert held.vms == [] and held.qemu_pids == [], held.as_dict()
    return res, proc.pid


def test_run_bundle_runs_its_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prestart, createRuntime (after create), poststart (after start), poststop (once all is
    gone) on the host with the OCI state; createContainer/startContainer in the guest; a
    failing createRuntime fails the run and leaves nothing; a failing poststart fails it, a
    failing poststop is a warning."""
    d = tmp_path / "hooks"
    d.mkdir()

    def host(name: str, fail: int = 0) -> dict[str, object]:
        script = f'cat > {d}/{name}.json; echo "$WHO" >> {d}/order; exit {fail}'
        return {"path": "/bin/sh", "args": ["sh", "-c", script], "env": [f"WHO={name}"],
                "timeout": 30}

    # createContainer runs before pivot_root: it finds the root through the state's bundle
    to_root = ('s=$(cat); b=${s#*\\"bundle\\":\\"}; b=${b%%\\"*}; '
               'echo "$s" > "$b/rootfs/cc.json"')
    hooks: dict[str, list[dict[str, object]]] = {
        name: [host(name)] for name in ("prestart", "createRuntime", "poststart", "poststop")}
    hooks["createContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", to_root]}]
    hooks["startContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /sc.json"]}]
    b = make_bundle(tmp_path, ["sh", "-c", "cat /cc.json; echo; cat /sc.json"],
                    hooks=hooks, annotations={"k": "v"})
    monkeypatch.chdir(tmp_path)  # a relative --bundle: the hooks get it absolute
    res, pid = run(tmp_path, "--name", "hooks1", "--bundle", "bundle")
    assert res.returncode == 0, res.stderr
    assert (d / "order").read_text().split() == ["prestart", "createRuntime", "poststart",
                                                  "poststop"]
    for name, status in (("prestart", "creating"), ("createRuntime", "creating"),
                         ("poststart", "running"), ("poststop", "stopped")):
        st = json.loads((d / f"{name}.json").read_text())
        assert st == {"ociVersion": st["ociVersion"], "id": "hooks1", "status": status,
                      "pid": pid, "bundle": str(b), "annotations": {"k": "v"}}, name
    guest = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    # crun's state, in the guest (crun says "starting" for startContainer)
    assert [g["status"] for g in guest] == ["created", "starting"], res.stdout
    assert all(g["id"] == "hooks1" for g in guest)

    config = json.loads((b / "config.json").read_text())
    (d / "order").unlink()
    config["hooks"] = {"createRuntime": [{"path": "/bin/sh",
                                          "args": ["sh", "-c", "echo nope >&2; exit 7"]}],
                       "poststop": [host("poststop")]}
    (b / "config.json").write_text(json.dumps(config))
    res, _ = run(tmp_path, "--bundle", str(b))
    assert res.returncode == 1, res.stderr
    assert "uvmshim: error: error running createRuntime hook #0 (/bin/sh): exit status 7, " \
        "stderr: nope" in res.stderr, res.stderr
    assert not (d / "order").exists()  # not created: no poststop (as the runc path)

    config["hooks"] = {"poststart": [host("poststart", fail=3)],
                       "poststop": [host("poststop", fail=4)]}
    config["process"]["args"] = ["sh", "-c", "while :; do sleep 1; done"]
    (b / "config.json").write_text(json.dumps(config))
    res, _ = run(tmp_path, "--bundle", str(b))
    assert res.returncode == 1, res.stderr
    assert "error: error running poststart hook #0 (/bin/sh): exit status 3" in res.stderr
    assert "uvmshim: warning: error running poststop hook #0 (/bin/sh): exit status 4" \
        in res.stderr, res.stderr
    assert (d / "order").read_text().split() == ["poststart", "poststop"]


def test_run_bundle_sizes_the_uvm_from_its_memory_limit(tmp_path: Path) -> None:
    """A 700 MiB limit + the guest's 256 MiB: the 1024 MiB class (the default is 512 MiB)."""
    b = make_bundle(tmp_path, ["grep", "MemTotal", "/proc/meminfo"],
                    resources={"memory": {"limit": 700 << 20}})
    res, _ = run(tmp_path, "--no-template", "--bundle", str(b))
    assert res.returncode == 0, res.stderr
    kib = int(res.stdout.split()[1])
    assert 900 << 10 < kib <= 1024 << 10, res.stdout
