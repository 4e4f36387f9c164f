"""Malicious, corrupt and oversized images are refused with a clear error, and the store is left
clean: no image record, no partial layer, nothing in tmp/, nothing written outside."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import testimages
from testimages import Layer, TarBuilder
from uvmshim.image import ImageError, ImageStore, ImportEvent, import_image
from uvmshim.image import store as store_mod

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mkfs.ext4"), reason="needs root and e2fsprogs")


def assert_clean(store: ImageStore) -> None:
    """No image recorded, no work left in tmp/, and every layer present is complete."""
    index = store.root / "images.json"
    assert not index.exists() or json.loads(index.read_text())["images"] == {}
    tmp = store.root / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())
    layers = store.root / "layers" / "sha256"
    for d in layers.iterdir() if layers.exists() else []:
        assert sorted(os.listdir(d)) == ["layer.json", "layer.vhd", "verity.json"]


def refuse(tmp_path: Path, layer: Layer, match: str, *, compression: str = "gzip"
           ) -> ImageError:
    """Import a one-layer image of ``layer``; expect an ImageError matching ``match``."""
    testimages.write_oci_layout(tmp_path / "img", [layer], compression=compression)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match=match) as e:
        asyncio.run(import_image(tmp_path / "img", store=store))
    assert_clean(store)
    return e.value


def one(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Layer:
    t = TarBuilder()
    t.add(name, kind, data=b"x" if kind == tarfile.REGTYPE else b"", link=link)
    return t.close()


@pytest.mark.parametrize(("name", "match"), [
    ("../evil", r"'\.\.' in layer path"),
    ("a/../../evil", r"'\.\.' in layer path"),
    ("/abs", "absolute path"),
])
def test_escaping_names(tmp_path: Path, name: str, match: str) -> None:
    err = refuse(tmp_path, one(name), match)
    assert err.where is not None and name in err.where and "layer 0 (sha256:" in err.where
    assert not (tmp_path / "evil").exists()


def test_symlink_pointing_out(tmp_path: Path) -> None:
    refuse(tmp_path, one("a/b", tarfile.SYMTYPE, "../../../etc"), "points out of the layer")


def test_write_through_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    t = TarBuilder()
    t.add("lnk", tarfile.SYMTYPE, link=str(outside))  # absolute: allowed as a symlink...
    t.add("lnk/planted", data=b"gotcha")  # ...but never written through
    refuse(tmp_path, t.close(), "written through the symlink /lnk")
    assert not list(outside.iterdir())


def test_write_through_in_layer_symlink(tmp_path: Path) -> None:
    t = TarBuilder()
    t.dir("real")
    t.add("lnk", tarfile.SYMTYPE, link="real")
    t.add("lnk/x", data=b"x")
    refuse(tmp_path, t.close(), "written through the symlink")


@pytest.mark.parametrize(("link", "match"), [
    ("../../etc/passwd", r"'\.\.' in layer path"),
    ("/etc/passwd", "absolute path"),
    ("missing", "not in this layer"),
])
def test_hardlink_pointing_out(tmp_path: Path, link: str, match: str) -> None:
    refuse(tmp_path, one("hl", tarfile.LNKTYPE, link), match)


def test_hardlink_through_symlink(tmp_path: Path) -> None:
    t = TarBuilder()
    t.add("s", tarfile.SYMTYPE, link="/etc")
    t.add("hl", tarfile.LNKTYPE, link="s/passwd")
    refuse(tmp_path, t.close(), "written through the symlink /s")


def test_truncated_gzip(tmp_path: Path) -> None:
    layer = testimages.upper_layer()
    bad = Layer(layer.tar)
    bad.gz = layer.gz[: len(layer.gz) // 2]  # descriptor digest and size match the cut blob
    refuse(tmp_path, bad, "corrupt or truncated layer")


def test_truncated_tar(tmp_path: Path) -> None:
    layer = testimages.upper_layer()
    cut = Layer(layer.tar[:1536])
    # The config still names the whole tar's diff id: the cut is caught either way.
    cut_cfg = testimages.config([layer])
    testimages.write_oci_layout(tmp_path / "img", [cut], cfg=cut_cfg,
                                compression="none")
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="truncated|diff id"):
        asyncio.run(import_image(tmp_path / "img", store=store))
    assert_clean(store)


def test_garbage_gzip(tmp_path: Path) -> None:
    bad = Layer(b"")
    bad.gz = b"\x1f\x8b" + os.urandom(200)
    refuse(tmp_path, bad, "corrupt or truncated layer")


def test_blob_digest_mismatch(tmp_path: Path) -> None:
    layer = testimages.upper_layer()
    testimages.write_oci_layout(tmp_path / "img", [layer])
    blob = tmp_path / "img" / "blobs" / "sha256" / layer.gz_digest[7:]
    # Same length, valid gzip, different bytes: only the digest tells.
    blob.write_bytes(gzip.compress(layer.tar, compresslevel=1, mtime=0).ljust(len(layer.gz),
                                                                              b"\0"))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="does not match its digest") as e:
        asyncio.run(import_image(tmp_path / "img", store=store))
    assert e.value.where is not None and layer.gz_digest in e.value.where
    assert_clean(store)


def test_diff_id_mismatch(tmp_path: Path) -> None:
    layer = testimages.upper_layer()
    cfg = testimages.config([layer])
    cfg["rootfs"]["diff_ids"] = ["sha256:" + hashlib.sha256(b"other").hexdigest()]
    testimages.write_oci_layout(tmp_path / "img", [layer], cfg=cfg)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="does not match its diff id"):
        asyncio.run(import_image(tmp_path / "img", store=store))
    assert_clean(store)


def test_manifest_tampered(tmp_path: Path) -> None:
    testimages.write_oci_layout(tmp_path / "img", [one("f")])
    idx = json.loads((tmp_path / "img" / "index.json").read_text())
    mpath = tmp_path / "img" / "blobs" / "sha256" / idx["manifests"][0]["digest"][7:]
    mpath.write_bytes(mpath.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="content does not match its digest"):
        asyncio.run(import_image(tmp_path / "img", store=store))
    assert_clean(store)


def test_docker_archive_tampered_layer(tmp_path: Path) -> None:
    layers = testimages.image_layers()
    layers[1] = Layer(layers[1].tar)
    cfg = testimages.config(layers)
    evil = TarBuilder()
    evil.add("evil", data=b"not what the config says")
    testimages.write_docker_archive(tmp_path / "d.tar", [layers[0], evil.close()], cfg=cfg)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError):
        asyncio.run(import_image(tmp_path / "d.tar", store=store))
    assert_clean(store)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="not an image"):
        asyncio.run(import_image(tmp_path / "junk", store=store))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ImageError, match="neither an OCI image layout"):
        asyncio.run(import_image(tmp_path / "emptydir", store=store))
    assert_clean(store)


def test_not_enough_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 4096)
    e = refuse(tmp_path, testimages.upper_layer(), "needs about")
    assert e.hint is not None and "UVMSHIM_IMAGE_ROOT" in e.hint


def test_failure_in_second_layer_keeps_only_complete_layers(tmp_path: Path) -> None:
    layers = [testimages.upper_layer(), one("../evil")]
    testimages.write_oci_layout(tmp_path / "img", layers)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="layer 1"):
        asyncio.run(import_image(tmp_path / "img", store=store))
    assert_clean(store)
    assert store.has_layer(layers[0].diff_id) and not store.has_layer(layers[1].diff_id)


def test_cancel_leaves_no_partial_layer(tmp_path: Path) -> None:
    testimages.write_oci_layout(tmp_path / "img", testimages.image_layers())
    store = ImageStore(tmp_path / "store")

    async def go() -> None:
        def cancel_midway(ev: ImportEvent) -> None:
            if ev.kind == "layer-bytes":
                task.cancel()  # as Ctrl-C does, while the first layer is being unpacked

        task = asyncio.create_task(import_image(tmp_path / "img", store=store,
                                                progress=cancel_midway))
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())
    assert_clean(store)
    assert not list((store.root / "layers").glob("*/*"))


@pytest.mark.skipif(not shutil.which("zstd"), reason="needs zstd")
def test_truncated_zstd(tmp_path: Path) -> None:
    layer = testimages.upper_layer()
    testimages.write_oci_layout(tmp_path / "full", [layer], compression="zstd")
    blob = next(p for p in (tmp_path / "full" / "blobs" / "sha256").iterdir()
                if p.read_bytes()[:4] == b"\x28\xb5\x2f\xfd")
    bad = Layer(layer.tar)
    bad.gz = blob.read_bytes()[:-100]  # write_oci_layout stores .gz as given for gzip
    refuse(tmp_path, bad, "corrupt or truncated layer")
