"""Importing the busybox test image from every on-disk form, and what the layer disks hold.

Needs root, e2fsprogs (mkfs.ext4, debugfs, e2fsck), qemu-utils (qemu-img) and busybox-static.
The layer disks are read with ``qemu-img convert`` + ``debugfs``; nothing is mounted.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import testimages
from uvmshim.cli.image_cmd import image_group, parse_size
from uvmshim.image import (
    ImageError,
    ImageStore,
    ImportEvent,
    create_scratch,
    image_config,
    import_image,
    layer_folders,
    list_images,
    remove_image,
    vhd,
)
from uvmshim.uvm.qemu.host import detect_image_format

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "qemu-img"))
    or not os.path.exists(testimages.BUSYBOX),
    reason="needs root, e2fsprogs, qemu-utils and busybox-static")


# Reading ext4 images without mounting them ----------------------------------------------------


class Ext4:
    """An ext4 filesystem inside a ``layer.vhd``, read with debugfs."""

    def __init__(self, vhd_path: Path, work: Path) -> None:
        self.raw = work / (vhd_path.parent.name + ".raw")
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd_path, self.raw],
                       check=True)

    def debugfs(self, cmd: str) -> str:
        return subprocess.run(["debugfs", "-R", cmd, self.raw], capture_output=True, text=True,
                              check=True).stdout

    def stat(self, path: str) -> dict[str, str]:
        out = self.debugfs(f"stat {path}")
        if not out.strip():
            raise FileNotFoundError(path)
        info: dict[str, str] = {}
        for key in ("Inode", "Type", "Mode", "User", "Group", "Links"):
            m = re.search(rf"\b{key}:\s+(\S+(?: special)?)", out)
            if m:
                info[key.lower()] = m.group(1)
        if m := re.search(r"^\s*mtime: (0x[0-9a-f]+)", out, re.M):
            info["mtime"] = str(int(m.group(1), 16))
        if m := re.search(r"Device major/minor number: (\d+):(\d+)", out):
            info["dev"] = f"{int(m.group(1))}:{int(m.group(2))}"
        if m := re.search(r'Fast link dest: "(.*)"', out):
            info["link"] = m.group(1)
        for m in re.finditer(r"^\s+([a-z]+\.[\w.]+) \(\d+\) = (.*)$", out, re.M):
            info[f"xattr:{m.group(1)}"] = m.group(2).strip()
        return info

    def ls(self, path: str) -> list[str]:
        names = [line.split("/")[5] for line in self.debugfs(f"ls -p {path}").splitlines()
                 if line.startswith("/")]
        return sorted(n for n in names if n not in (".", ".."))

    def cat(self, path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", self.raw], capture_output=True,
                              check=True).stdout

    def fsck(self) -> None:
        res = subprocess.run(["e2fsck", "-fn", self.raw], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def qemu_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    info: dict[str, object] = json.loads(out)
    return info


# Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return testimages.build_all(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def layers() -> list[testimages.Layer]:
    return testimages.image_layers()


@pytest.fixture(scope="module")
def imported(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[ImageStore, list[Ext4]]:
    """The OCI layout imported once; its two layer filesystems (base, upper) as raw images."""
    root = tmp_path_factory.mktemp("store")
    store = ImageStore(root / "store")
    rec = asyncio.run(import_image(images["oci"], store=store))
    return store, [Ext4(d / "layer.vhd", root) for d in rec.layer_dirs]


# Footer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4096, 2 << 20, 12_345_678, (1 << 30) + 1, 200 << 30])
def test_geometry_rounding_is_exact(size: int) -> None:
    r = vhd.round_to_geometry(size)
    assert r >= size and r % 512 == 0
    if r // 512 < vhd.MAX_CHS_SECTORS:
        assert vhd.geometry(r // 512).total_sectors == r // 512
        assert r - size < 255 * 16 * 512 + 512


def test_footer_fields() -> None:
    raw = vhd.footer(vhd.round_to_geometry(10 << 20), unique_id=b"u" * 16, timestamp=946684800)
    assert len(raw) == 512 and raw[:8] == b"conectix"
    assert raw[16:24] == b"\xff" * 8  # fixed: no dynamic header
    assert raw[60:64] == b"\0\0\0\x02"
    f = vhd.parse_footer(raw)
    assert (f.disk_type, f.creator_app, f.unique_id) == (2, b"uvms", b"u" * 16)
    bad = raw[:100] + b"x" + raw[101:]
    with pytest.raises(ValueError, match="checksum"):
        vhd.parse_footer(bad)


@pytest.mark.parametrize("size", [2 << 20, 12_345_678, 100 << 20])
def test_qemu_vpc_reads_the_exact_size(tmp_path: Path, size: int) -> None:
    size = vhd.round_to_geometry(size)
    p = tmp_path / "d.vhd"
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(vhd.footer(size))
    info = qemu_info(p)
    assert info["format"] == "vpc" and info["virtual-size"] == size
    assert detect_image_format(p) == "vpc"


# Importing --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["oci", "oci-archive", "docker-archive"])
def test_import_each_form(images: dict[str, Path], layers: list[testimages.Layer],
                          tmp_path: Path, form: str) -> None:
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(images[form], store=store))
    assert rec.name == testimages.REF
    assert list(rec.diff_ids) == [layer.diff_id for layer in layers]
    assert rec.size == sum(len(layer.tar) for layer in layers)
    assert rec.created == "2023-11-14T22:13:20Z"  # from the config
    for d in rec.layer_dirs:
        p = d / "layer.vhd"
        info = qemu_info(p)
        assert info["format"] == "vpc"
        assert info["virtual-size"] == p.stat().st_size - 512
        assert vhd.parse_footer(p.read_bytes()[-512:]).current_size == info["virtual-size"]
        Ext4(p, tmp_path).fsck()
    assert [r.name for r in list_images(store)] == [testimages.REF]
    assert not any((store.root / "tmp").iterdir())


@pytest.mark.parametrize("compression", [
    pytest.param("zstd", marks=pytest.mark.skipif(not shutil.which("zstd"),
                                                  reason="needs zstd")),
    "none"])
def test_other_compressions(layers: list[testimages.Layer], tmp_path: Path,
                            compression: str) -> None:
    testimages.write_oci_layout(tmp_path / "img", layers, compression=compression)
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(tmp_path / "img", store=store))
    assert list(rec.diff_ids) == [layer.diff_id for layer in layers]
    up = Ext4(rec.layer_dirs[1] / "layer.vhd", tmp_path)
    assert up.stat("/opq")["xattr:trusted.overlay.opaque"] == '"y"'


def test_base_layer_contents(imported: tuple[ImageStore, list[Ext4]]) -> None:
    base = imported[1][0]
    bb = base.stat("/bin/busybox")
    assert (bb["type"], bb["mode"], bb["user"]) == ("regular", "0755", "0")
    assert base.cat("/bin/busybox") == Path(testimages.BUSYBOX).read_bytes()
    assert base.stat("/bin/sh")["link"] == "busybox"
    assert base.ls("/opq") == ["base-a", "base-b"]
    assert base.stat("/tmp")["mode"] == "01777"
    assert base.stat("/bin/busybox")["mtime"] == str(testimages.MTIME)


def test_upper_layer_contents(imported: tuple[ImageStore, list[Ext4]]) -> None:
    up = imported[1][1]
    wh = up.stat("/etc/deleted-me")  # the whiteout
    assert (wh["type"], wh["dev"], wh["user"], wh["group"]) == ("character special", "0:0",
                                                                "0", "0")
    assert up.ls("/etc") == ["deleted-me"]
    assert up.stat("/opq")["xattr:trusted.overlay.opaque"] == '"y"'
    assert up.ls("/opq") == ["upper-only"]  # the marker itself is not in the filesystem
    assert up.stat("/usr/bin/suid")["mode"] == "04755"
    owned = up.stat("/home/user/owned")
    assert (owned["user"], owned["group"], owned["mode"]) == ("1000", "1000", "0640")
    home = up.stat("/home/user")
    assert (home["type"], home["user"], home["mode"]) == ("directory", "1000", "0750")
    target, hard = up.stat("/links/target"), up.stat("/links/hard")
    assert target["inode"] == hard["inode"] and target["links"] == "2"
    assert up.stat("/links/soft")["link"] == "target"
    assert up.stat("/links/abs")["link"] == "/etc/passwd"
    assert up.stat("/things/fifo")["type"] == "FIFO"
    null = up.stat("/things/null")
    assert (null["type"], null["dev"], null["mode"]) == ("character special", "1:3", "0666")
    caps = up.stat("/things/caps")
    assert caps["xattr:user.test"] == '"hello"'
    assert caps["xattr:security.capability"].replace(" ", "") == testimages.CAP_NET_RAW.hex()
    assert up.stat("/tmp")["mode"] == "01777"
    # Directory mtimes survive their children being created after them.
    assert up.stat("/links")["mtime"] == str(testimages.MTIME)


def test_layer_root_attributes_and_whiteouts(tmp_path: Path) -> None:
    """The root entry's mode/owner/mtime/xattrs reach the layer root; no lost+found."""
    t = testimages.TarBuilder()
    t.dir("./", mode=0o700, uid=5, gid=6)
    t.add(".wh..wh..opq")
    t.add(".wh.gone")
    t.add("kept", data=b"k")
    testimages.write_oci_layout(tmp_path / "img", [t.close()])
    rec = asyncio.run(import_image(tmp_path / "img", store=ImageStore(tmp_path / "store")))
    fs = Ext4(rec.layer_dirs[0] / "layer.vhd", tmp_path)
    root = fs.stat("/")
    assert (root["mode"], root["user"], root["group"]) == ("0700", "5", "6")
    assert root["mtime"] == str(testimages.MTIME)
    assert root["xattr:trusted.overlay.opaque"] == '"y"'
    assert fs.stat("/gone")["dev"] == "0:0"
    assert fs.ls("/") == ["gone", "kept"]  # no lost+found: the layer has none
    fs.fsck()


