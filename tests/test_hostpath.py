"""Host directories (:mod:`uvmshim.hostpath`), ``/proc`` inspection (:mod:`uvmshim.procscan`),
the process runner (:mod:`uvmshim.tools`) and ``uvmshim leaks`` looking wherever they point.

No VM: the leak inventory is checked against real directories, mounts and processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from uvmshim import hostpath, procscan, tools
from uvmshim.cli.leaks_cmd import leaks_command
from uvmshim.errors import ToolError, UvmshimError
from uvmshim.runtime.leaks import Holdings, find_holdings, reclaim_all
from uvmshim.uvm.qemu.mounts import bind_mount, mounts_under, unmount

_OVERRIDES = (hostpath.ROOT_ENV, hostpath.VM_DIR_ENV, hostpath.POD_DIR_ENV,
              hostpath.IMAGE_ROOT_ENV, "XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def no_overrides(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def non_root(no_overrides: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Act as uid 12345 with ``tmp_path`` as the temporary directory; return it."""
    no_overrides.setattr(os, "geteuid", lambda: 12345)
    no_overrides.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


# Section: hostpath


def test_defaults_as_root(no_overrides: pytest.MonkeyPatch) -> None:
    no_overrides.setattr(os, "geteuid", lambda: 0)
    no_overrides.setenv("HOME", "/home/x")
    assert hostpath.runtime_root() == Path("/run/uvmshim")
    assert hostpath.containers_dir() == Path("/run/uvmshim/containers")
    assert hostpath.vm_dir() == Path("/run/uvmshim/vm")
    assert hostpath.kvm_probe_cache() == Path("/run/uvmshim/kvm-probe.json")
    assert hostpath.pods_dir() == Path("/run/uvmshim/pods")
    assert hostpath.pod_dir("web") == Path("/run/uvmshim/pods/web")
    assert hostpath.scratch_dir() == Path("/run/uvmshim/scratch")
    assert hostpath.image_store_dir() == Path("/var/lib/uvmshim/images")
    assert hostpath.cache_dir() == Path("/home/x/.cache/uvmshim")
    assert hostpath.transient_dirs() == [Path("/run/uvmshim/scratch"), Path("/run/uvmshim/pods"),
                                         Path("/run/uvmshim/containers")]


def test_defaults_as_a_user(non_root: Path, no_overrides: pytest.MonkeyPatch) -> None:
    no_overrides.setenv("HOME", "/home/x")
    assert hostpath.vm_dir() == Path("/tmp/uvmshim-12345/vm")
    xdg = non_root / "xdg"
    xdg.mkdir()
    no_overrides.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert hostpath.vm_dir() == xdg / "uvmshim" / "vm"
    assert hostpath.kvm_probe_cache() == xdg / "uvmshim" / "kvm-probe.json"
    assert hostpath.scratch_dir() == non_root / "uvmshim-12345-scratch"
    assert hostpath.image_store_dir() == Path("/home/x/.local/share/uvmshim/images")
    no_overrides.setenv("XDG_DATA_HOME", "/data")
    assert hostpath.image_store_dir() == Path("/data/uvmshim/images")


