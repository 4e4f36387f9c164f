"""Containers in a real UVM (issue #4): output, exit status, mounts, pods, failures, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmsession import UvmSession, run_spec, run_to_end
from uvmshim.errors import UvmshimError
from uvmshim.runtime.container import Container
from uvmshim.runtime.leaks import find_holdings
from uvmshim.runtime.pod import Pod, pause_spec
from uvmshim.runtime.specgen import RunOptions, build_spec
from uvmshim.spec import Spec

from helpers import ext4

pytestmark = pytest.mark.vm

BUSYBOX_APPLETS = ["sh", "ls", "cat", "echo", "touch", "grep", "sleep", "mount", "id", "stat",
                   "true", "false", "wc", "df"]


def make_rootfs(path: Path) -> str:
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
        (path / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "/bin/busybox", str(path / "bin" / "busybox")], check=True)
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", path / "bin" / applet)
    return str(path)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rootfs(tmp_path_factory.mktemp("rootfs"))


GUEST_MOUNTS = "grep -E ' /run/(gcs|mounts|layers)' /proc/mounts || true"


@pytest.fixture(autouse=True)
def nothing_left(session: UvmSession) -> Iterator[None]:
    _, mounts_before, _ = session.sh(GUEST_MOUNTS)
    yield
    assert session.uvm.vm.inventory() == {"scsi": [], "plan9": [], "vpmem": [], "vpci": []}
    assert session.uvm.vm.owned == []
    _, mounts_after, _ = session.sh(GUEST_MOUNTS)
    assert mounts_after == mounts_before, "guest mounts changed"


def sh_spec(rootfs: str, script: str, **kw: object) -> Spec:
    return build_spec(RunOptions(args=["sh", "-c", script], rootfs=rootfs, **kw))  # type: ignore[arg-type]


def test_output_streams_and_exit_status(session: UvmSession, rootfs: str) -> None:
    code, out, err = run_spec(session, "c-exit", sh_spec(
        rootfs, "echo to-stdout; echo to-stderr >&2; exit 7"))
    assert (code, out, err) == (7, "to-stdout\n", "to-stderr\n")


def test_bind_mounts(session: UvmSession, rootfs: str, tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("dir file\n")
    (tmp_path / "single.txt").write_text("single file\n")
    (tmp_path / "not-shared.txt").write_text("sibling\n")
    spec = sh_spec(rootfs, "cat /data/a.txt /etc/single.txt; ls /etc; echo hi > /data/new.txt; "
                   "touch /etc/single.txt 2>/dev/null && echo WROTE || echo ro-refused; "
                   "touch /ro/x 2>/dev/null && echo WROTE || echo ro-refused",
                   volumes=[f"{d}:/data", f"{tmp_path}/single.txt:/etc/single.txt:ro",
                            f"{d}:/ro:ro"])
    code, out, err = run_spec(session, "c-bind", spec)
    assert code == 0, err
    assert out.splitlines() == ["dir file", "single file", "single.txt", "ro-refused",
                                "ro-refused"]
    assert (d / "new.txt").read_text() == "hi\n"


def test_virtual_disks(session: UvmSession, rootfs: str, tmp_path: Path) -> None:
    rw = ext4(tmp_path, "rw", {"f.txt": "rw disk\n"})
    ro = ext4(tmp_path, "ro", {"f.txt": "ro disk\n"})
    spec = sh_spec(rootfs, "cat /rw/f.txt /ro/f.txt; echo new > /rw/new.txt; "
                   "touch /ro/x 2>/dev/null && echo WROTE || echo ro-refused",
                   disks=[f"{rw}:/rw", f"{ro}:/ro:ro"])
    code, out, err = run_spec(session, "c-disk", spec)
    assert code == 0, err
    assert out.splitlines() == ["rw disk", "ro disk", "ro-refused"]
    got = subprocess.run(["debugfs", "-R", "cat /new.txt", rw], capture_output=True, text=True)
    assert got.stdout == "new\n"


def test_hugepages_mount_is_hugetlbfs_2m(session: UvmSession, rootfs: str) -> None:
    spec = sh_spec(rootfs, "grep ' /hp ' /proc/mounts", hugepages=["hp1:/hp"])
    code, out, err = run_spec(session, "c-huge", spec)
    assert code == 0, err
    assert out.split()[2] == "hugetlbfs" and "pagesize=2M" in out


def test_exec_and_signals(session: UvmSession, rootfs: str) -> None:
    spec = sh_spec(rootfs, "trap 'echo got-term; exit 3' TERM; while :; do sleep 1 & wait $!; done")
    c = Container(session.uvm.vm, session.uvm.agent, "c-exec", spec)

    async def go() -> tuple[int, str, str, str]:
        await c.create()
        try:
            out = bytearray()

            async def collect() -> None:
                async for _, data in c.output():
                    out.extend(data)

            relay = asyncio.create_task(collect())
            await c.start()
            proc = await c.exec({"args": ["sh", "-c", "echo from-exec; id -u"], "cwd": "/",
                                 "env": ["PATH=/bin"]})
            exec_out = bytearray()
            async for _, data in proc.output():
                exec_out.extend(data)
            exec_code = await proc.wait()
            await c.kill(signal.SIGTERM)
            code = await c.wait()
            await relay
            return code, out.decode(), exec_out.decode(), str(exec_code)
        finally:
            await c.delete()

    code, out, exec_out, exec_code = session.run(go())
    assert exec_out == "from-exec\n0\n" and exec_code == "0"
    assert code == 3 and out == "got-term\n"


def test_pod_shares_sandbox_mounts_and_one_disk(session: UvmSession, rootfs: str,
                                                tmp_path: Path) -> None:
    disk = ext4(tmp_path, "shared", {"f.txt": "shared disk\n"})
    pod = Pod(session.uvm, "pod1")

    async def go() -> tuple[tuple[int, str, str], tuple[int, str, str], int]:
        await pod.start_sandbox(pause_spec(rootfs))
        try:
            w1 = await pod.add_container("w1", sh_spec(
                rootfs, "echo from-w1 > /shared/msg; cat /disk/f.txt",
                sandbox_mounts=["shared:/shared"], disks=[f"{disk}:/disk:ro"]))
            w2 = await pod.add_container("w2", sh_spec(
                rootfs, "cat /shared/msg /disk/f.txt",
                sandbox_mounts=["shared:/shared"], disks=[f"{disk}:/disk:ro"]))
            attached = [a for a in session.uvm.vm.scsi.attachments() if a["host_path"] == disk]
            r1 = await run_to_end(w1)
            r2 = await run_to_end(w2)
            await pod.remove_container("w1")
            await pod.remove_container("w2")
            return r1, r2, len(attached)
        finally:
            await pod.stop()

    r1, r2, attachments = session.run(go())
    assert r1 == (0, "shared disk\n", "")
    assert r2 == (0, "from-w1\nshared disk\n", "")
    assert attachments == 1


def test_failed_create_leaves_nothing(session: UvmSession, rootfs: str, tmp_path: Path) -> None:
    ok = ext4(tmp_path, "ok", {"f": "x"})
    spec = sh_spec(rootfs, "true", volumes=[f"{tmp_path}:/a"],
                   disks=[f"{ok}:/ok", f"{tmp_path}/missing.img:/missing"])
    c = Container(session.uvm.vm, session.uvm.agent, "c-fail", spec)
    with pytest.raises(UvmshimError) as info:
        session.run(c.create())
    assert info.value.where == "mounts[9]"  # 7 defaults, the volume, then the disks
    assert "missing.img: no such file or directory" in str(info.value)


def test_run_cli_end_to_end(rootfs: str, tmp_path: Path) -> None:
    base = tmp_path / "vms"
    res = subprocess.run(
        ["uvmshim", "run", "--rootfs", rootfs, "--", "sh", "-c",
         "echo out; echo err >&2; exit 7"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "UVMSHIM_VM_DIR": str(base)})
    assert res.returncode == 7, res.stderr
    assert res.stdout == "out\n" and res.stderr == "err\n"
    held = find_holdings(base)
    assert held.vms == [] and held.qemu_pids == [] and list(base.iterdir()) == []


def test_run_cli_bad_input_is_a_clear_error(rootfs: str, tmp_path: Path) -> None:
    base = tmp_path / "vms"
    res = subprocess.run(
        ["uvmshim", "run", "--rootfs", rootfs, "--disk", f"{tmp_path}/nope.img:/d", "--",
         "true"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "UVMSHIM_VM_DIR": str(base)})
    assert res.returncode == 1
    assert "uvmshim: error: mounts[7]: adding SCSI virtual disk mount" in res.stderr
    assert "nope.img: no such file or directory" in res.stderr
    assert "Traceback" not in res.stderr
    held = find_holdings(base)
    assert held.vms == [] and held.qemu_pids == []


def test_pod_cli(rootfs: str, tmp_path: Path) -> None:
    env = {**os.environ, "UVMSHIM_VM_DIR": str(tmp_path / "vms"),
           "UVMSHIM_POD_DIR": str(tmp_path / "pods")}

    def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["uvmshim", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    created = uvmshim("pod", "create", "p1", "--rootfs", rootfs)
    try:
        assert created.returncode == 0, created.stderr
        first = uvmshim("pod", "run", "p1", "--sandbox-mount", "s:/s", "--",
                        "sh", "-c", "echo shared-data > /s/f")
        assert first.returncode == 0, first.stderr
        second = uvmshim("pod", "run", "p1", "--sandbox-mount", "s:/s", "--",
                         "sh", "-c", "cat /s/f; exit 4")
        assert (second.returncode, second.stdout) == (4, "shared-data\n")
        assert "running" in uvmshim("pod", "ls").stdout
    finally:
        stopped = uvmshim("pod", "stop", "p1")
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "pods" / "p1").exists()
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []


def test_physical_disk_passthrough(session: UvmSession, rootfs: str, tmp_path: Path) -> None:
    img = ext4(tmp_path, "pd", {"f.txt": "on a block device\n"})
    try:
        loop = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no loop device on this host: {err}")
    try:
        spec = build_spec(RunOptions(args=["sh", "-c", "cat /pd/f.txt; echo w > /pd/new"],
                                     rootfs=rootfs, physical_disks=[f"{loop}:/pd"]))
        code, out, stderr = run_spec(session, "c-pd", spec)
        assert (code, out) == (0, "on a block device\n"), stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    got = subprocess.run(["debugfs", "-R", "cat /new", img], capture_output=True, text=True)
    assert got.stdout == "w\n"