def test_reimport_does_no_work(images: dict[str, Path], tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(images["oci"], store=store))
    before = [os.stat(d / "layer.vhd") for d in rec.layer_dirs]
    events: list[ImportEvent] = []
    for form in ("oci", "docker-archive", "oci-archive"):
        asyncio.run(import_image(images[form], store=store, progress=events.append))
    kinds = {e.kind for e in events}
    assert kinds == {"image", "layer-cached", "done"}
    after = [os.stat(d / "layer.vhd") for d in rec.layer_dirs]
    assert [(s.st_ino, s.st_mtime_ns) for s in before] == [(s.st_ino, s.st_mtime_ns)
                                                           for s in after]


def _rewrite_manifest(layout: Path, edit: Any) -> None:
    """Apply ``edit`` to the layout's manifest and re-point its index at the new blob."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    edit(manifest)
    raw = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(raw)
    desc.update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))


def test_wrong_digest_of_a_cached_layer_is_noticed(layers: list[testimages.Layer],
                                                   tmp_path: Path) -> None:
    """Issue 15, point 7: the layer is in the store, but the manifest must still describe it."""
    store = ImageStore(tmp_path / "store")
    testimages.write_oci_layout(tmp_path / "good", layers)
    asyncio.run(import_image(tmp_path / "good", name="good", store=store))
    index_before = store.index_path.read_bytes()

    # The manifest names the upper layer's blob where the base layer (cached) belongs.
    swapped = tmp_path / "swapped"
    testimages.write_oci_layout(swapped, layers)

    def swap(manifest: dict[str, Any]) -> None:
        manifest["layers"][0] = dict(manifest["layers"][1])

    _rewrite_manifest(swapped, swap)
    with pytest.raises(ImageError, match="does not match its diff id"):
        asyncio.run(import_image(swapped, name="bad", store=store))

    # The blob the manifest names holds other bytes than its digest says.
    corrupt = tmp_path / "corrupt"
    testimages.write_oci_layout(corrupt, layers)
    d0 = json.loads((corrupt / "index.json").read_text())["manifests"][0]["digest"]
    m0 = json.loads((corrupt / "blobs" / "sha256" / d0[7:]).read_text())
    blob = corrupt / "blobs" / "sha256" / m0["layers"][1]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="does not match its digest"):
        asyncio.run(import_image(corrupt, name="bad", store=store))

    assert store.index_path.read_bytes() == index_before  # nothing recorded
    assert [r.name for r in list_images(store)] == ["good"]
    # The right blob is still accepted, and cheaply: its digest is noted as verified.
    meta = json.loads((store.layer_dir(layers[0].diff_id) / "layer.json").read_text())
    assert meta["blobs"] == [m0["layers"][0]["digest"]]
    asyncio.run(import_image(tmp_path / "good", name="again", store=store))


def test_concurrent_imports_convert_once(images: dict[str, Path], tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    events: list[ImportEvent] = []

    async def both() -> None:
        await asyncio.gather(
            import_image(images["oci"], name="one", store=store, progress=events.append),
            import_image(images["docker-archive"], name="two", store=store,
                         progress=events.append))

    asyncio.run(both())
    assert sum(e.kind == "layer-start" for e in events) == 2  # one per layer, not per import
    assert sum(e.kind == "layer-cached" for e in events) == 2
    assert [r.name for r in list_images(store)] == ["one", "two"]


def test_rm_keeps_shared_layers(images: dict[str, Path], layers: list[testimages.Layer],
                                tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    other = testimages.TarBuilder()
    other.add("other", data=b"other\n")
    layers_b = [layers[0], other.close()]
    testimages.write_oci_layout(tmp_path / "b", layers_b, ref="b:1")
    a = asyncio.run(import_image(images["oci"], name="a", store=store))
    b = asyncio.run(import_image(tmp_path / "b", store=store))
    assert b.name == "b:1" and a.diff_ids[0] == b.diff_ids[0]
    assert remove_image("a", store) == [a.diff_ids[1]]
    assert store.has_layer(a.diff_ids[0]) and not store.has_layer(a.diff_ids[1])
    assert [r.name for r in list_images(store)] == ["b:1"]
    assert sorted(remove_image("b:1", store)) == sorted(b.diff_ids)
    assert not list((store.root / "layers" / "sha256").iterdir())
    with pytest.raises(ImageError, match="no image named"):
        remove_image("b:1", store)


def test_reimport_under_a_taken_name_replaces(images: dict[str, Path],
                                              layers: list[testimages.Layer],
                                              tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    a = asyncio.run(import_image(images["oci"], name="x", store=store))
    other = testimages.TarBuilder()
    other.add("v2", data=b"2")
    testimages.write_oci_layout(tmp_path / "v2", [layers[0], other.close()])
    b = asyncio.run(import_image(tmp_path / "v2", name="x", store=store))
    assert [r.id for r in list_images(store)] == [b.id] != [a.id]
    assert store.has_layer(a.diff_ids[0]) and not store.has_layer(a.diff_ids[1])


def test_layer_folders_and_config(images: dict[str, Path], tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(images["docker-archive"], store=store))
    folders = layer_folders(rec, tmp_path / "scratch")
    assert folders == [str(store.layer_dir(rec.diff_ids[1])), str(store.layer_dir(
        rec.diff_ids[0])), str(tmp_path / "scratch")]
    assert all(Path(f, "layer.vhd").is_file() for f in folders[:-1])
    cfg = image_config(rec)
    assert cfg.entrypoint == ["/bin/sh", "-c"] and cfg.cmd == ["echo hello"]
    assert cfg.env == ["PATH=/usr/bin:/bin", "HOME=/root"]
    assert (cfg.working_dir, cfg.user) == ("/data", "0:0")


def test_empty_layers_are_left_out_of_layer_folders(tmp_path: Path,
                                                    layers: list[testimages.Layer]) -> None:
    empty = testimages.Layer(bytes(1024))
    testimages.write_oci_layout(tmp_path / "img", [layers[0], empty, layers[1], empty])
    store = ImageStore(tmp_path / "store")
    rec = asyncio.run(import_image(tmp_path / "img", store=store))
    assert len(rec.diff_ids) == 4 and rec.diff_ids[1] == rec.diff_ids[3]
    assert layer_folders(rec, "s") == [str(store.layer_dir(layers[1].diff_id)),
                                       str(store.layer_dir(layers[0].diff_id)), "s"]
    Ext4(store.layer_dir(empty.diff_id) / "layer.vhd", tmp_path).fsck()


def test_name_selects_among_several(tmp_path: Path, layers: list[testimages.Layer]) -> None:
    testimages.write_oci_layout(tmp_path / "two", layers, ref="one")
    idx = json.loads((tmp_path / "two" / "index.json").read_text())
    second = dict(idx["manifests"][0], annotations={"org.opencontainers.image.ref.name": "two"})
    idx["manifests"].append(second)
    (tmp_path / "two" / "index.json").write_text(json.dumps(idx))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="choose one with --name") as e:
        asyncio.run(import_image(tmp_path / "two", store=store))
    assert e.value.hint == "names: one, two"
    assert asyncio.run(import_image(tmp_path / "two", name="two", store=store)).name == "two"


def test_multi_platform_index(tmp_path: Path, layers: list[testimages.Layer]) -> None:
    """docker save (25+) style: index.json → a platform index → the host's manifest only."""
    img = tmp_path / "img"
    testimages.write_oci_layout(img, layers, ref="x")
    idx = json.loads((img / "index.json").read_text())
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    mine = dict(idx["manifests"][0], platform={"os": "linux", "architecture": arch})
    mine.pop("annotations")
    other = dict(mine, digest="sha256:" + "0" * 64,  # not in the layout, as docker leaves it
                 platform={"os": "linux", "architecture": "s390x" if arch != "s390x"
                           else "amd64"})
    plat = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [other, mine]}).encode()
    digest = "sha256:" + hashlib.sha256(plat).hexdigest()
    (img / "blobs" / "sha256" / digest[7:]).write_bytes(plat)
    idx["manifests"] = [{"mediaType": "application/vnd.oci.image.index.v1+json",
                         "digest": digest, "size": len(plat),
                         "annotations": {"io.containerd.image.name": "docker.io/library/x:1",
                                         "org.opencontainers.image.ref.name": "1"}}]
    (img / "index.json").write_text(json.dumps(idx))
    rec = asyncio.run(import_image(img, store=ImageStore(tmp_path / "store")))
    assert rec.name == "docker.io/library/x:1"
    assert rec.manifest_digest == mine["digest"]


