"""Real QEMU utility VMs: boot, QMP, SCSI hot-plug, 9p shares, QEMU's confinement, cleanup.

The guest is a throwaway busybox initrd built here (not the product initrd): /init loads the
virtio/SCSI/9p/ext4 modules, mounts share0 on /mnt/share and then runs shell commands it reads
from the agent port (``__END__ <rc>`` after each output). The kernel is Debian's 6.1 kernel,
fetched with ``apt-get download`` (not installed) and cached in ``$UVMSHIM_TEST_BOOT_DIR``
(default ``/var/tmp/uvmshim-test-qemu``); the PVH ``vmlinux`` is extracted from ``vmlinuz``.

Run: ``pytest -m vm tests/test_qemu_machine.py`` as root (bind mounts, setpriv).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import lzma
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from uvmshim import procscan
from uvmshim.errors import BackendError
from uvmshim.uvm.qemu import (
    QemuConfig,
    QemuHostBackend,
    QemuLaunchError,
    QemuMachine,
    Runstate,
    list_leftovers,
    mountns,
    reclaim,
)
from uvmshim.uvm.qemu.kvm import KvmProbe
from uvmshim.uvm.qemu.mounts import mounts_under

pytestmark = pytest.mark.vm

BOOT_CACHE = Path(os.environ.get("UVMSHIM_TEST_BOOT_DIR", "/var/tmp/uvmshim-test-qemu"))
MODULES = [
    "virtio_pci", "virtio_console", "9pnet_virtio", "9p", "virtio_scsi", "sd_mod",
    "crc32c_generic", "ext4", "virtio_pmem", "nd_pmem",
]  # fmt: skip

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /mnt/share
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko; done
PORT=
for i in $(seq 100); do
  for f in /sys/class/virtio-ports/*/name; do
    [ -r "$f" ] && [ "$(cat "$f")" = agent ] && { p=${f%/name}; PORT=/dev/${p##*/}; }
  done
  [ -n "$PORT" ] && [ -c "$PORT" ] && break
  PORT=; sleep 0.05
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share0 /mnt/share
echo "test-init: port=$PORT" > /dev/console
exec 3<>"$PORT"
echo READY >&3
while :; do
  if read -r line <&3; then
    sh -c "$line" > /tmp/out 2>&1 < /dev/null; rc=$?
    cat /tmp/out >&3; echo "__END__ $rc" >&3
  else
    sleep 0.02
  fi
done
"""


