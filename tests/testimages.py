"""Small test images built from busybox-static, without a registry or a container engine.

Used by the image tests and ``bench/bench_image_import.py``; not part of the installed package.

The image ``uvmshim-test:latest`` has two layers:

* **base**: ``/bin/busybox`` with an applet symlink for each applet, ``/etc/passwd`` and
  ``/etc/group``, ``/etc/deleted-me``, ``/opq/{base-a,base-b}`` and ``/data/keep``.
* **upper**: deletes ``/etc/deleted-me`` (whiteout), makes ``/opq`` opaque and adds
  ``/opq/upper-only``, and holds one of each thing a layer can: a setuid file, a file and a
  directory owned by 1000:1000, a sticky directory, a symlink (relative and absolute), a hard
  link, a fifo, a character device and a file with xattrs.

:data:`CONTAINER_CHECK` is a shell script that, run inside a container of this image, exits 0
only if the overlay shows the right tree; the UVM tests run it. The writers produce the three
forms :mod:`uvmshim.image.layout` reads: an OCI layout directory, an oci-archive and a
docker-archive (the legacy ``docker save`` form).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"
REF = "uvmshim-test:latest"
MTIME = 1_700_000_000
#: security.capability granting cap_net_raw (v2 format), as ping has.
CAP_NET_RAW = bytes.fromhex("0000000220000000000000000000000000000000")

#: Run with busybox sh in a container of the test image: exits 0 iff the overlay is right.
CONTAINER_CHECK = r"""
set -e
test ! -e /etc/deleted-me
test ! -e /lost+found
test -f /etc/passwd
test "$(ls /opq)" = "upper-only"
test "$(cat /data/keep)" = "base"
test "$(stat -c %a /usr/bin/suid)" = "4755"
test "$(stat -c %u:%g /home/user/owned)" = "1000:1000"
test "$(stat -c %a /home/user/owned)" = "640"
test "$(stat -c %u:%g:%a /home/user)" = "1000:1000:750"
test "$(stat -c %a /tmp)" = "1777"
test "$(readlink /links/soft)" = "target"
test "$(readlink /links/abs)" = "/etc/passwd"
test "$(cat /links/soft)" = "linked"
test "$(stat -c %i /links/hard)" = "$(stat -c %i /links/target)"
test "$(stat -c %h /links/target)" = "2"
test -p /things/fifo
test -c /things/null
test "$(stat -c %t:%T /things/null)" = "1:3"
echo overlay-ok
"""


@dataclass
class Layer:
    """A layer tar in memory, and its digests."""

    tar: bytes
    gz: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.gz = gzip.compress(self.tar, compresslevel=6, mtime=0)

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    @property
    def gz_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.gz).hexdigest()


class TarBuilder:
    """Adds entries to an in-memory PAX tar with fixed defaults (root, MTIME)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tf = tarfile.open(  # noqa: SIM115 (closed by close())
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"",
            mode: int = 0o644, uid: int = 0, gid: int = 0, link: str = "",
            dev: tuple[int, int] = (0, 0), xattrs: dict[str, bytes] | None = None) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, MTIME
        ti.linkname = link
        ti.devmajor, ti.devminor = dev
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                              for k, v in xattrs.items()}
        if kind == tarfile.REGTYPE:
            ti.size = len(data)
            self._tf.addfile(ti, io.BytesIO(data))
        else:
            self._tf.addfile(ti)

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.add(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)

    def close(self) -> Layer:
        self._tf.close()
        return Layer(self._buf.getvalue())


def applets(busybox: str = BUSYBOX) -> list[str]:
    """The applet names busybox has (``busybox --list``)."""
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in out.stdout.split() if a and "/" not in a and a != "busybox"})


def base_layer(busybox: str = BUSYBOX) -> Layer:
    t = TarBuilder()
    t.dir("./")
    t.dir("bin")
    t.add("bin/busybox", data=Path(busybox).read_bytes(), mode=0o755)
    for a in applets(busybox):
        t.add(f"bin/{a}", tarfile.SYMTYPE, link="busybox", mode=0o777)
    t.dir("etc")
    t.add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:"
                             b"/bin/sh\n")
    t.add("etc/group", data=b"root:x:0:\nuser:x:1000:\n")
    t.add("etc/deleted-me", data=b"gone in the upper layer\n")
    t.dir("opq")
    t.add("opq/base-a", data=b"a\n")
    t.add("opq/base-b", data=b"b\n")
    t.dir("data")
    t.add("data/keep", data=b"base")
    for d in ("proc", "sys", "dev", "tmp", "root"):
        t.dir(d, mode=0o1777 if d == "tmp" else 0o755)
    return t.close()