def test_gzipped_docker_archive(images: dict[str, Path], tmp_path: Path) -> None:
    """``docker save | gzip``."""
    gz = tmp_path / "image.tar.gz"
    gz.write_bytes(gzip.compress(images["docker-archive"].read_bytes(), compresslevel=1))
    rec = asyncio.run(import_image(gz, store=ImageStore(tmp_path / "store")))
    assert rec.name == testimages.REF and len(rec.diff_ids) == 2


# Scratch ----------------------------------------------------------------------------------


def test_create_scratch(tmp_path: Path) -> None:
    path = asyncio.run(create_scratch(tmp_path / "c1", 256 << 20))
    assert path == tmp_path / "c1" / "sandbox.vhdx"
    assert detect_image_format(path) == "vhdx"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)
    assert (info["format"], info["virtual-size"]) == ("vhdx", 256 << 20)
    assert path.stat().st_blocks * 512 < 16 << 20  # sparse / dynamic
    raw = tmp_path / "s.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True)
    res = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert sorted(os.listdir(tmp_path / "c1")) == ["sandbox.vhdx"]
    with pytest.raises(ImageError, match="already exists"):
        asyncio.run(create_scratch(tmp_path / "c1", 256 << 20))


# Command line -----------------------------------------------------------------------------


def test_cli_import_ls_rm(images: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    root = ["--root", str(tmp_path / "store")]
    res = runner.invoke(image_group, [*root, "import", str(images["oci-archive"]),
                                      "--name", "bb"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("bb sha256:")
    res = runner.invoke(image_group, [*root, "ls"])
    assert res.exit_code == 0 and "bb" in res.stdout and "2.1 MiB" in res.stdout
    res = runner.invoke(image_group, [*root, "ls", "--json"])
    assert json.loads(res.stdout)[0]["name"] == "bb"
    res = runner.invoke(image_group, [*root, "rm", "bb"])
    assert res.exit_code == 0 and "2 layers freed" in res.stdout
    res = runner.invoke(image_group, [*root, "import", str(tmp_path / "nope")])
    assert isinstance(res.exception, ImageError)


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(ImageError):
        parse_size("ten")