def _run(argv: list[str], cwd: Path | None = None) -> None:
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _kernel_tree() -> Path:
    """Debian's newest 6.1 kernel, once: ``vmlinux`` plus the needed modules in load order."""
    tree = BOOT_CACHE / "kernel"
    if (tree / "done").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    out = subprocess.run(
        ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    names = [line.split()[0] for line in out.splitlines()]
    names.sort(key=lambda n: int(n.split("-")[3]))
    if not names:
        pytest.skip("no Debian linux-image-6.1.0-*-amd64 package available")
    _run(["apt-get", "-o", "APT::Sandbox::User=root", "download", names[-1]], cwd=tree)
    deb = next(tree.glob("*.deb"))
    unpacked = tree / "x"
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    deb.unlink()
    data = next(unpacked.glob("boot/vmlinuz-*")).read_bytes()
    # The PVH entry of the uncompressed ELF skips ~4 s of xz decompression under TCG.
    xz = data[data.find(b"\xfd7zXZ\x00") :]
    (tree / "vmlinux").write_bytes(lzma.LZMADecompressor().decompress(xz))
    (tree / "modules").mkdir()
    order = _module_order(unpacked)
    for ko in order:
        shutil.copy(ko, tree / "modules" / ko.name)
    (tree / "modules" / "order").write_text("".join(f"{ko.name}\n" for ko in order))
    shutil.rmtree(unpacked)
    (tree / "done").touch()
    return tree


def _module_order(unpacked: Path) -> list[Path]:
    """MODULES and their dependencies (from each module's ``depends=``), in load order."""
    kos = {p.name[:-3].replace("-", "_"): p for p in unpacked.glob("lib/modules/*/kernel/**/*.ko")}
    order: list[str] = []

    def add(name: str) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        m = re.search(rb"depends=([^\x00]*)\x00", kos[name].read_bytes())
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                add(dep)
        order.append(name)

    for mod in MODULES:
        add(mod)
    return [kos[n] for n in order]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (symlinks: data is the target)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\x00"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out += hdr.encode() + nb
        out += b"\x00" * (-len(out) % 4) + data
        out += b"\x00" * (-len(out) % 4)
    return bytes(out)


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path


@pytest.fixture(scope="session")
def boot_files() -> BootFiles:
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (bind mounts, setpriv)")
    if not shutil.which("qemu-system-x86_64") or not os.path.exists("/bin/busybox"):
        pytest.skip("qemu-system-x86 and busybox-static are needed")
    tree = _kernel_tree()
    mods = [tree / "modules" / n for n in (tree / "modules" / "order").read_text().split()]
    entries: list[tuple[str, int, bytes]] = [
        (d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "dev", "etc", "lib", "lib/modules")
    ]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path("/bin/busybox").read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    names = "\n".join(p.name[:-3] for p in mods) + "\n"
    entries.append(("etc/modules", stat.S_IFREG | 0o644, names.encode()))
    entries += [(f"lib/modules/{p.name}", stat.S_IFREG | 0o644, p.read_bytes()) for p in mods]
    initrd = BOOT_CACHE / "test-initrd.cpio"
    initrd.write_bytes(_cpio_newc(entries))
    return BootFiles(tree / "vmlinux", initrd)


@pytest.fixture
def base_dir(tmp_path: Path) -> Iterator[Path]:
    """A private base directory; the test fails if anything is left in it."""
    base = tmp_path / "vm"
    yield base
    leftovers = list_leftovers(base)
    for left in leftovers:  # clean up anyway, so one failure doesn't poison the host
        if left.live_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(left.live_pid, signal.SIGKILL)
        for m in left.mounts:
            subprocess.run(["umount", "-l", m], check=False)
    assert not leftovers, f"leftovers: {[x.as_dict() for x in leftovers]}"


def _config(boot: BootFiles, base: Path, **kw: object) -> QemuConfig:
    return QemuConfig(kernel=boot.kernel, initrd=boot.initrd, base_dir=base, accel="tcg", **kw)  # type: ignore[arg-type]


class GuestShell:
    """The test initrd's command loop on the agent port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, vm: QemuMachine, timeout: float = 60.0) -> GuestShell:
        reader, writer = await asyncio.open_unix_connection(os.fspath(vm.agent_socket_path))
        async with asyncio.timeout(timeout):
            while (await reader.readline()).strip() != b"READY":
                pass
        return cls(reader, writer)

    async def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        self.writer.write(cmd.encode() + b"\n")
        await self.writer.drain()
        out: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.reader.readline()).decode(errors="replace")
                if line.startswith("__END__ "):
                    return int(line.split()[1]), "".join(out)
                out.append(line)

    async def ok(self, cmd: str) -> str:
        rc, out = await self.run(cmd)
        assert rc == 0, f"{cmd!r} failed ({rc}): {out}"
        return out

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def running_vm(cfg: QemuConfig) -> AsyncIterator[tuple[QemuMachine, GuestShell]]:
    vm = QemuMachine(cfg)
    try:
        await vm.launch()
        shell = await GuestShell.connect(vm)
        try:
            yield vm, shell
        finally:
            shell.close()
    finally:
        await vm.shutdown(timeout=5)
        _assert_gone(vm)


def _assert_gone(vm: QemuMachine) -> None:
    assert vm.runstate is Runstate.STOPPED
    assert not vm.state_dir.exists()
    assert not mounts_under(vm.state_dir.parent)
    assert not _qemu_pids_under(vm.state_dir)


def _qemu_pids_under(state_dir: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if os.fspath(state_dir).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
    return pids


def _mkfs(path: Path, size_mb: int, label: str) -> None:
    src = path.with_suffix(".src")
    src.mkdir()
    (src / "hello.txt").write_text(f"hello from {label}\n")
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(src), str(path), f"{size_mb}M"])


# Section: tests


def test_boot_scsi_hotplug_and_cleanup(
    boot_files: BootFiles, base_dir: Path, tmp_path: Path
) -> None:
    ro_img = tmp_path / "ro.ext4"
    _mkfs(ro_img, 16, "rolayer")
    rw_raw = tmp_path / "rw.ext4"
    _mkfs(rw_raw, 32, "scratch")
    rw_img = tmp_path / "rw.qcow2"
    _run(["qemu-img", "convert", "-O", "qcow2", str(rw_raw), str(rw_img)])
    timings: dict[str, float] = {}

    async def main() -> None:
        t0 = time.monotonic()
        async with running_vm(_config(boot_files, base_dir)) as (vm, sh):
            timings["boot_to_ready"] = time.monotonic() - t0
            assert vm.pid and vm.accel == "tcg"
            status = await vm.qmp.execute("query-status")
            assert isinstance(status, dict) and status["status"] == "running"
            # QEMU runs unprivileged.
            assert os.stat(f"/proc/{vm.pid}").st_uid == 65534
            host = QemuHostBackend(vm)

            t = time.monotonic()
            await host.scsi_attach(0, 1, str(ro_img), read_only=True, passthrough=False)
            timings["attach_raw"] = time.monotonic() - t
            t = time.monotonic()
            await host.scsi_attach(1, 2, str(rw_img), read_only=False, passthrough=False)
            timings["attach_qcow2"] = time.monotonic() - t
            with pytest.raises(BackendError, match="already holds"):
                await host.scsi_attach(0, 1, str(rw_img), read_only=True, passthrough=False)
            with pytest.raises(BackendError, match="not a host block device"):
                await host.scsi_attach(0, 3, str(rw_img), read_only=True, passthrough=True)
            bad = tmp_path / "bad.qcow2"
            bad.write_bytes(b"QFI\xfb" + b"\xff" * 4096)  # qcow2 magic, garbage header
            with pytest.raises(BackendError, match=r"bad.qcow2: unsupported qcow2 header"):
                await host.scsi_attach(0, 4, str(bad), read_only=True, passthrough=False)
            # Names no other file, but QEMU refuses it: its error comes through.
            bad.write_bytes(b"QFI\xfb" + struct.pack(">IQII", 3, 0, 0, 16) + b"\xff" * 48
                            + b"\0" * 8 + b"\xff" * 4096)  # fmt: skip
            with pytest.raises(BackendError, match=r"QMP blockdev-add for .*bad.qcow2: "):
                await host.scsi_attach(0, 4, str(bad), read_only=True, passthrough=False)
            fdsets = await vm.qmp.execute("query-fdsets")  # only the two attached disks'
            assert isinstance(fdsets, list) and len(fdsets) == 2 and _our_files(bad) == 0
            assert _files_of(vm.pid, bad) == []

            blocks = await vm.qmp.execute("query-block")
            assert isinstance(blocks, list)
            by_dev = {b.get("qdev"): b for b in blocks}
            ro = by_dev["scsi0-lun1"]["inserted"]
            rw = by_dev["scsi1-lun2"]["inserted"]
            assert ro["ro"] is True and ro["drv"] == "raw"
            assert rw["ro"] is False and rw["drv"] == "qcow2"

            # The guest finds the disks under the fixed controller PCI addresses.
            t = time.monotonic()
            find = "ls /sys/bus/pci/devices/0000:00:0{slot}.0/virtio*/host*/target*/*:0:0:{lun}"
            find += "/block"
            both = find.format(slot=5, lun=1) + " && " + find.format(slot=6, lun=2)
            for _ in range(200):
                rc, _out = await sh.run(both)
                if rc == 0:
                    break
                await asyncio.sleep(0.02)
            timings["guest_sees_disks"] = time.monotonic() - t
            ro_dev = (await sh.ok(find.format(slot=5, lun=1))).split()[0]
            rw_dev = (await sh.ok(find.format(slot=6, lun=2))).split()[0]
            assert (await sh.ok(f"cat /sys/block/{ro_dev}/ro")).strip() == "1"
            assert (await sh.ok(f"cat /sys/block/{rw_dev}/ro")).strip() == "0"
            wwid = (await sh.ok(f"cat /sys/block/{rw_dev}/device/wwid")).strip()
            assert wwid == "naa.5525400000010002"
            await sh.ok(f"mkdir -p /ro /rw && mount -o ro,noload /dev/{ro_dev} /ro")
            assert "hello from rolayer" in await sh.ok("cat /ro/hello.txt")
            await sh.ok(f"mount /dev/{rw_dev} /rw && echo written > /rw/new.txt && sync")
            await sh.ok("umount /ro && umount /rw")

            t = time.monotonic()
            await host.scsi_detach(0, 1)
            timings["detach_raw"] = time.monotonic() - t
            await host.scsi_detach(1, 2)
            with pytest.raises(BackendError, match="no disk"):
                await host.scsi_detach(1, 2)
            blocks = await vm.qmp.execute("query-block")
            assert isinstance(blocks, list) and not [b for b in blocks if b.get("inserted")]
            # Re-attach at the same LUN works.
            await host.scsi_attach(0, 1, str(ro_img), read_only=True, passthrough=False)

    asyncio.run(main())
    print("timings:", {k: round(v, 3) for k, v in timings.items()})


def test_plan9_shares_and_security(boot_files: BootFiles, base_dir: Path, tmp_path: Path) -> None:
    rw_dir = tmp_path / "rwdir"
    rw_dir.mkdir()
    (rw_dir / "existing.txt").write_text("host data\n")
    # A host symlink out of the share: the guest must resolve it in its own namespace.
    (rw_dir / "etclink").symlink_to("/etc")
    (rw_dir / "shadowlink").symlink_to("/etc/shadow")
    ro_dir = tmp_path / "rodir"
    ro_dir.mkdir()
    (ro_dir / "file.txt").write_text("read only\n")
    files = tmp_path / "files"
    files.mkdir()
    (files / "allowed.conf").write_text("allowed\n")
    (files / "secret.key").write_text("secret\n")
    host_hostname = Path("/etc/hostname").read_text() if Path("/etc/hostname").exists() else ""

    async def main() -> None:
        async with running_vm(_config(boot_files, base_dir)) as (vm, sh):
            host = QemuHostBackend(vm)
            await host.plan9_add("rw", str(rw_dir), read_only=False, allowed_files=())
            await host.plan9_add("ro", str(ro_dir), read_only=True, allowed_files=())
            await host.plan9_add("one", str(files), read_only=True, allowed_files=["allowed.conf"])
            with pytest.raises(BackendError, match="already exists"):
                await host.plan9_add("rw", str(rw_dir), read_only=False, allowed_files=())
            with pytest.raises(BackendError, match="not a plain file name"):
                await host.plan9_add("../x", str(rw_dir), read_only=False, allowed_files=())
            with pytest.raises(BackendError, match="not a file"):
                await host.plan9_add("two", str(files), read_only=True, allowed_files=["nope"])
            assert not (vm.paths.exports_dir / "two").exists()

            s = "/mnt/share"
            assert sorted((await sh.ok(f"ls {s}")).split()) == ["one", "ro", "rw"]
            assert "host data" in await sh.ok(f"cat {s}/rw/existing.txt")
            await sh.ok(f"echo guest > {s}/rw/fromguest.txt")
            assert (rw_dir / "fromguest.txt").read_text() == "guest\n"
            # Read-only share: enforced on the host.
            rc, out = await sh.run(f"touch {s}/ro/x")
            assert rc != 0 and "Read-only" in out
            rc, out = await sh.run(f"rm {s}/ro/file.txt")
            assert rc != 0 and (ro_dir / "file.txt").exists()
            # Single-file share: only that file, and nothing can be added beside it.
            assert (await sh.ok(f"ls -a {s}/one")).split() == [".", "..", "allowed.conf"]
            assert "allowed" in await sh.ok(f"cat {s}/one/allowed.conf")
            rc, _ = await sh.run(f"cat {s}/one/secret.key")
            assert rc != 0
            rc, _ = await sh.run(f"touch {s}/one/new")
            assert rc != 0
            # The top of the export is read-only: nothing can be planted next to the shares.
            rc, _ = await sh.run(f"mkdir {s}/planted")
            assert rc != 0 and not (vm.paths.exports_dir / "planted").exists()

            # No setuid and no root-owned file can reach the host through a writable share.
            await sh.run(f"cp /bin/busybox {s}/rw/suid; chown 0:0 {s}/rw/suid")
            await sh.run(f"chmod 6755 {s}/rw/suid")
            await sh.run(f"mkdir {s}/rw/d; chmod 2777 {s}/rw/d; chown 0:0 {s}/rw/d")
            await sh.run(f"mknod {s}/rw/null c 1 3")
            for p in ("suid", "d", "fromguest.txt"):
                st = os.lstat(rw_dir / p)
                assert st.st_uid == 65534 and st.st_gid == 65534, p
                assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), p
            assert not (rw_dir / "null").exists()
            # The bind is nosuid,nodev anyway.
            opts = next(m.options for m in mounts_under(vm.paths.share_dir / "rw"))
            assert "nosuid" in opts and "nodev" in opts

            # Host symlinks don't lead out of the share: the guest resolves them itself.
            rc, out = await sh.run(f"cat {s}/rw/etclink/hostname")
            assert rc != 0 or (host_hostname and out != host_hostname)
            rc, out = await sh.run(f"cat {s}/rw/shadowlink")
            assert rc != 0 and "root:" not in out
            await sh.ok("mkdir -p /etc && echo guest-host > /etc/hostname")
            assert (await sh.ok(f"cat {s}/rw/etclink/hostname")).strip() == "guest-host"
            # The guest cannot make symlinks in a share (QEMU's seccomp filter refuses them), so
            # nothing appears there that a host tool could follow out of the share.
            for target in ("/etc/shadow", "../../../..", "existing.txt"):
                rc, out = await sh.run(f"ln -s {target} {s}/rw/glink")
                assert rc != 0 and "Operation not permitted" in out, out
            rc, out = await sh.run(f"mkdir -p {s}/rw/sub && ln -s / {s}/rw/sub/root")
            assert rc != 0 and "Operation not permitted" in out, out
            assert sorted(p.name for p in rw_dir.rglob("*") if p.is_symlink()) == [
                "etclink", "shadowlink"
            ]  # only the two the host made
            # Hard links can't leave their bind mount either (EXDEV in QEMU).
            rc, out = await sh.run(f"ln {s}/ro/file.txt {s}/rw/hard")
            assert rc != 0 and not (rw_dir / "hard").exists()
            rc, out = await sh.run(f"ls {s}/..")  # the guest's parent, not the host's
            assert "exports" not in out

            await sh.ok(f"cat {s}/rw/existing.txt > /dev/null")
            await host.plan9_remove("rw")
            await host.plan9_remove("one")
            with pytest.raises(BackendError, match="no share"):
                await host.plan9_remove("one")
            assert sorted((await sh.ok(f"ls {s}")).split()) == ["ro"]
            assert [m.mount_point for m in mounts_under(vm.paths.share_dir)] == [
                os.fspath(vm.paths.share_dir / "ro"), os.fspath(vm.paths.share_dir)
            ]
            # "ro" stays attached: shutdown must unmount it.

    asyncio.run(main())
    assert (files / "secret.key").exists() and (rw_dir / "existing.txt").exists()


def _files_of(pid: int | None, path: Path) -> list[int]:
    """The access modes (``O_RDONLY``/``O_RDWR``) of the descriptors ``pid`` holds on ``path``."""
    modes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == os.fspath(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                flags = int(re.search(r"^flags:\s+(\d+)", info, re.M).group(1), 8)  # type: ignore[union-attr]
                modes.append(flags & os.O_ACCMODE)
    return sorted(modes)


def _our_files(path: Path) -> int:
    return _files_of(os.getpid(), path).__len__()


def test_qemu_cannot_open_host_files(
    boot_files: BootFiles, base_dir: Path, tmp_path: Path
) -> None:
    """QEMU runs in its own mount namespace: asked over its own QMP connection to open host
    files, it finds none of them; its root holds only what it needs, and it keeps only
    CAP_DAC_OVERRIDE."""
    outside = tmp_path / "outside.txt"
    outside.write_text("a host file outside the VM directory\n")
    outside.chmod(0o644)  # readable by anyone: only the namespace keeps QEMU from it
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in-share.txt").write_text("shared\n")

    async def main() -> None:
        async with running_vm(_config(boot_files, base_dir)) as (vm, sh):
            host = QemuHostBackend(vm)
            await host.plan9_add("ro", str(shared), read_only=True, allowed_files=())
            await host.plan9_add("rw", str(shared), read_only=False, allowed_files=())
            me = os.getpid()
            for path in ("/etc/shadow", "/etc/passwd", "/root", os.fspath(outside),
                         os.fspath(vm.paths.qemu_log), os.fspath(vm.paths.pid_file),
                         os.fspath(boot_files.kernel.parent / "modules" / "order"),
                         "/proc/1/root/etc/shadow", f"/proc/{me}/root{outside}",
                         f"/proc/{me}/cwd", "/home/x", "/var/log/syslog"):
                with pytest.raises(ExecuteError, match="No such file or directory"):
                    await vm.qmp.execute("blockdev-add", {
                        "driver": "file", "node-name": "probe", "filename": path,
                        "read-only": True})  # fmt: skip
            # What it is given it can open: its share.
            await vm.qmp.execute("blockdev-add", {
                "driver": "file", "node-name": "probe", "read-only": True,
                "filename": os.fspath(vm.paths.share_dir / "rw" / "in-share.txt")})  # fmt: skip
            await vm.qmp.execute("blockdev-del", {"node-name": "probe"})

            root = Path(f"/proc/{vm.pid}/root")
            top = sorted(p.name for p in root.iterdir())
            assert {"usr", "dev", "proc"} <= set(top)
            assert not {"home", "root", "boot", "run", "srv", "opt", "mnt"} & set(top)
            assert [p.name for p in (root / "etc").iterdir()] in ([], ["ld.so.cache"])
            procs = sorted(p.name for p in (root / "proc").iterdir())
            assert procs == sorted([str(vm.pid), "self"])
            assert sorted(p.name for p in (root / vm.state_dir.relative_to("/")).iterdir()) == [
                "console.log", "share"
            ]
            assert not (root / outside.relative_to("/")).exists()
            # Its copy of the export is read-only, the shares keep their flags (propagated).
            info = {m.split()[4]: m.split()[5] for m in
                    Path(f"/proc/{vm.pid}/mountinfo").read_text().splitlines()}  # fmt: skip
            share = os.fspath(vm.paths.share_dir)
            assert info[share].startswith("ro,") and "nosuid" in info[share]
            assert info[share + "/ro"].startswith("ro,") and "nodev" in info[share + "/ro"]
            assert info[share + "/rw"].startswith("rw,") and "nosuid" in info[share + "/rw"]
            assert info["/"].startswith("ro,") and info["/usr"].startswith("ro,")
            status = Path(f"/proc/{vm.pid}/status").read_text()
            caps = dict(re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M))
            assert int(caps["CapEff"], 16) == int(caps["CapBnd"], 16) == 1 << 1  # DAC_OVERRIDE
            # A share removed on the host disappears from QEMU's namespace too.
            await host.plan9_remove("ro")
            assert share + "/ro" not in Path(f"/proc/{vm.pid}/mountinfo").read_text()
            assert (await sh.ok("ls /mnt/share")).split() == ["rw"]

    asyncio.run(main())


def _qcow2_on(tmp_path: Path, name: str, *create_args: str, size: str = "4M") -> Path:
    img = tmp_path / name
    sized = [size] if size else []  # without a size, the backing file's
    _run(["qemu-img", "create", "-q", "-f", "qcow2", *create_args, str(img), *sized])
    return img


def test_disks_are_descriptors_and_chains_are_refused(
    boot_files: BootFiles, base_dir: Path, tmp_path: Path
) -> None:
    """Images reach QEMU as descriptors opened with the caller's intent and leave nothing open
    behind; an image that names a backing or data file is refused unless the chain is allowed."""
    ro_img = tmp_path / "ro.ext4"
    _mkfs(ro_img, 16, "rodisk")
    rw_img = tmp_path / "rw.qcow2"
    _run(["qemu-img", "convert", "-O", "qcow2", str(ro_img), str(rw_img)])
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"root:SECRET:" + b"\0" * 4096)
    secret.chmod(0o600)
    backed = _qcow2_on(tmp_path, "backed.qcow2")
    _run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", str(secret), str(backed)])
    data_file = tmp_path / "data.raw"
    with_data = _qcow2_on(tmp_path, "with-data.qcow2", "-o", f"data_file={data_file}")
    base = tmp_path / "base.ext4"
    _mkfs(base, 8, "baselayer")
    overlay = _qcow2_on(tmp_path, "overlay.qcow2", "-F", "raw", "-b", base.name, size="")

    async def main() -> None:
        async with running_vm(_config(boot_files, base_dir)) as (vm, sh):
            host = QemuHostBackend(vm)
            await host.scsi_attach(0, 1, str(ro_img), read_only=True, passthrough=False)
            await host.scsi_attach(0, 2, str(rw_img), read_only=False, passthrough=False)
            # QEMU has each image open once in its fdset and once in its block node, with the
            # intent asked for; we have none of them open any more.
            assert _files_of(vm.pid, ro_img) == [os.O_RDONLY, os.O_RDONLY]
            assert _files_of(vm.pid, rw_img) == [os.O_RDWR, os.O_RDWR]
            assert _our_files(ro_img) == _our_files(rw_img) == 0
            fdsets = await vm.qmp.execute("query-fdsets")
            assert isinstance(fdsets, list) and len(fdsets) == 2
            blocks = await vm.qmp.execute("query-block")
            assert isinstance(blocks, list)
            files = {b["qdev"]: b["inserted"]["image"]["filename"] for b in blocks
                     if b.get("inserted")}  # fmt: skip
            assert all(f.startswith("/dev/fdset/") for f in files.values()), files

            cases = [(backed, f"backing file {str(secret)!r}"),
                     (with_data, f"external data file {str(data_file)!r}")]  # fmt: skip
            for img, what in cases:
                for ro in (True, False):
                    with pytest.raises(BackendError, match=re.escape(what)) as info:
                        await host.scsi_attach(1, 0, str(img), read_only=ro, passthrough=False)
                    assert info.value.hint and "qemu-img convert" in info.value.hint
                    assert _files_of(vm.pid, img) == [] and _our_files(img) == 0
            assert _files_of(vm.pid, secret) == [] and _files_of(vm.pid, data_file) == []

            await host.scsi_detach(0, 1)
            await host.scsi_detach(0, 2)
            assert _files_of(vm.pid, ro_img) == _files_of(vm.pid, rw_img) == []
            assert await vm.qmp.execute("query-fdsets") == []

            # An explicitly allowed chain: uvmshim opens the backing file (read-only) itself.
            with pytest.raises(BackendError, match="backing file 'base.ext4'"):
                await host.scsi_attach(1, 1, str(overlay), read_only=False, passthrough=False)
            allowing = QemuHostBackend(vm, allowed_backing_files=[base])
            await allowing.scsi_attach(1, 1, str(overlay), read_only=False, passthrough=False)
            assert _files_of(vm.pid, base) == [os.O_RDONLY, os.O_RDONLY]
            assert _files_of(vm.pid, overlay) == [os.O_RDWR, os.O_RDWR]
            find = "ls /sys/bus/pci/devices/0000:00:06.0/virtio*/host*/target*/*:0:0:1/block"
            for _ in range(200):
                rc, out = await sh.run(find)
                if rc == 0:
                    break
                await asyncio.sleep(0.02)
            await sh.ok(f"mkdir -p /o && mount /dev/{out.split()[0]} /o")
            assert "hello from baselayer" in await sh.ok("cat /o/hello.txt")
            await sh.ok("echo new > /o/new.txt && umount /o")
            await allowing.scsi_detach(1, 1)
            assert _files_of(vm.pid, base) == _files_of(vm.pid, overlay) == []
            assert await vm.qmp.execute("query-fdsets") == []

    asyncio.run(main())
    assert (tmp_path / "secret.raw").read_bytes().startswith(b"root:SECRET:")


def test_vpmem_hot_add(boot_files: BootFiles, base_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "pmem.ext4"
    _mkfs(img, 8, "pmemlayer")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\0" * 4096)

    async def main() -> None:
        cfg = _config(boot_files, base_dir, vpmem_slots=2, vpmem_max_mb=256)
        async with running_vm(cfg) as (vm, sh):
            host = QemuHostBackend(vm)
            with pytest.raises(BackendError, match="multiple of 2 MiB"):
                await host.vpmem_add(1, str(odd))
            await host.vpmem_add(0, str(img))
            with pytest.raises(BackendError, match="already in use"):
                await host.vpmem_add(0, str(img))
            with pytest.raises(BackendError, match="vPMEM device 2 does not exist"):
                await host.vpmem_add(2, str(img))
            # The guest finds vPMEM device 0 below root port rp0 (PCI 00:10.0).
            find = "ls /sys/bus/pci/devices/0000:00:10.0/0000:*/virtio*/ndbus*/region*/namespace*"
            find += "/block"
            for _ in range(100):
                rc, out = await sh.run(find)
                if rc == 0:
                    break
                await asyncio.sleep(0.05)
            dev = out.split()[0]
            assert dev.startswith("pmem")
            await sh.ok(f"mkdir -p /p && mount -o ro /dev/{dev} /p")
            assert "hello from pmemlayer" in await sh.ok("cat /p/hello.txt")
            await sh.ok("umount /p")
            # The file came as a descriptor: QEMU holds it read-only, no fdset is left over.
            assert _files_of(vm.pid, img) == [os.O_RDONLY]
            assert await vm.qmp.execute("query-fdsets") == []
            # QEMU 7.2 cannot unplug virtio-pmem: a clear error, and the device stays tracked.
            with pytest.raises(BackendError, match="cannot hot-unplug virtio-pmem"):
                await host.vpmem_remove(0)
            with pytest.raises(BackendError, match="already in use"):
                await host.vpmem_add(0, str(img))

    asyncio.run(main())


def test_vpmem_disabled_and_vpci_refused(boot_files: BootFiles, base_dir: Path) -> None:
    async def main() -> None:
        vm = QemuMachine(_config(boot_files, base_dir))
        async with vm:
            host = QemuHostBackend(vm)
            with pytest.raises(BackendError, match="vPMEM is not enabled"):
                await host.vpmem_add(0, "/nonexistent")
            if not Path("/sys/bus/pci/drivers/vfio-pci").is_dir():
                with pytest.raises(BackendError, match="need VFIO, which this host does not have"):
                    await host.vpci_add("gpu0", "0000:00:02.0", 0)
        _assert_gone(vm)

    asyncio.run(main())


def test_launch_failure_reports_and_cleans_up(
    boot_files: BootFiles, base_dir: Path, tmp_path: Path
) -> None:
    bogus = tmp_path / "bogus-kernel"
    bogus.write_bytes(b"not a kernel" * 100)
    cfg = QemuConfig(kernel=bogus, initrd=boot_files.initrd, base_dir=base_dir, accel="tcg")

    async def main() -> None:
        vm = QemuMachine(cfg)
        with pytest.raises(QemuLaunchError) as info:
            await vm.launch()
        err = info.value
        assert err.returncode not in (None, 0)
        assert "qemu-system-x86_64" in " ".join(err.argv)
        assert err.qemu_log  # QEMU's complaint about the kernel
        assert "exit code" in str(err)
        _assert_gone(vm)
        with pytest.raises(BackendError, match="launch needs idle"):
            await vm.launch()

    asyncio.run(main())


def test_confinement_failure_is_a_launch_error(
    boot_files: BootFiles, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of building QEMU's root that fails in the child ends up in the launch error."""
    real_plan = mountns.plan

    def broken(*args: Any, **kw: Any) -> mountns.RootPlan:
        plan = real_plan(*args, **kw)
        bogus = mountns.Bind("/nonexistent-uvmshim-source", "/usr/bogus")
        return dataclasses.replace(plan, binds=(*plan.binds, bogus))

    monkeypatch.setattr(mountns, "plan", broken)

    async def main() -> None:
        vm = QemuMachine(_config(boot_files, base_dir))
        with pytest.raises(QemuLaunchError, match="cannot confine QEMU: mount "
                           "/nonexistent-uvmshim-source on .*: No such file") as info:  # fmt: skip
            await vm.launch()
        assert info.value.returncode == 1
        _assert_gone(vm)

    asyncio.run(main())


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 2.0])
def test_cancel_during_launch_cleans_up(
    boot_files: BootFiles, base_dir: Path, delay: float
) -> None:
    async def main() -> None:
        vm = QemuMachine(_config(boot_files, base_dir))
        task = asyncio.create_task(vm.launch())
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # If launch won the race, shutdown cleans up; otherwise it is a no-op.
        await vm.shutdown(timeout=2)
        _assert_gone(vm)

    asyncio.run(main())


