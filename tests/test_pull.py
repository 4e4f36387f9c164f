"""``uvmshim image pull`` against a real registry on loopback (Debian's ``docker-registry``).

The module starts one distribution registry on 127.0.0.1 (a free port, storage in a temporary
directory, plain HTTP) and pushes test images into it with ``skopeo copy``. Pulled images must
import like local ones and share layers; a registry that serves a changed or truncated blob,
or only an image for another platform, must give a clear error and leave nothing in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import registry as reg
import testimages
from uvmshim.image import ImageError, ImageStore, ImportEvent, layer_folders
from uvmshim.image.pull import PullEvent, default_name, docker_reference, pull_image
from uvmshim.protocol.verity import VERITY_FILE

pytestmark = pytest.mark.skipif(not reg.available() or not os.path.exists(testimages.BUSYBOX),
                                reason="needs docker-registry, skopeo and busybox-static")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(host:port, storage root)`` of a registry that lives as long as the module."""
    with reg.serve(tmp_path_factory.mktemp("registry")) as where:
        yield where


def push(layout: Path, dest: str, *, all_images: bool = False) -> None:
    reg.push(layout, testimages.REF, dest, all_images=all_images)


def assert_nothing_cached(store: ImageStore) -> None:
    index = store.root / "images.json"
    assert not index.exists() or json.loads(index.read_text())["images"] == {}
    for sub in ("layers", "tmp", "pulls"):
        d = store.root / sub
        left = [p for p in d.rglob("*") if p.is_file()] if d.exists() else []
        assert left == [], left


def pull(ref: str, store: ImageStore, **kw: object) -> tuple[object, list[object]]:
    events: list[object] = []
    rec = asyncio.run(pull_image(ref, store=store, tls_verify=False,
                                 progress=events.append, **kw))  # type: ignore[arg-type]
    return rec, events


