"""Boot-file cache keys, vmlinux extraction, cpio layout; a real build with ``-m vm``."""

from __future__ import annotations

import asyncio
import dataclasses
import lzma
import os
import shutil
import stat
from pathlib import Path

import pytest

from uvmshim import hostpath
from uvmshim.errors import ToolError, UvmshimError
from uvmshim.uvm import bootfiles
from uvmshim.uvm.bootfiles import BuildInputs, PackageInfo, compute_key, extract_vmlinux
from uvmshim.uvm.initrd.cpio import CpioWriter

BASE = BuildInputs(
    builder_version=1,
    kernel_package="linux-image-6.1.0-57-amd64",
    packages=(PackageInfo("crun", "1.8.1-1+deb12u1", "amd64", "ab" * 32),
              PackageInfo("busybox-static", "1:1.35.0-4", "amd64", "cd" * 32)),
    files=(("agent/server.py", "00" * 32), ("uvm/initrd/init.sh", "11" * 32)),
    modules=("virtio_pci", "ext4"),
)


def test_key_is_stable_and_hex() -> None:
    assert compute_key(BASE) == compute_key(dataclasses.replace(BASE))
    assert len(compute_key(BASE)) == 24
    int(compute_key(BASE), 16)


@pytest.mark.parametrize("change", [
    {"builder_version": 2},
    {"kernel_package": "linux-image-6.1.0-58-amd64"},
    {"packages": (PackageInfo("crun", "1.8.2", "amd64", "ab" * 32), BASE.packages[1])},
    {"packages": (PackageInfo("crun", "1.8.1-1+deb12u1", "amd64", "ef" * 32),
                  BASE.packages[1])},
    {"files": (("agent/server.py", "01" * 32), BASE.files[1])},
    {"files": (BASE.files[0], ("uvm/initrd/init.sh", "12" * 32))},
    {"modules": ("virtio_pci", "ext4", "xfs")},
])
def test_key_changes_with_every_input(change: dict[str, object]) -> None:
    assert compute_key(dataclasses.replace(BASE, **change)) != compute_key(BASE)  # type: ignore[arg-type]


def test_source_files_cover_agent_protocol_init_and_builder() -> None:
    names = {name for name, _ in bootfiles.source_files()}
    for expected in ("agent/server.py", "agent/storage.py", "protocol/framing.py",
                     "protocol/messages.py", "uvm/initrd/init.sh", "uvm/bootfiles.py",
                     "uvm/initrd/stage.py"):
        assert expected in names
    assert all(p.exists() for _, p in bootfiles.source_files())


def test_deb_name_quotes_epoch() -> None:
    assert BASE.packages[1].deb_name == "busybox-static_1%3a1.35.0-4_amd64.deb"


def test_extract_vmlinux_from_fake_bzimage() -> None:
    elf = b"\x7fELF" + os.urandom(1000)
    bz = b"MZ" + b"\0" * 500 + b"\xfd7zXZ\x00junk" + lzma.compress(elf) + b"\0" * 64
    assert extract_vmlinux(bz) == elf
    with pytest.raises(UvmshimError):
        extract_vmlinux(b"MZ" + lzma.compress(b"not an elf"))


def test_cpio_layout(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/x").write_bytes(b"hello")
    (tree / "bin/x").chmod(0o755)
    (tree / "bin/sh").symlink_to("/bin/busybox")
    out = tmp_path / "a.cpio"
    with open(out, "wb") as f:
        w = CpioWriter(f)
        w.add_tree(str(tree))
        w.add_device("dev/null", char=True, major=1, minor=3, mode=0o666)
        w.close()
    data = out.read_bytes()
    entries = _parse_newc(data)
    assert [e[0] for e in entries] == ["bin", "bin/sh", "bin/x", "dev/null", "TRAILER!!!"]
    by_name = {e[0]: e for e in entries}
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][2] == b"/bin/busybox"
    assert by_name["bin/x"][2] == b"hello" and stat.S_IMODE(by_name["bin/x"][1]) == 0o755
    assert stat.S_ISCHR(by_name["dev/null"][1]) and by_name["dev/null"][3] == (1, 3)
    assert len(data) % 512 == 0
    with open(os.devnull, "wb") as sink:
        w2 = CpioWriter(sink)
        w2.add_dir("a")
        with pytest.raises(ValueError, match="duplicate"):
            w2.add_dir("a")


def _parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    out = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        out.append((name, mode, body, (rmaj, rmin)))
        if name == "TRAILER!!!":
            return out


@pytest.mark.vm
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian 12)")
def test_real_build_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real build into a private cache; a second call reuses it without building."""
    real_cache = hostpath.cache_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    debs = real_cache / "debs"
    if debs.is_dir():  # reuse downloads: the test is about the build, not the mirror
        shutil.copytree(debs, tmp_path / "uvmshim" / "debs")
    steps: list[str] = []
    files = asyncio.run(bootfiles.ensure_boot_files(progress=steps.append))
    assert files.kernel.read_bytes()[:4] == b"\x7fELF"
    assert files.initrd.read_bytes()[:6] == b"070701"
    assert any("writing the initrd" in s for s in steps)
    entry = files.kernel.parent
    assert entry.name == files.key and (entry / "manifest.json").exists()
    assert not list(entry.parent.glob(".build-*"))
    again: list[str] = []
    assert asyncio.run(bootfiles.ensure_boot_files(progress=again.append)) == files
    assert again == []


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs apt (Debian 12)")
def test_apt_answers_are_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = asyncio.run(bootfiles.build_inputs())
    assert first.kernel_package.startswith("linux-image-")
    assert [p.name for p in first.packages[1:]] == list(bootfiles.USERLAND_PACKAGES)
    memo = tmp_path / "uvmshim" / "apt-resolve.json"
    assert memo.exists()
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # apt-cache unreachable now
    assert asyncio.run(bootfiles.build_inputs()) == first
    monkeypatch.setenv("UVMSHIM_KERNEL_PACKAGE", "linux-image-other")  # state changed
    with pytest.raises(ToolError, match="apt-cache"):
        asyncio.run(bootfiles.build_inputs())


def test_prune_spares_entries_in_use(tmp_path: Path) -> None:
    """Old boot file entries go, except the newest old one and any used in the last minutes
    (a process handed its paths may not have started QEMU yet)."""
    from uvmshim.uvm.bootfiles import IN_USE_GRACE, _prune

    now = 1_000_000.0
    ages = {"current": 0.0, "recent": 10.0, "in-use": IN_USE_GRACE - 60, "stale": IN_USE_GRACE + 60,
            "older": 3 * IN_USE_GRACE}
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / ".lock").touch()
    _prune(tmp_path, "current", now=now)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "current", "in-use", "recent"]
