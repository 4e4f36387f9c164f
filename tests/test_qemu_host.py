"""Host side of the QEMU backend without a VM: image formats, bind-mount shares, leak inventory.

The share tests make real bind mounts and need root; the format tests need ``qemu-img``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from uvmshim import procscan
from uvmshim.errors import BackendError
from uvmshim.uvm.qemu import (
    MachinePaths,
    QemuConfig,
    QemuHostBackend,
    QemuMachine,
    list_leftovers,
    mountns,
)
from uvmshim.uvm.qemu.host import detect_image_format, qmp_error_class, scsi_wwn
from uvmshim.uvm.qemu.images import ImageInfo, ImageReference, inspect_image
from uvmshim.uvm.qemu.kvm import probe_kvm
from uvmshim.uvm.qemu.machine import create_state_dir, remove_state_dir
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


def _inspect(path: Path) -> ImageInfo:
    fd = os.open(path, os.O_RDONLY)
    try:
        return inspect_image(fd, str(path))
    finally:
        os.close(fd)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


@needs_qemu_img
def test_inspect_image_finds_every_file_an_image_names(tmp_path: Path) -> None:
    """Header parsing (no qemu-img info, which would open the chain itself)."""
    for fmt in ("raw", "qcow2", "vpc", "vhdx"):
        _qemu_img("create", "-q", "-f", fmt, str(tmp_path / f"plain.{fmt}"), "8M")
        assert _inspect(tmp_path / f"plain.{fmt}") == ImageInfo(fmt)
    backed = tmp_path / "backed.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "plain.raw", str(backed))
    assert _inspect(backed).references == (ImageReference("backing file", "plain.raw", "raw"),)
    _qemu_img("rebase", "-u", "-F", "raw", "-b", "/etc/shadow", str(backed))
    assert _inspect(backed).references == (ImageReference("backing file", "/etc/shadow", "raw"),)
    data = tmp_path / "data.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.raw", str(data), "4M")
    assert _inspect(data).references == (ImageReference("data file", f"{tmp_path}/d.raw", "raw"),)
    # A differencing VHD: disk type 4 in the footer (and its copy at offset 0).
    vhd = bytearray((tmp_path / "plain.vpc").read_bytes())
    for footer in (0, len(vhd) - 512):
        assert vhd[footer : footer + 8] == b"conectix"
        vhd[footer + 60 : footer + 64] = struct.pack(">I", 4)
    (tmp_path / "diff.vhd").write_bytes(vhd)
    assert _inspect(tmp_path / "diff.vhd").references == (
        ImageReference("parent disk", None, "vpc"),
    )
    # A VHDX with a parent: the HasParent flag of its file parameters.
    vhdx = bytearray((tmp_path / "plain.vhdx").read_bytes())
    table = vhdx.index(b"metadata")
    params = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b").bytes_le
    entry = vhdx.index(params, table)
    (offset,) = struct.unpack_from("<I", vhdx, entry + 16)
    vhdx[table + offset + 4] |= 2
    (tmp_path / "child.vhdx").write_bytes(vhdx)
    assert _inspect(tmp_path / "child.vhdx").references == (
        ImageReference("parent disk", None, "vhdx"),
    )
    broken = tmp_path / "broken.vhdx"
    broken.write_bytes(b"vhdxfile" + b"\0" * 4096)
    with pytest.raises(BackendError, match="not a valid VHDX"):
        _inspect(broken)


@needs_qemu_img
def test_images_naming_other_files_are_refused_before_qemu(tmp_path: Path) -> None:
    """The refusal needs no VM (nothing reaches QMP) and leaves no descriptor open."""
    cfg = QemuConfig(kernel=Path("/x"), initrd=Path("/x"), base_dir=tmp_path)
    host = QemuHostBackend(QemuMachine(cfg))
    backed = tmp_path / "l.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(backed), "4M")
    _qemu_img("rebase", "-u", "-F", "raw", "-b", "/etc/shadow", str(backed))
    data = tmp_path / "d.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.raw", str(data), "4M")
    vhd = tmp_path / "diff.vhd"
    _qemu_img("create", "-q", "-f", "vpc", str(vhd), "4M")
    raw = bytearray(vhd.read_bytes())
    raw[60:64] = struct.pack(">I", 4)
    vhd.write_bytes(raw)
    before = sorted(os.listdir("/proc/self/fd"))

    async def main() -> None:
        cases = [
            (backed, "is a qcow2 overlay on the backing file '/etc/shadow'", "qemu-img convert"),
            (data, f"external data file '{tmp_path}/d.raw'", "qemu-img convert"),
            (vhd, "is a differencing VHD on the parent disk (unnamed)", "-O vpc"),
        ]
        for img, message, hint in cases:
            for ro in (True, False):
                with pytest.raises(BackendError, match=re.escape(message)) as info:
                    await host.scsi_attach(0, 0, str(img), read_only=ro, passthrough=False)
                assert str(img) in str(info.value) and hint in (info.value.hint or "")
        # Allowing a different file does not allow this one.
        other = QemuHostBackend(QemuMachine(cfg), allowed_backing_files=[tmp_path / "x.raw"])
        with pytest.raises(BackendError, match="backing file"):
            await other.scsi_attach(0, 0, str(backed), read_only=True, passthrough=False)

    asyncio.run(main())
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_qemu_root_plan(tmp_path: Path) -> None:
    """QEMU's root: system directories read-only, its boot files, its console log and export,
    device nodes; nothing else of the host (/etc but the loader cache, /tmp, /home, ...)."""
    kernel, initrd = tmp_path / "boot" / "vmlinux", tmp_path / "boot" / "initrd"
    cfg = QemuConfig(kernel=kernel, initrd=initrd, base_dir=tmp_path / "vm")
    paths = MachinePaths(tmp_path / "vm" / "abc")
    kernel.parent.mkdir()
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    plan = mountns.plan(cfg, paths, accel="tcg")
    binds = {b.target: b for b in plan.binds}
    assert binds["/usr"].flags == "ro"
    assert binds[str(kernel)].flags == binds[str(initrd)].flags == "ro"
    assert binds[str(paths.console_log)].flags == "rw"
    share = binds[str(paths.share_dir)]
    assert share.flags == "keep" and share.recursive  # host flags and later shares propagate
    assert binds["/dev/null"].flags == "keep" and "/dev/kvm" not in binds
    allowed = ("/usr", "/dev/", "/etc/ld.so.cache", str(tmp_path), "/bin", "/sbin", "/lib")
    for target in binds:
        assert target.startswith(allowed), target
    assert str(paths.pid_file) not in binds and str(paths.qemu_log) not in binds
    assert plan.build_dir == str(paths.state_dir / "root")
    if os.path.exists("/dev/kvm"):
        assert "/dev/kvm" in {b.target for b in mountns.plan(cfg, paths, accel="kvm").binds}


@needs_root
def test_share_binds_propagate_with_their_flags(machine: QemuMachine, trees: Path) -> None:
    """The export is a shared mount: a namespace that is its slave (as QEMU's is) sees shares
    added later, read-only and nosuid,nodev from the start, and sees them go."""
    share = machine.paths.share_dir
    host = QemuHostBackend(machine)
    ns = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sleep", "60"])
    try:
        mountinfo = Path(f"/proc/{ns.pid}/mountinfo")
        for _ in range(100):
            if mountinfo.read_text() != Path("/proc/self/mountinfo").read_text():
                break  # the namespace is there
            time.sleep(0.02)

        def seen() -> dict[str, str]:
            lines = mountinfo.read_text().splitlines()
            return {m.split()[4]: m.split()[5] for m in lines if str(share) in m.split()[4]}

        async def main() -> None:
            await host.plan9_add("ro", str(trees / "dir"), read_only=True, allowed_files=())
            await host.plan9_add("rw", str(trees / "dir"), read_only=False, allowed_files=())
            await host.plan9_add("f", str(trees / "files"), read_only=True,
                                 allowed_files=["allowed.conf"])  # fmt: skip
            opts = seen()
            assert opts[str(share)].startswith("ro,")
            assert opts[str(share / "ro")].startswith("ro,nosuid,nodev")
            assert opts[str(share / "rw")].startswith("rw,nosuid,nodev")
            assert opts[str(share / "f" / "allowed.conf")].startswith("ro,nosuid,nodev")
            for name in ("ro", "rw", "f"):
                await host.plan9_remove(name)
            assert list(seen()) == [str(share)]

        _run(main())
    finally:
        ns.kill()
        ns.wait()


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
def test_share_batch_is_all_or_nothing(machine: QemuMachine, trees: Path) -> None:
    """Issue 15, point 9: many shares in one host round; a bad one undoes the whole batch."""
    from uvmshim.errors import BatchError
    from uvmshim.uvm.backend import Plan9Add

    share = machine.paths.share_dir
    host = QemuHostBackend(machine)
    good = [Plan9Add(f"b{i}", str(trees / "dir"), read_only=True) for i in range(20)]

    async def main() -> None:
        bad = [*good[:5], Plan9Add("x", str(trees / "missing"), read_only=True), *good[5:]]
        with pytest.raises(BatchError, match="not a directory") as info:
            await host.plan9_add_batch(bad)
        assert info.value.index == 5
        assert [m.mount_point for m in mounts_under(share)] == [os.fspath(share)]
        assert os.listdir(machine.paths.exports_dir) == []
        files = Plan9Add("f", str(trees / "files"), read_only=False,
                         allowed_files=("allowed.conf",))
        await host.plan9_add_batch([*good, files])
        assert len(mounts_under(share)) == 22
        assert await host.plan9_remove_batch(["f", "nope", *reversed([g.name for g in good])]) \
            == {"nope": "no share named 'nope'"}
        assert [m.mount_point for m in mounts_under(share)] == [os.fspath(share)]
        assert os.listdir(machine.paths.exports_dir) == []

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
    vm.paths.pid_file.write_text(f"{os.getpid()} {procscan.start_time(os.getpid())}\n")
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


# Section: QMP error classes (a paused QEMU: no guest runs)


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU is missing")
def test_qmp_refusals_are_matched_by_error_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU 7.2 answers ``device_del`` of an unknown id with ``DeviceNotFound`` (the backend
    takes it for "already gone") and refuses to unplug virtio-pmem with a ``GenericError``
    (the only class it has for that, so the backend also checks the text)."""
    img = tmp_path / "pmem.img"
    img.write_bytes(b"\0" * (2 << 20))
    cfg = QemuConfig(kernel=Path("/x"), initrd=Path("/x"), base_dir=tmp_path, vpmem_slots=1,
                     hotplug_ports=1)
    machine = QemuMachine(cfg)

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-S", "-nodefaults",
            "-no-user-config", "-display", "none", "-m", "128M,slots=1,maxmem=256M",
            "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,addr=0x10",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
            stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))  # fmt: skip
        theirs.close()
        qmp = QMPClient("qmp-classes")
        try:
            await qmp.connect(ours)
            monkeypatch.setattr(QemuMachine, "qmp", property(lambda _self: qmp))
            host = QemuHostBackend(machine)
            with pytest.raises(ExecuteError) as refused:
                await qmp.execute("device_del", {"id": "nosuch"})
            assert qmp_error_class(refused.value) == "DeviceNotFound"
            await host._device_del("nosuch", "a device already gone")  # no error
            await host.vpmem_add(0, str(img))
            with pytest.raises(BackendError, match="cannot hot-unplug virtio-pmem") as err:
                await host.vpmem_remove(0)
            assert err.value.__cause__ is not None
            assert qmp_error_class(err.value.__cause__) == "GenericError"
            assert "cannot be unplugged" in str(err.value.__cause__)
            with pytest.raises(BackendError, match="already in use"):
                await host.vpmem_add(0, str(img))  # still attached and tracked
            with pytest.raises(BackendError) as other:  # another GenericError passes unchanged
                await host._execute("object-del", {"id": "nosuch"}, "an unknown object")
            assert qmp_error_class(other.value) == "GenericError"
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    asyncio.run(main())