SIGINT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from uvmshim.uvm.qemu import QemuConfig, QemuMachine
cfg = QemuConfig(kernel=Path(sys.argv[1]), initrd=Path(sys.argv[2]), base_dir=Path(sys.argv[3]),
                 accel="tcg")
async def main():
    async with QemuMachine(cfg) as vm:
        print("RUNNING", vm.pid, flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_ctrl_c_cleans_up(boot_files: BootFiles, base_dir: Path) -> None:
    """SIGINT to a program holding a running VM: asyncio cancels the task, the VM goes away."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, str(boot_files.kernel), str(boot_files.initrd),
         str(base_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("RUNNING"), proc.stderr.read() if proc.stderr else line
        qemu_pid = int(line.split()[1])
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert not Path(f"/proc/{qemu_pid}").exists() or _is_zombie_or_other(qemu_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # base_dir fixture asserts: no state dir, no live pid, no mount.


def _is_zombie_or_other(pid: int) -> bool:
    try:
        return b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


KILL_SCRIPT = """
import asyncio, sys
from pathlib import Path
from uvmshim.uvm.qemu import QemuConfig, QemuHostBackend, QemuMachine
cfg = QemuConfig(kernel=Path(sys.argv[1]), initrd=Path(sys.argv[2]), base_dir=Path(sys.argv[3]),
                 accel="tcg")
async def main():
    vm = QemuMachine(cfg)
    await vm.launch()
    await QemuHostBackend(vm).plan9_add("d", sys.argv[4], read_only=True, allowed_files=())
    print("RUNNING", vm.pid, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_sigkilled_host_process_leaves_no_qemu_and_leftovers_are_reclaimed(
    boot_files: BootFiles, base_dir: Path, tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(boot_files.kernel), str(boot_files.initrd),
         str(base_dir), str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("RUNNING"), line
        qemu_pid = int(line.split()[1])
        proc.kill()  # no cleanup code runs in the host process
        proc.wait()
        # PR_SET_PDEATHSIG: QEMU dies with its parent. Wait until it has exited (gone, or only
        # its zombie left) as list_leftovers sees it, not just until its memory is released.
        for _ in range(100):
            if procscan.exited(qemu_pid):
                break
            time.sleep(0.05)
        else:
            pytest.fail("QEMU outlived its SIGKILLed parent")
        (left,) = list_leftovers(base_dir)
        assert left.live_pid is None
        assert sorted(left.mounts) == [
            os.fspath(left.state_dir / "share"), os.fspath(left.state_dir / "share" / "d")
        ]
        assert reclaim(left) == []
        assert list_leftovers(base_dir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_graceful_shutdown_paths(boot_files: BootFiles, base_dir: Path) -> None:
    """``on_shutdown`` (here: the guest powers off) and the default QMP ``quit``, both timed."""
    timings: dict[str, float] = {}

    async def main() -> None:
        shell: list[GuestShell] = []

        async def poweroff() -> None:
            shell[0].writer.write(b"poweroff -f\n")
            await shell[0].writer.drain()

        t0 = time.monotonic()
        vm = QemuMachine(_config(boot_files, base_dir), on_shutdown=poweroff)
        await vm.launch()
        timings["launch_to_qmp"] = time.monotonic() - t0
        shell.append(await GuestShell.connect(vm))
        t = time.monotonic()
        await vm.shutdown(timeout=10)
        timings["shutdown_guest_poweroff"] = time.monotonic() - t
        shell[0].close()
        assert vm.returncode == 0  # QEMU exited by itself (-no-reboot), not SIGKILL
        _assert_gone(vm)
        await vm.shutdown()  # a second shutdown is a no-op

        vm = QemuMachine(_config(boot_files, base_dir))
        await vm.launch()
        t = time.monotonic()
        await vm.shutdown(timeout=10)
        timings["shutdown_qmp_quit"] = time.monotonic() - t
        assert vm.returncode == 0
        _assert_gone(vm)

        async def hang() -> None:
            await asyncio.sleep(3600)

        vm = QemuMachine(_config(boot_files, base_dir), on_shutdown=hang)
        await vm.launch()
        t = time.monotonic()
        await vm.shutdown(timeout=0.5)
        timings["shutdown_forced"] = time.monotonic() - t
        assert vm.returncode == -signal.SIGKILL
        _assert_gone(vm)

    asyncio.run(main())
    print("timings:", {k: round(v, 3) for k, v in timings.items()})


@pytest.mark.skipif(not shutil.which("losetup"), reason="losetup is missing")
def test_passthrough_block_device_and_auto_accel(
    boot_files: BootFiles, base_dir: Path, tmp_path: Path
) -> None:
    img = tmp_path / "phys.ext4"
    _mkfs(img, 16, "physical")
    try:
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", str(img)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device: {e.stderr}")
    try:
        probe = KvmProbe(tmp_path / "kvm.json")

        async def main() -> None:
            cfg = QemuConfig(kernel=boot_files.kernel, initrd=boot_files.initrd, base_dir=base_dir)
            vm = QemuMachine(cfg, kvm_probe=probe)
            async with vm:
                shell = await GuestShell.connect(vm)
                try:
                    assert vm.accel == ("kvm" if await probe.kvm_works() else "tcg")
                    assert probe.probes == 1
                    host = QemuHostBackend(vm)
                    await host.scsi_attach(2, 0, loop, read_only=True, passthrough=True)
                    blocks = await vm.qmp.execute("query-block")
                    assert isinstance(blocks, list)
                    (disk,) = [b for b in blocks if b.get("qdev") == "scsi2-lun0"]
                    assert disk["inserted"]["drv"] == "host_device" and disk["inserted"]["ro"]
                    find = "ls /sys/bus/pci/devices/0000:00:07.0/virtio*/host*/target*/*:0:0:0"
                    find += "/block"
                    for _ in range(200):
                        rc, out = await shell.run(find)
                        if rc == 0:
                            break
                        await asyncio.sleep(0.02)
                    dev = out.split()[0]
                    await shell.ok(f"mkdir -p /phys && mount -o ro,noload /dev/{dev} /phys")
                    assert "hello from physical" in await shell.ok("cat /phys/hello.txt")
                    await shell.ok("umount /phys")
                    await host.scsi_detach(2, 0)
                finally:
                    shell.close()
            _assert_gone(vm)

        asyncio.run(main())
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
