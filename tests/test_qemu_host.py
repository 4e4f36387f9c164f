"""Host side of the QEMU backend without a VM: image formats, bind-mount shares, leak inventory.

The share tests make real bind mounts and need root; the format tests need ``qemu-img``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmshim.errors import BackendError
from uvmshim.uvm.qemu import QemuConfig, QemuHostBackend, QemuMachine, list_leftovers
from uvmshim.uvm.qemu.host import detect_image_format, scsi_wwn
from uvmshim.uvm.qemu.kvm import probe_kvm
from uvmshim.uvm.qemu.machine import _proc_start_time, create_state_dir, remove_state_dir
from uvmshim.uvm.qemu.mounts import bind_mount, mounts_under, read_mountinfo, unmount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
needs_qemu_img = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img is missing")


# Section: image formats


@needs_qemu_img
@pytest.mark.parametrize(
    ("fmt", "options", "expected"),
    [
        ("raw", [], "raw"),
        ("qcow2", [], "qcow2"),
        ("vpc", [], "vpc"),  # dynamic VHD: footer copy at offset 0 and at the end
        ("vpc", ["-o", "subformat=fixed"], "vpc"),  # fixed VHD: footer only at the end
        ("vhdx", [], "vhdx"),
    ],
)
def test_detect_image_format(tmp_path: Path, fmt: str, options: list[str], expected: str) -> None:
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(img), "8M"], check=True)
    assert detect_image_format(img) == expected


def test_detect_image_format_edge_cases(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"QF")
    assert detect_image_format(tiny) == "raw"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert detect_image_format(empty) == "raw"
    # An ext4 image that merely *contains* a magic somewhere else is still raw.
    tricky = tmp_path / "tricky"
    tricky.write_bytes(b"\0" * 4096 + b"QFI\xfbvhdxfileconectix" + b"\0" * 4096)
    assert detect_image_format(tricky) == "raw"
    with pytest.raises(BackendError, match="cannot read disk image"):
        detect_image_format(tmp_path / "missing")


def test_scsi_wwn_is_deterministic_naa5() -> None:
    assert scsi_wwn(1, 2) == 0x5525400000010002
    assert scsi_wwn(3, 16383) >> 60 == 5
    assert len({scsi_wwn(c, lun) for c in range(4) for lun in range(64)}) == 256


# Section: shares (bind mounts, no VM)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[QemuMachine]:
    """A machine whose state directory exists (export root mounted) but no QEMU runs."""
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    cfg = QemuConfig(kernel=Path("/none"), initrd=Path("/none"), base_dir=tmp_path / "vm")
    vm = QemuMachine(cfg, vm_id="hosttest")
    create_state_dir(vm.paths)
    try:
        yield vm
    finally:
        problems = remove_state_dir(vm.paths)
        assert not problems
        assert not vm.state_dir.exists()
        assert not mounts_under(tmp_path)


@pytest.fixture
def trees(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    (host / "dir" / "sub").mkdir(parents=True)
    (host / "dir" / "a.txt").write_text("a\n")
    (host / "dir" / "sub" / "b.txt").write_text("b\n")
    (host / "files").mkdir()
    (host / "files" / "allowed.conf").write_text("allowed\n")
    (host / "files" / "other.conf").write_text("other\n")
    (host / "files" / "secret.key").write_text("secret\n")
    return host


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_export_root_is_read_only(machine: QemuMachine) -> None:
    share = machine.paths.share_dir
    entry = next(m for m in read_mountinfo() if m.mount_point == os.fspath(share))
    assert entry.read_only and "nosuid" in entry.options and "nodev" in entry.options
    with pytest.raises(OSError) as info:
        (share / "planted").mkdir()
    assert info.value.errno == errno.EROFS
    assert os.stat(machine.state_dir).st_mode & 0o777 == 0o700


@needs_root
def test_directory_share_rw_and_ro(machine: QemuMachine, trees: Path) -> None:
    share = machine.paths.share_dir
    host = QemuHostBackend(machine)

    async def main() -> None:
        await host.plan9_add("rw", str(trees / "dir"), read_only=False, allowed_files=())
        await host.plan9_add("ro", str(trees / "dir"), read_only=True, allowed_files=())
        assert (share / "rw" / "sub" / "b.txt").read_text() == "b\n"
        (share / "rw" / "new.txt").write_text("new\n")
        assert (trees / "dir" / "new.txt").read_text() == "new\n"
        # Read-only is enforced by the host kernel, even for root.
        with pytest.raises(OSError) as info:
            (share / "ro" / "x").write_text("x")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError):
            (share / "ro" / "a.txt").unlink()
        opts = {m.mount_point: m.options for m in mounts_under(share)}
        assert "ro" in opts[os.fspath(share / "ro")]
        assert "rw" in opts[os.fspath(share / "rw")]
        for o in opts.values():
            assert "nosuid" in o and "nodev" in o
        await host.plan9_remove("rw")
        await host.plan9_remove("ro")
        assert [m.mount_point for m in mounts_under(share)] == [os.fspath(share)]
        assert os.listdir(machine.paths.exports_dir) == []
        assert (trees / "dir" / "a.txt").exists()  # the host tree is untouched

    _run(main())


@needs_root
def test_single_file_share_exposes_only_that_file(machine: QemuMachine, trees: Path) -> None:
    share = machine.paths.share_dir
    host = QemuHostBackend(machine)

    async def main() -> None:
        files = str(trees / "files")
        await host.plan9_add("one", files, read_only=True, allowed_files=["allowed.conf"])
        await host.plan9_add(
            "two", files, read_only=False, allowed_files=["allowed.conf", "other.conf"]
        )
        assert os.listdir(share / "one") == ["allowed.conf"]
        assert sorted(os.listdir(share / "two")) == ["allowed.conf", "other.conf"]
        assert (share / "one" / "allowed.conf").read_text() == "allowed\n"
        with pytest.raises(OSError) as info:
            (share / "one" / "allowed.conf").write_text("changed")
        assert info.value.errno == errno.EROFS
        # Writable single-file share: the file is writable, its directory is not.
        (share / "two" / "other.conf").write_text("changed\n")
        assert (trees / "files" / "other.conf").read_text() == "changed\n"
        with pytest.raises(OSError) as info:
            (share / "two" / "secret.key").write_text("x")
        assert info.value.errno == errno.EROFS
        await host.plan9_remove("one")
        await host.plan9_remove("two")
        assert [m.mount_point for m in mounts_under(share)] == [os.fspath(share)]
        assert os.listdir(machine.paths.exports_dir) == []
        assert sorted(os.listdir(trees / "files")) == ["allowed.conf", "other.conf", "secret.key"]

    _run(main())


@needs_root
def test_share_errors_leave_nothing_behind(machine: QemuMachine, trees: Path) -> None:
    share = machine.paths.share_dir
    host = QemuHostBackend(machine)

    async def main() -> None:
        for bad in ("", ".", "..", "a/b", "x" * 201):
            with pytest.raises(BackendError, match="not a plain file name"):
                await host.plan9_add(bad, str(trees / "dir"), read_only=True, allowed_files=())
        with pytest.raises(BackendError, match="not a plain file name"):
            await host.plan9_add("s", str(trees / "files"), read_only=True, allowed_files=["../x"])
        with pytest.raises(BackendError, match="not a directory"):
            await host.plan9_add("s", str(trees / "files" / "allowed.conf"), read_only=True,
                                 allowed_files=())  # fmt: skip
        with pytest.raises(BackendError, match="not a directory"):
            await host.plan9_add("s", str(trees / "missing"), read_only=True, allowed_files=())
        # The second file is missing: the first bind is rolled back.
        with pytest.raises(BackendError, match=r"missing\.conf is not a file"):
            await host.plan9_add(
                "s", str(trees / "files"), read_only=True,
                allowed_files=["allowed.conf", "missing.conf"],
            )  # fmt: skip
        with pytest.raises(BackendError, match="sub is not a file"):
            await host.plan9_add("s", str(trees / "dir"), read_only=True, allowed_files=["sub"])
        assert [m.mount_point for m in mounts_under(share)] == [os.fspath(share)]
        assert os.listdir(machine.paths.exports_dir) == []
        with pytest.raises(BackendError, match="no share named"):
            await host.plan9_remove("s")
        await host.plan9_add("s", str(trees / "dir"), read_only=True, allowed_files=())
        with pytest.raises(BackendError, match="already exists"):
            await host.plan9_add("s", str(trees / "dir"), read_only=True, allowed_files=())
        await host.plan9_remove("s")

    _run(main())


@needs_root
def test_busy_share_is_lazily_unmounted(machine: QemuMachine, trees: Path) -> None:
    share = machine.paths.share_dir
    host = QemuHostBackend(machine)

    async def main() -> None:
        await host.plan9_add("busy", str(trees / "dir"), read_only=False, allowed_files=())
        cwd = os.getcwd()
        os.chdir(share / "busy" / "sub")  # makes a plain umount fail with EBUSY
        try:
            await host.plan9_remove("busy")
        finally:
            os.chdir(cwd)
        assert [m.mount_point for m in mounts_under(share)] == [os.fspath(share)]

    _run(main())


@needs_root
def test_remove_state_dir_unmounts_leftover_shares(tmp_path: Path, trees: Path) -> None:
    cfg = QemuConfig(kernel=Path("/x"), initrd=Path("/x"), base_dir=tmp_path / "vm")
    vm = QemuMachine(cfg, vm_id="leaky")
    create_state_dir(vm.paths)
    host = QemuHostBackend(vm)

    async def main() -> None:
        await host.plan9_add("a", str(trees / "dir"), read_only=True, allowed_files=())
        files = str(trees / "files")
        await host.plan9_add("b", files, read_only=True, allowed_files=["allowed.conf"])

    _run(main())
    vm.paths.pid_file.write_text(f"{os.getpid()} {_proc_start_time(os.getpid())}\n")
    (left,) = list_leftovers(tmp_path / "vm")
    assert left.state_dir == vm.state_dir and left.live_pid == os.getpid()
    assert sorted(left.mounts) == sorted(
        os.fspath(p) for p in (vm.paths.share_dir, vm.paths.share_dir / "a",
                               vm.paths.share_dir / "b" / "allowed.conf")
    )  # fmt: skip
    assert remove_state_dir(vm.paths) == []
    assert list_leftovers(tmp_path / "vm") == []
    assert (trees / "dir" / "a.txt").exists() and (trees / "files" / "secret.key").exists()


@needs_root
def test_list_leftovers_dead_pid_and_orphan_mount(tmp_path: Path, trees: Path) -> None:
    base = tmp_path / "vm"
    (base / "dead").mkdir(parents=True)
    (base / "dead" / "qemu.pid").write_text("999999999 1\n")
    (base / "orphan").mkdir()
    bind_mount(trees / "dir", base / "orphan", read_only=True)
    try:
        found = {x.state_dir.name: x for x in list_leftovers(base)}
        assert found["dead"].live_pid is None and found["dead"].mounts == []
        assert found["orphan"].mounts == [os.fspath(base / "orphan")]
        assert found["orphan"].as_dict()["mounts"] == [os.fspath(base / "orphan")]
    finally:
        unmount(base / "orphan")
    assert list_leftovers(tmp_path / "nothing-here") == []


def test_scsi_argument_checks_need_no_vm(tmp_path: Path) -> None:
    cfg = QemuConfig(kernel=Path("/x"), initrd=Path("/x"), base_dir=tmp_path, scsi_controllers=2)
    host = QemuHostBackend(QemuMachine(cfg))

    async def main() -> None:
        with pytest.raises(BackendError, match="controller 2 does not exist"):
            await host.scsi_attach(2, 0, "/x", read_only=True, passthrough=False)
        with pytest.raises(BackendError, match="out of range"):
            await host.scsi_attach(0, 16384, "/x", read_only=True, passthrough=False)
        with pytest.raises(BackendError, match="No such file"):
            missing = str(tmp_path / "missing")
            await host.scsi_attach(0, 0, missing, read_only=True, passthrough=False)
        with pytest.raises(BackendError, match="not a regular file"):
            await host.scsi_attach(0, 0, str(tmp_path), read_only=True, passthrough=False)
        with pytest.raises(BackendError, match="not a host block device"):
            await host.scsi_attach(0, 0, str(tmp_path), read_only=True, passthrough=True)
        with pytest.raises(BackendError, match="no disk is attached"):
            await host.scsi_detach(0, 0)
        with pytest.raises(BackendError, match="vPMEM is not enabled"):
            await host.vpmem_add(0, "/x")
        with pytest.raises(BackendError, match="no vPCI device"):
            await host.vpci_remove("nope")

    asyncio.run(main())


@pytest.mark.skipif(
    Path("/sys/bus/pci/drivers/vfio-pci").is_dir(), reason="this host has VFIO"
)
def test_vpci_refused_without_vfio(tmp_path: Path) -> None:
    cfg = QemuConfig(kernel=Path("/x"), initrd=Path("/x"), base_dir=tmp_path)
    host = QemuHostBackend(QemuMachine(cfg))
    with pytest.raises(BackendError) as info:
        asyncio.run(host.vpci_add("0f1e2d3c", "0000:00:02.0", 0))
    assert str(info.value) == (
        "assigned devices need VFIO, which this host does not have "
        "(/sys/bus/pci/drivers/vfio-pci is missing)"
    )


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU is missing")
def test_real_kvm_probe_is_bounded() -> None:
    """On hosts where /dev/kvm hangs the probe gives up on time and leaves no process behind."""
    t0 = time.monotonic()
    verdict = asyncio.run(probe_kvm(timeout=2.0))
    assert time.monotonic() - t0 < 6.0
    assert isinstance(verdict, bool)