def upper_layer() -> Layer:
    t = TarBuilder()
    t.add("etc/.wh.deleted-me")
    t.dir("opq")
    t.add("opq/.wh..wh..opq")
    t.add("opq/upper-only", data=b"upper\n")
    t.dir("usr")
    t.dir("usr/bin")
    t.add("usr/bin/suid", data=b"#!/bin/sh\nid\n", mode=0o4755)
    t.dir("home")
    t.dir("home/user", mode=0o750, uid=1000, gid=1000)
    t.add("home/user/owned", data=b"mine\n", mode=0o640, uid=1000, gid=1000)
    t.dir("links")
    t.add("links/target", data=b"linked")
    t.add("links/hard", tarfile.LNKTYPE, link="links/target")
    t.add("links/soft", tarfile.SYMTYPE, link="target", mode=0o777)
    t.add("links/abs", tarfile.SYMTYPE, link="/etc/passwd", mode=0o777)
    t.dir("things")
    t.add("things/fifo", tarfile.FIFOTYPE, mode=0o600)
    t.add("things/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    t.add("things/caps", data=b"x", mode=0o755,
          xattrs={"user.test": b"hello", "security.capability": CAP_NET_RAW})
    t.dir("tmp", mode=0o1777)
    return t.close()


def config(layers: list[Layer], *, cmd: list[str] | None = None) -> dict[str, Any]:
    """An image config for ``layers`` (bottom-most first)."""
    return {
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": cmd or ["echo hello"],
                   "Env": ["PATH=/usr/bin:/bin", "HOME=/root"], "WorkingDir": "/data",
                   "User": "0:0"},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }


def image_layers() -> list[Layer]:
    """The two layers of the test image, bottom-most first."""
    return [base_layer(), upper_layer()]


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, capture_output=True,
                          check=True).stdout


def write_oci_layout(dest: Path, layers: list[Layer], *, ref: str = REF,
                     cfg: dict[str, Any] | None = None, compression: str = "gzip") -> str:
    """Write an OCI image layout at ``dest``; return the manifest digest.

    :param compression: ``gzip``, ``zstd`` (needs the zstd program) or ``none``.
    """
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(b: bytes) -> str:
        d = _sha(b)
        (blobs / d[7:]).write_bytes(b)
        return d

    cfg_raw = _json(cfg or config(layers))
    mt = "application/vnd.oci.image.layer.v1.tar" + ("" if compression == "none"
                                                     else f"+{compression}")
    blobs_out = [layer.gz if compression == "gzip" else _zstd(layer.tar)
                 if compression == "zstd" else layer.tar for layer in layers]
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(cfg_raw), "size": len(cfg_raw)},
        "layers": [{"mediaType": mt, "digest": put(blob), "size": len(blob)}
                   for blob in blobs_out],
    }
    m_raw = _json(manifest)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(m_raw),
        "size": len(m_raw), "annotations": {"org.opencontainers.image.ref.name": ref}}]}
    (dest / "index.json").write_bytes(_json(index))
    (dest / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    return _sha(m_raw)


def _tar_dir(src: Path, dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=os.fspath(p.relative_to(src)), recursive=False)


def write_oci_archive(dest: Path, layers: list[Layer], *, ref: str = REF,
                      cfg: dict[str, Any] | None = None) -> str:
    """Write an oci-archive (a tar of an OCI layout) at ``dest``; return the manifest digest."""
    tmp = dest.with_name(dest.name + ".d")
    try:
        digest = write_oci_layout(tmp, layers, ref=ref, cfg=cfg)
        _tar_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return digest


def write_docker_archive(dest: Path, layers: list[Layer], *, ref: str = REF,
                         cfg: dict[str, Any] | None = None) -> None:
    """Write a legacy docker-archive (``docker save`` before 25): ``manifest.json``,
    ``<config hex>.json`` and ``<id>/layer.tar`` for each layer (uncompressed)."""
    cfg_raw = _json(cfg or config(layers))
    cfg_name = hashlib.sha256(cfg_raw).hexdigest() + ".json"
    buf_files: list[tuple[str, bytes]] = [(cfg_name, cfg_raw)]
    layer_names = []
    for layer in layers:
        name = f"{layer.diff_id[7:]}/layer.tar"
        layer_names.append(name)
        buf_files.append((f"{layer.diff_id[7:]}/VERSION", b"1.0"))
        buf_files.append((name, layer.tar))
    manifest = [{"Config": cfg_name, "RepoTags": [ref], "Layers": layer_names}]
    buf_files.append(("manifest.json", _json(manifest)))
    repo, _, tag = ref.rpartition(":")
    buf_files.append(("repositories", _json({repo: {tag: layer_names[-1].split("/")[0]}})))
    with tarfile.open(dest, "w") as tf:
        for name, data in buf_files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), MTIME, 0o644
            tf.addfile(ti, io.BytesIO(data))


def build_all(dest: Path) -> dict[str, Path]:
    """Write the test image in every form under ``dest``: ``oci`` (a layout directory),
    ``oci-archive`` and ``docker-archive``; return their paths by form."""
    dest.mkdir(parents=True, exist_ok=True)
    layers = image_layers()
    out = {"oci": dest / "oci", "oci-archive": dest / "image.oci.tar",
           "docker-archive": dest / "image.docker.tar"}
    write_oci_layout(out["oci"], layers)
    write_oci_archive(out["oci-archive"], layers)
    write_docker_archive(out["docker-archive"], layers)
    return out
