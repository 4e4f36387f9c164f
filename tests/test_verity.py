"""dm-verity on the host: the hash tree and superblock of layer disks, checked by veritysetup;
the parameters' checks; the guest's device-mapper ioctl buffers; verity through the allocator.

The guest side under a real kernel is ``tests/test_verity_vm.py``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import testimages
from uvmshim.agent import devmapper, kmods
from uvmshim.agent import storage as agent_storage
from uvmshim.agent.util import AgentError
from uvmshim.errors import UvmError
from uvmshim.image import ImageStore, import_image, vhd
from uvmshim.image.tar2ext4 import write_layer
from uvmshim.image.verity import append_hash_tree, build_tree, salt_for
from uvmshim.layers import add_lcow_layer, layer_verity
from uvmshim.protocol import ErrorKind, MountScsi, ProtocolError, UnmountScsi
from uvmshim.protocol.verity import (
    SUPERBLOCK_SIZE,
    Verity,
    VerityError,
    check_superblock,
    dm_table,
    superblock,
    tree_blocks,
)
from uvmshim.uvm.sim import simulated_uvm

from helpers import HostFiles

needs_veritysetup = pytest.mark.skipif(not shutil.which("veritysetup"),
                                       reason="needs veritysetup (cryptsetup-bin)")


def verify(path: Path, v: Verity) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["veritysetup", "verify", path, path, v.root_hash,
                           f"--hash-offset={v.hash_offset}"], capture_output=True, text=True)


def reference_root(data: bytes, salt: bytes) -> bytes:
    """The root hash computed the slow, obvious way (hash type 1, 4 KiB blocks, sha256)."""
    level = [hashlib.sha256(salt + data[i:i + 4096]).digest() for i in range(0, len(data), 4096)]
    while len(level) > 1:
        blocks = [b"".join(level[i:i + 128]).ljust(4096, b"\0")
                  for i in range(0, len(level), 128)]
        level = [hashlib.sha256(salt + b).digest() for b in blocks]
    return level[0]


@pytest.mark.parametrize("blocks", [1, 2, 128, 129, 1024 * 2 + 7, 128 * 128 + 1])
def test_tree_matches_the_obvious_computation(tmp_path: Path, blocks: int) -> None:
    data = hashlib.shake_256(str(blocks).encode()).digest(blocks * 4096)
    (tmp_path / "d").write_bytes(data)
    salt = salt_for("sha256:" + "1" * 64)
    fd = os.open(tmp_path / "d", os.O_RDONLY)
    try:
        root, levels = build_tree(fd, blocks, salt)
    finally:
        os.close(fd)
    assert root == reference_root(data, salt)
    assert sum(len(level) for level in levels) // 4096 == tree_blocks(blocks)


@needs_veritysetup
def test_veritysetup_accepts_our_tree_and_refuses_a_flipped_byte(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(3 * 1024 * 1024))
    fd = os.open(path, os.O_RDWR)
    try:
        v, end = append_hash_tree(fd, 3 * 1024 * 1024, salt=b"\x07" * 32, uuid=bytes(16))
    finally:
        os.close(fd)
    assert path.stat().st_size == end == v.hash_offset + (1 + tree_blocks(768)) * 4096
    assert verify(path, v).returncode == 0, verify(path, v).stderr
    dump = subprocess.run(["veritysetup", "dump", path, f"--hash-offset={v.hash_offset}"],
                          capture_output=True, text=True, check=True).stdout
    assert "Data blocks:     \t768" in dump and v.salt in dump
    with open(path, "r+b") as f:
        f.seek(1_000_000)
        b = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([b[0] ^ 0x80]))
    res = verify(path, v)
    assert res.returncode != 0 and "failed" in res.stderr.lower()


@needs_veritysetup
def test_imported_layers_verify_and_keep_an_exact_vhd(tmp_path: Path) -> None:
    images = testimages.build_all(tmp_path / "img")
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(images["oci"], store=store))
    for d in rec.layer_dirs:
        v = layer_verity(str(d))
        assert v is not None
        meta = json.loads((d / "layer.json").read_text())
        assert meta["verity"] == v.to_json()
        vhd_path = d / "layer.vhd"
        assert verify(vhd_path, v).returncode == 0
        size = vhd_path.stat().st_size - vhd.FOOTER_SIZE
        footer = vhd.parse_footer(vhd_path.read_bytes()[-vhd.FOOTER_SIZE:])
        assert footer.current_size == size and footer.geometry.total_sectors * 512 == size
        assert size >= v.hash_offset + (1 + tree_blocks(v.data_blocks)) * 4096
        # The ext4 image ends where the hash area begins, and still checks.
        res = subprocess.run(["e2fsck", "-fn", vhd_path], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
        blocks = int(subprocess.run(["dumpe2fs", "-h", vhd_path], capture_output=True,
                                    text=True).stdout.split("Block count:")[1].split()[0])
        assert blocks == v.data_blocks


def test_no_verity_then_verity_converts_again(tmp_path: Path) -> None:
    images = testimages.build_all(tmp_path / "img")
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(images["oci"], store=store, verity=False))
    assert all(layer_verity(str(d)) is None for d in rec.layer_dirs)
    events: list[str] = []
    rec = asyncio.run(import_image(images["docker-archive"], store=store,
                                   progress=lambda e: events.append(e.kind)))
    assert events.count("layer-start") == len(rec.layer_dirs)
    assert all(layer_verity(str(d)) is not None for d in rec.layer_dirs)
    # Without verity, the verified copies are good enough: nothing is converted.
    events.clear()
    asyncio.run(import_image(images["oci"], store=store, verity=False,
                             progress=lambda e: events.append(e.kind)))
    assert "layer-start" not in events
    assert not any((store.root / "tmp").iterdir())


def test_cli_no_verity(tmp_path: Path) -> None:
    images = testimages.build_all(tmp_path / "img")
    env = {**os.environ, "UVMSHIM_IMAGE_ROOT": str(tmp_path / "store")}
    res = subprocess.run(["uvmshim", "image", "import", "--no-verity", str(images["oci"])],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert not list((tmp_path / "store").rglob("verity.json"))
    assert list((tmp_path / "store").rglob("layer.vhd"))


# The parameters ---------------------------------------------------------------------------


def good(**kw: Any) -> Verity:
    base: dict[str, Any] = {"root_hash": "ab" * 32, "salt": "01" * 32, "data_blocks": 256,
                            "hash_offset": 256 * 4096}
    return Verity(**{**base, **kw})


@pytest.mark.parametrize(("kw", "match"), [
    ({"algorithm": "md5"}, "unsupported hash algorithm"),
    ({"root_hash": "ab" * 31}, "root_hash"),
    ({"root_hash": "AB" * 32}, "root_hash"),
    ({"salt": "0"}, "salt"),
    ({"salt": "zz"}, "salt"),
    ({"salt": "00" * 257}, "salt"),
    ({"data_block_size": 3000}, "data_block_size"),
    ({"hash_block_size": 1 << 20}, "hash_block_size"),
    ({"data_blocks": 0}, "data_blocks"),
    ({"hash_offset": 4095}, "hash_offset"),
    ({"hash_offset": 4096}, "overlaps"),
])
def test_bad_parameters_are_refused(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(VerityError, match=match):
        good(**kw).check()


def test_table_and_superblock() -> None:
    v = good().check()
    assert dm_table(v, "8:16") == (f"1 8:16 8:16 4096 4096 256 257 sha256 {'ab' * 32} "
                                   f"{'01' * 32}")
    assert dm_table(good(salt=""), "8:16").endswith(" -")
    sb = superblock(v, bytes(range(16)))
    assert len(sb) == SUPERBLOCK_SIZE and sb.startswith(b"verity\0\0")
    check_superblock(sb + bytes(100), v)
    with pytest.raises(VerityError, match="no dm-verity superblock"):
        check_superblock(bytes(512), v)
    with pytest.raises(VerityError, match="data blocks 256 .expected 300."):
        check_superblock(sb, good(data_blocks=300, hash_offset=300 * 4096))
    with pytest.raises(VerityError, match="salt"):
        check_superblock(sb, good(salt="02" * 32))


def test_mount_request_carries_verity() -> None:
    v = good()
    req = MountScsi(controller=0, lun=1, guest_path="/m", read_only=True, verity=v.to_json())
    back = MountScsi.from_json(json.loads(json.dumps(req.to_json())))
    assert back == req and Verity.from_json(back.verity) == v
    assert MountScsi.from_json({"controller": 0, "lun": 1}).verity is None
    with pytest.raises(ProtocolError, match="verity must be an object"):
        MountScsi.from_json({"controller": 0, "lun": 1, "verity": "x"})


# The guest's device-mapper ioctls, without a kernel ------------------------------------------


class FakeControl:
    """Records ioctl calls on /dev/mapper/control and answers like the kernel would."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []

    def ioctl(self, fd: int, request: int, buf: bytearray, mutate: bool = True) -> int:
        nr = request & 0xFF
        assert request >> 30 == 3 and (request >> 8) & 0xFF == 0xFD
        assert (request >> 16) & 0x3FFF == 312
        self.calls.append((nr, bytes(buf)))
        if nr == 3:  # create: the kernel fills in dev (huge_encode_dev of 254:300)
            struct.pack_into("=Q", buf, 40, (300 & 0xFF) | (254 << 8) | ((300 & ~0xFF) << 12))
        if nr == 12:  # status: one verity target saying "C"
            struct.pack_into("=II", buf, 16, 312, 1)
            spec = struct.pack("=QQiI16s", 0, 2048, 0, 48, b"verity") + b"C\0"
            buf[312:312 + len(spec)] = spec
        return 0