def test_pull_imports_and_shares_layers(registry: tuple[str, Path], tmp_path: Path) -> None:
    host, _ = registry
    base, upper = testimages.image_layers()
    testimages.write_oci_layout(tmp_path / "two", [base, upper])
    testimages.write_oci_layout(tmp_path / "one", [base], cfg=testimages.config([base]))
    push(tmp_path / "two", f"{host}/test/busybox:two")
    push(tmp_path / "one", f"{host}/test/base:one")
    store = ImageStore(tmp_path / "store")

    # Through the command line: progress off (no terminal), the record named by the ref.
    env = {**os.environ, "UVMSHIM_IMAGE_ROOT": str(store.root)}
    res = subprocess.run(["uvmshim", "image", "pull", "--no-tls-verify",
                          f"{host}/test/busybox:two"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{host}/test/busybox:two sha256:")
    rec = store.get(f"{host}/test/busybox:two")
    assert rec.diff_ids == (base.diff_id, upper.diff_id)
    assert rec.source == f"docker://{host}/test/busybox:two"
    assert all((d / VERITY_FILE).is_file() for d in rec.layer_dirs)
    assert len(layer_folders(rec, "/scratch")) == 3

    # The second image's only layer is the first's base: downloaded, but not converted again.
    rec2, events = pull(f"{host}/test/base:one", store, name="base")
    kinds = [e.kind for e in events if isinstance(e, ImportEvent)]
    assert "layer-cached" in kinds and "layer-start" not in kinds
    done = [e for e in events if isinstance(e, PullEvent) and e.kind == "blob-done"]
    assert [e.digest for e in done] == [base.gz_digest] and done[0].total == len(base.gz)
    assert rec2.layer_dirs == rec.layer_dirs[:1]  # type: ignore[attr-defined]
    assert not any((store.root / "pulls").iterdir())


def test_registry_lies_about_a_blob(registry: tuple[str, Path], tmp_path: Path) -> None:
    host, storage = registry
    t = testimages.TarBuilder()
    t.add("payload", data=hashlib.shake_256(b"lie").digest(300_000))
    layer = t.close()
    testimages.write_oci_layout(tmp_path / "img", [layer])
    push(tmp_path / "img", f"{host}/test/liar:1")
    blob = reg.blob_path(storage, layer.gz_digest)
    good = blob.read_bytes()
    store = ImageStore(tmp_path / "store")
    try:
        # The same size, one byte changed.
        blob.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
        with pytest.raises(ImageError, match="does not match its digest") as err:
            pull(f"{host}/test/liar:1", store)
        assert layer.gz_digest in str(err.value)
        assert_nothing_cached(store)
        # Cut short.
        blob.write_bytes(good[: len(good) // 2])
        with pytest.raises(ImageError, match="does not match its digest"):
            pull(f"{host}/test/liar:1", store)
        assert_nothing_cached(store)
    finally:
        blob.write_bytes(good)
    rec, _ = pull(f"{host}/test/liar:1", store)
    assert rec.diff_ids == (layer.diff_id,)  # type: ignore[attr-defined]


def _arm64_layout(dest: Path, *, as_index: bool) -> None:
    base = testimages.image_layers()[:1]
    cfg = {**testimages.config(base), "architecture": "arm64"}
    testimages.write_oci_layout(dest, base, cfg=cfg)
    if not as_index:
        return
    index = json.loads((dest / "index.json").read_text())
    desc = dict(index["manifests"][0])
    annotations = desc.pop("annotations")
    inner = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{**desc, "platform": {"os": "linux",
                                                            "architecture": "arm64"}}]}).encode()
    digest = hashlib.sha256(inner).hexdigest()
    (dest / "blobs/sha256" / digest).write_bytes(inner)
    index["manifests"] = [{"mediaType": "application/vnd.oci.image.index.v1+json",
                           "digest": f"sha256:{digest}", "size": len(inner),
                           "annotations": annotations}]
    (dest / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("as_index", [False, True], ids=["manifest", "index"])
def test_image_for_another_platform(registry: tuple[str, Path], tmp_path: Path,
                                    as_index: bool) -> None:
    host, _ = registry
    _arm64_layout(tmp_path / "img", as_index=as_index)
    push(tmp_path / "img", f"{host}/test/arm:{int(as_index)}", all_images=as_index)
    store = ImageStore(tmp_path / "store")
    match = "no image for linux/amd64 in this image .it has linux/arm64" if as_index else \
        "the image is for linux/arm64; this host runs linux/amd64"
    with pytest.raises(ImageError, match=match):
        pull(f"{host}/test/arm:{int(as_index)}", store)
    assert_nothing_cached(store)


def test_no_such_image_and_plain_http(registry: tuple[str, Path], tmp_path: Path) -> None:
    host, _ = registry
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="no such image in the registry"):
        pull(f"{host}/test/missing:1", store)
    with pytest.raises(ImageError, match="TLS failed") as err:
        asyncio.run(pull_image(f"{host}/test/missing:1", store=store))
    assert err.value.hint is not None and "--no-tls-verify" in err.value.hint
    assert_nothing_cached(store)


# Without a registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["", "-x", "a b", "docker://", "oci:/tmp/x", "a/../b",
                                 "http://example.org/x", "a//b"])
def test_bad_references(ref: str) -> None:
    with pytest.raises(ImageError, match="not an image reference"):
        docker_reference(ref)


def test_names() -> None:
    assert docker_reference("docker://example.org/a/b:1") == "example.org/a/b:1"
    assert default_name("example.org:5000/a/b") == "example.org:5000/a/b:latest"
    assert default_name("example.org:5000/a/b:1") == "example.org:5000/a/b:1"
    digest = "sha256:" + "0" * 64
    assert default_name(f"a/b@{digest}") == f"a/b@{digest}"


def test_authfile_reaches_skopeo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """skopeo gets --authfile for the inspect and the copy (a fake skopeo records its argv)."""
    log = tmp_path / "argv"
    fake = tmp_path / "bin" / "skopeo"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho 'denied: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="refused access") as err:
        asyncio.run(pull_image("example.org/a:1", store=store, authfile="/run/auth.json"))
    assert err.value.hint is not None and "login" in err.value.hint
    assert "--authfile /run/auth.json" in log.read_text()
    with contextlib.suppress(FileNotFoundError):
        assert_nothing_cached(store)
