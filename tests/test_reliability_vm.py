"""Issue 15 in real UVMs: live containers survive ``leaks --reclaim``, a SIGKILL at any point
of ``uvmshim run`` leaves nothing once the next command ran, Ctrl-C and SIGTERM during boot
return at once, crun's errors are labelled, specs without ``/dev`` run.

Every uvmshim directory is private to the test (environment overrides), so that ``gc`` and
``--reclaim`` can only touch what the test made.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_oci_clients import Runc, make_bundle, make_rootfs, wait_for
from uvmshim.uvm.qemu import mounts

from helpers import uvmshim_binary

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("rel") / "rootfs")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {**os.environ}
    for var, sub in (("UVMSHIM_OWNERS_DIR", "owners"), ("UVMSHIM_VM_DIR", "vm"),
                     ("UVMSHIM_ROOT", "root"), ("UVMSHIM_POD_DIR", "pods")):
        e[var] = str(tmp_path / sub)
    yield e
    subprocess.run([uvmshim_binary(), "gc"], env=e, capture_output=True, timeout=120)


def uvmshim(env: dict[str, str], *argv: str, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([uvmshim_binary(), *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def qemus_under(path: Path) -> list[int]:
    from uvmshim import procscan

    needle = os.fsencode(str(path))
    return [pid for pid, argv in procscan.command_lines()
            if any(b"qemu-system" in a for a in argv) and any(needle in a for a in argv)]


def nothing_left(tmp_path: Path) -> dict[str, object]:
    vm = tmp_path / "vm"
    left: dict[str, object] = {
        "vm_dirs": sorted(os.listdir(vm)) if vm.is_dir() else [],
        "qemus": qemus_under(tmp_path),
        "mounts": [m.mount_point for m in mounts.mounts_under(tmp_path)],
    }
    return {k: v for k, v in left.items() if v}


def test_live_runc_container_survives_leaks_reclaim(env: dict[str, str], tmp_path: Path,
                                                    rootfs: Path) -> None:
    runc = Runc(tmp_path / "root")
    bundle = make_bundle(tmp_path, rootfs, ["sh", "-c", "trap 'exit 0' TERM; "
                                                      "while :; do sleep 1; done"])
    try:
        runc("create", "--bundle", str(bundle), "c1", output=subprocess.DEVNULL)
        runc("start", "c1")
        assert runc.status("c1") == "running"
        res = uvmshim(env, "leaks", "--json", "--reclaim")
        assert json.loads(res.stdout)["empty"] is True, res.stdout
        res = uvmshim(env, "gc")
        assert res.returncode == 0, res.stderr
        assert runc.status("c1") == "running"
        assert runc("exec", "c1", "echo", "alive").stdout.strip() == "alive"
    finally:
        runc("delete", "--force", "c1", check=False)
    wait_for(lambda: not nothing_left(tmp_path), timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_boot_returns_within_a_second(env: dict[str, str], tmp_path: Path,
                                                    rootfs: Path, signum: int) -> None:
    # A cold boot (no template clone): seconds under TCG, before the agent ever answers.
    proc = subprocess.Popen([uvmshim_binary(), "run", "--rootfs", str(rootfs), "--", "true"],
                            env={**env, "UVMSHIM_NO_TEMPLATE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(qemus_under(tmp_path)) or proc.poll() is not None, timeout=120)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    print(f"{signal.Signals(signum).name} during boot: returned in {took:.2f} s")
    assert took < 1.0, err
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    assert nothing_left(tmp_path) == {}


def test_sigkill_at_random_points_leaves_nothing_after_the_next_command(
        env: dict[str, str], tmp_path: Path, rootfs: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    rng = random.Random(15)
    argv = [uvmshim_binary(), "run", "--rootfs", str(rootfs), "-v", f"{data}:/d",
            "-v", f"{data / 'f'}:/f:ro", "--", "sleep", "30"]
    # How long a run takes to get its container going, to spread the kills over it.
    t0 = time.monotonic()
    probe = subprocess.Popen([*argv[:-2], "true"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    probe.wait(timeout=300)
    span = time.monotonic() - t0
    killed_at = []
    for _ in range(10):
        delay = rng.uniform(0.05, span)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(round(delay, 2))
    print(f"killed at {killed_at} s (a run takes {span:.1f} s)")
    from uvmshim import owners

    dead = [j for j in owners.read_journals(tmp_path / "owners") if not j.live and j.entries]
    print(f"left behind: {sum(len(j.entries) for j in dead)} journal entries of "
          f"{len(dead)} killed runs; {nothing_left(tmp_path)}")
    assert dead, "the kills should have left something to reclaim"
    # QEMU dies with its owner; what else was left is reclaimed by the next command.
    res = uvmshim(env, "run", "--rootfs", str(rootfs), "--", "true")
    assert res.returncode == 0, res.stderr
    assert nothing_left(tmp_path) == {}
    res = uvmshim(env, "leaks", "--json")
    assert json.loads(res.stdout)["empty"] is True, res.stdout
    assert os.listdir(tmp_path / "owners") == [] if (tmp_path / "owners").exists() else True


def test_crun_errors_are_labelled_and_dev_is_added(env: dict[str, str], tmp_path: Path,
                                                   rootfs: Path) -> None:
    res = uvmshim(env, "run", "--rootfs", str(rootfs), "--", "/no/such/binary")
    assert res.returncode == 127, res.stderr
    assert "crun: " in res.stderr and "Traceback" not in res.stderr
    # A runc-valid spec without a /dev mount (crun alone would fail to mknod /dev/null).
    bundle = tmp_path / "nodev"
    bundle.mkdir()
    spec = {"ociVersion": "1.0.2", "root": {"path": str(rootfs)},
            "process": {"args": ["sh", "-c", "test -c /dev/null && echo ok"], "cwd": "/",
                        "env": ["PATH=/bin"]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    res = uvmshim(env, "run", "--bundle", str(bundle))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_run_and_plan_refuse_a_fifo_alike_without_booting(env: dict[str, str],
                                                          tmp_path: Path, rootfs: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    bundle = tmp_path / "b"
    bundle.mkdir()
    spec = {"ociVersion": "1.0.2", "root": {"path": str(rootfs)},
            "process": {"args": ["true"]}, "linux": {},
            "mounts": [{"destination": "/x", "type": "bind", "source": str(fifo)}]}
    (bundle / "config.json").write_text(json.dumps(spec))
    plan = uvmshim(env, "plan", str(bundle))
    run = uvmshim(env, "run", "--bundle", str(bundle), timeout=30)
    assert plan.returncode == run.returncode == 1
    line = plan.stderr.splitlines()[0]
    assert "is a FIFO" in line and line == run.stderr.splitlines()[0]
    assert not (tmp_path / "vm").exists() or os.listdir(tmp_path / "vm") == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