def test_devmapper_buffers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeControl()
    control = tmp_path / "control"
    control.write_bytes(b"")
    monkeypatch.setattr(devmapper, "CONTROL", str(control))
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    params = dm_table(good(), "8:16")
    rdev = devmapper.create("verity-scsi0.1", "verity", params, 2048)
    assert (os.major(rdev), os.minor(rdev)) == (254, 300)
    assert [nr for nr, _ in fake.calls] == [3, 9, 6]
    for _, buf in fake.calls:
        version, data_start = struct.unpack_from("=3I", buf), struct.unpack_from("=I", buf, 16)[0]
        assert version == (4, 0, 0) and data_start == 312
        assert buf[48:48 + 15] == b"verity-scsi0.1\0"
    load = fake.calls[1][1]
    size, start, count, _open, flags = struct.unpack_from("=IIIiI", load, 12)
    assert (size, start, count, flags) == (len(load), 312, 1, devmapper.READONLY_FLAG)
    sector, length, _st, nxt, ttype = struct.unpack_from("=QQiI16s", load, 312)
    assert (sector, length, ttype.rstrip(b"\0")) == (0, 2048, b"verity")
    text = load[352:load.index(b"\0", 352)].decode()
    assert text == params and nxt == len(load) - 312 and nxt % 8 == 0
    assert fake.calls[2][1][12 + 16:12 + 20] == bytes(4)  # resume: no suspend flag
    assert devmapper.status("verity-scsi0.1") == [("verity", "C")]