def test_overrides_apply_when_set(no_overrides: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, sub in ((hostpath.ROOT_ENV, "root"), (hostpath.VM_DIR_ENV, "vm"),
                      (hostpath.POD_DIR_ENV, "pods"), (hostpath.IMAGE_ROOT_ENV, "images"),
                      ("XDG_CACHE_HOME", "cache")):
        no_overrides.setenv(name, str(tmp_path / sub))
    assert hostpath.runtime_root() == tmp_path / "root"
    assert hostpath.containers_dir() == tmp_path / "root" / "containers"
    assert hostpath.containers_dir(tmp_path / "other") == tmp_path / "other" / "containers"
    assert hostpath.vm_dir() == tmp_path / "vm"
    assert hostpath.pod_dir("p") == tmp_path / "pods" / "p"
    assert hostpath.image_store_dir() == tmp_path / "images"
    assert hostpath.cache_dir() == tmp_path / "cache" / "uvmshim"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_bad_pod_names(name: str) -> None:
    with pytest.raises(UvmshimError, match="bad pod name"):
        hostpath.pod_dir(name)


# Section: leaks looks wherever hostpath points


def _cli_state_dirs(*args: str) -> list[str]:
    """``state_dirs`` of ``uvmshim leaks --json ARGS`` (other sessions' entries included)."""
    res = CliRunner().invoke(leaks_command, ["--json", *args])
    assert res.exit_code in (0, 1), res.output
    found = json.loads(res.output)["state_dirs"]
    assert isinstance(found, list)
    return [str(d) for d in found]


def test_leaks_sees_a_non_default_runtime_root(tmp_path: Path) -> None:
    left = hostpath.containers_dir(tmp_path / "root") / "ctr1"
    left.mkdir(parents=True)
    held = find_holdings(tmp_path / "vm", root=tmp_path / "root")
    assert str(left) in held.state_dirs and not held.empty
    assert str(left) in _cli_state_dirs("--root", str(tmp_path / "root"))
    assert str(left) not in find_holdings(tmp_path / "vm").state_dirs


def test_leaks_sees_the_runtime_root_of_the_environment(
    no_overrides: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_overrides.setenv(hostpath.ROOT_ENV, str(tmp_path / "root"))
    left = tmp_path / "root" / "containers" / "ctr1"
    left.mkdir(parents=True)
    assert str(left) in find_holdings(tmp_path / "vm").state_dirs
    assert str(left) in _cli_state_dirs()


def test_leaks_sees_and_reclaims_a_pod_dir_override(
    no_overrides: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    no_overrides.setenv(hostpath.POD_DIR_ENV, str(tmp_path / "pods"))
    pod = hostpath.pod_dir("web")
    (pod / "rootfs").mkdir(parents=True)
    source = tmp_path / "source"
    source.mkdir()
    bind_mount(source, pod / "rootfs", read_only=True)
    try:
        held = find_holdings(tmp_path / "vm", root=tmp_path / "root")
        assert str(pod) in held.state_dirs
        assert str(pod / "rootfs") in held.mounts
        assert str(pod) in _cli_state_dirs()
        # Reclaim only what this test made: other sessions may be running on this host.
        mine = Holdings(state_dirs=[d for d in held.state_dirs if d.startswith(str(tmp_path))])
        assert reclaim_all(mine) == [f"removed {pod}"]
        assert not pod.exists() and source.is_dir()
        again = find_holdings(tmp_path / "vm", root=tmp_path / "root")
        assert not [p for p in again.state_dirs + again.mounts if p.startswith(str(tmp_path))]
    finally:
        for m in mounts_under(tmp_path):
            unmount(m.mount_point)


def test_leaks_sees_a_users_scratch_dir(non_root: Path, no_overrides: pytest.MonkeyPatch) -> None:
    no_overrides.setenv(hostpath.POD_DIR_ENV, str(non_root / "pods"))
    scratch = non_root / "uvmshim-12345-scratch" / "ctr1"
    scratch.mkdir(parents=True)
    held = find_holdings(non_root / "vm", root=non_root / "root")
    assert held.state_dirs == [str(scratch)]


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A process whose argv looks like one of our QEMUs: it names ``<base>/<vm>/share``."""
    base = tmp_path / "vm"
    (base / "vm1").mkdir(parents=True)
    # One process, no child: a shell's child would carry the same argv between fork and exec.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "qemu-system-x86_64", f"local,path={base}/vm1/share"])
    try:
        yield proc.pid, base
    finally:
        proc.kill()
        proc.wait()


def test_leaks_finds_qemu_by_its_command_line(fake_qemu: tuple[int, Path]) -> None:
    pid, base = fake_qemu
    held = find_holdings(base, root=base.parent / "root")
    assert held.qemu_pids == [pid]
    (vm,) = held.vms
    assert vm.state_dir.name == "vm1" and vm.live_pid == pid


# Section: procscan


def test_start_time_tells_a_live_process_from_a_dead_one() -> None:
    assert procscan.start_time(os.getpid()) is not None
    assert procscan.state(os.getpid()) == "R"
    assert not procscan.exited(os.getpid())
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while procscan.state(child.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procscan.start_time(child.pid) is None  # a zombie has exited
    assert procscan.exited(child.pid)
    child.wait()
    assert procscan.state(child.pid) is None and procscan.exited(child.pid)


def test_command_lines_and_open_fds(fake_qemu: tuple[int, Path]) -> None:
    pid, _ = fake_qemu
    argvs = dict(procscan.command_lines())
    assert argvs[pid][:3] == [sys.executable.encode(), b"-c", b"import time; time.sleep(60)"]
    assert os.getpid() not in argvs
    assert procscan.cmdline(pid) == argvs[pid]
    assert procscan.cmdline(2**22 + 1) is None
    r, w = os.pipe()
    try:
        assert {r, w} <= set(procscan.open_fds())
    finally:
        os.close(r)
        os.close(w)


# Section: run


def test_start_and_running_report_a_missing_program() -> None:
    with pytest.raises(ToolError, match="command not found") as err:
        tools.start(["uvmshim-no-such-program"], missing_hint="install it")
    assert err.value.returncode == 127 and err.value.hint == "install it"

    async def main() -> None:
        async with tools.running(["uvmshim-no-such-program"]):
            pass

    with pytest.raises(ToolError, match="command not found"):
        asyncio.run(main())


def test_running_kills_and_reaps_on_the_way_out() -> None:
    async def main() -> int | None:
        async with tools.running([sys.executable, "-c", "print('up', flush=True); input()"],
                               stdout=tools.PIPE) as proc:
            assert proc.stdout is not None
            assert await proc.stdout.readline() == b"up\n"
        return proc.returncode

    assert asyncio.run(main()) == -9


def test_start_hands_the_process_over(tmp_path: Path) -> None:
    with open(tmp_path / "log", "wb") as log:
        proc = tools.start(["sh", "-c", "echo out; echo err >&2"], stdout=log, stderr=log,
                         new_session=True)
    assert proc.wait() == 0
    assert sorted((tmp_path / "log").read_text().split()) == ["err", "out"]