# Through the allocator ---------------------------------------------------------------------


def test_layer_folder_verity_reaches_the_guest(host: HostFiles) -> None:
    folder = host.layer("l")
    (Path(folder) / "verity.json").write_text(json.dumps(good().to_json()))

    async def go() -> list[dict[str, Any]]:
        vm, backend = simulated_uvm()
        _path, handle = await add_lcow_layer(vm, folder + "/layer.vhd")
        await handle.release()
        return [o.args for o in backend.operations if o.op == "mount-scsi"]

    mounts = asyncio.run(go())
    assert mounts and mounts[0]["verity"] == "ab" * 32


def test_malformed_verity_file_is_a_clear_error(host: HostFiles) -> None:
    folder = host.layer("l")
    (Path(folder) / "verity.json").write_text('{"root_hash": "x"}')
    with pytest.raises(UvmError, match="malformed dm-verity parameters"):
        layer_verity(folder)


# The agent's verity mounts, with a fake disk and device-mapper --------------------------------


class _NoModules(kmods.ModuleLoader):
    def ensure(self, *names: str) -> None:
        pass


def test_agent_verity_mount_and_its_failures(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    pci = sysfs / "bus/pci/devices/0000:00:05.0/virtio5/host0/target0:0:0/0:0:0:1/block/sdb"
    pci.mkdir(parents=True)
    (dev / "mapper").mkdir(parents=True)
    (dev / "mapper/control").touch()
    v = good().check()
    disk = bytearray(v.hash_offset + (1 + tree_blocks(v.data_blocks)) * 4096)
    disk[v.hash_offset:v.hash_offset + SUPERBLOCK_SIZE] = superblock(v)
    (dev / "sdb").write_bytes(disk)
    created: list[tuple[str, str]] = []
    removed: list[str] = []
    mounted: list[tuple[str, str]] = []
    status = {"verity-scsi0.1": "V"}

    def create(name: str, target: str, params: str, sectors: int, **_: object) -> int:
        created.append((name, params))
        (dev / "dm-3").write_bytes(b"\0" * 2048)  # no file system on it: detect fails
        return os.makedev(254, 3)

    monkeypatch.setattr(devmapper, "create", create)
    monkeypatch.setattr(devmapper, "remove", lambda name, **_: removed.append(name))
    monkeypatch.setattr(devmapper, "status", lambda name: [("verity", status[name])])
    monkeypatch.setattr(devmapper, "kernel_messages", lambda needle, **_: [
        f"device-mapper: {needle}data block 0 is corrupted"])
    monkeypatch.setattr(agent_storage, "mount", lambda src, dst, **_: mounted.append((src, dst)))
    storage = agent_storage.Storage(_NoModules(), sysfs=str(sysfs), dev=str(dev))
    req = MountScsi(controller=0, lun=1, guest_path=str(tmp_path / "m"), read_only=True,
                    verity=v.to_json())

    # No file system behind the verity device, which is fine: an ordinary failure.
    with pytest.raises(AgentError, match="no ext4") as err:
        storage.mount_scsi(req)
    assert err.value.kind is ErrorKind.UNSUPPORTED
    assert created[-1] == ("verity-scsi0.1", dm_table(v, "0:0")) and removed[-1] == "verity-scsi0.1"
    # The same, but dm-verity says a block failed: a CORRUPT error with the kernel's words.
    status["verity-scsi0.1"] = "C"
    (sysfs / "block/sdb/holders/dm-3/dm").mkdir(parents=True)
    (sysfs / "block/sdb/holders/dm-3/dm/name").write_text("verity-scsi0.1\n")
    (sysfs / "block/sdb/dev").write_text("8:16\n")
    with pytest.raises(AgentError, match=r"data block 0 is corrupted\): it does not match "
                                         r"the root hash") as err:
        storage.mount_scsi(req)
    assert err.value.kind is ErrorKind.CORRUPT
    # A good file system: mounted from the dm device; unmounting removes the device.
    def create_ext4(name: str, target: str, params: str, sectors: int, **_: object) -> int:
        sb = bytearray(2048)
        struct.pack_into("<H", sb, 1024 + 56, 0xEF53)
        (dev / "dm-3").write_bytes(sb)
        return os.makedev(254, 3)

    monkeypatch.setattr(devmapper, "create", create_ext4)
    assert storage.mount_scsi(req) == {"device": f"{dev}/sdb", "verity": f"{dev}/dm-3",
                                       "fstype": "ext4"}
    assert mounted[-1] == (f"{dev}/dm-3", str(tmp_path / "m"))
    monkeypatch.setattr(agent_storage, "umount", lambda target: None)
    monkeypatch.setattr(agent_storage, "mounts", lambda: [])
    removed.clear()
    storage.unmount_scsi(UnmountScsi(controller=0, lun=1, guest_path=str(tmp_path / "m")))
    assert removed == ["verity-scsi0.1"]
    # Parameters that do not match the disk's superblock: refused before any dm device.
    created.clear()
    bad = MountScsi(controller=0, lun=1, guest_path=str(tmp_path / "m"), read_only=True,
                    verity=good(salt="02" * 32).to_json())
    with pytest.raises(AgentError, match="superblock does not match") as err:
        storage.mount_scsi(bad)
    assert err.value.kind is ErrorKind.CORRUPT and created == []
    with pytest.raises(AgentError, match="read-only"):
        storage.mount_scsi(MountScsi(controller=0, lun=1, guest_path="/m", verity=v.to_json()))


def test_layer_tree_is_reproducible_and_covers_replaced_files(tmp_path: Path) -> None:
    """The same layer gives the same root hash; blocks of a replaced file (zeroed by the
    writer at the end) are hashed as they end up."""
    t = testimages.TarBuilder()
    t.add("a", data=os.urandom(3 << 20))
    t.add("b", data=os.urandom(9 << 20))  # more than one 8 MiB writer buffer
    t.add("a", data=b"replaced")  # a's first blocks are freed (zeroed) at the end
    tar = t.close().tar
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()

    def root(name: str) -> str:
        _res, _size, info = write_layer(io.BytesIO(tar), tmp_path / name, diff_id=diff_id,
                                        digest=None, size=None, where="x",
                                        stop=threading.Event())
        assert info is not None
        if shutil.which("veritysetup"):
            assert verify(tmp_path / name, info).returncode == 0
        return info.root_hash

    assert root("one.img") == root("two.img")
