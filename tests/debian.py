"""A real-world test image: Debian bookworm ``minbase`` (plus python3-minimal) as an OCI layout.

Built with ``debootstrap --variant=minbase --include=python3-minimal bookworm`` from the Debian
mirror this machine's apt uses, tarred into one uncompressed layer and written as an OCI image
layout. minbase itself has no Python; ``python3-minimal`` adds ``/usr/bin/python3`` (Python's
core without most of the standard library), enough for a one-liner.

The result is cached in ``$UVMSHIM_TEST_CACHE`` (default ``/var/cache/uvmshim-test``) under a
key of the date (UTC day) and the mirror, so CI builds it at most once a day; older entries are
removed. Used by ``tests/test_debian_vm.py`` and ``bench/bench_image_import.py --debian``.

    python tests/debian.py      # build (or find) it and print the layout's path
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SUITE = "bookworm"
INCLUDE = ("python3-minimal",)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REF = f"debian:{SUITE}-minbase"
KEEP_OLD = 1


def cache_dir() -> Path:
    return Path(os.environ.get("UVMSHIM_TEST_CACHE", "/var/cache/uvmshim-test"))


def mirror() -> str:
    """The Debian mirror apt uses here for ``bookworm`` (main archive), else deb.debian.org."""
    texts: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") or p.name == "sources.list":
            try:
                texts.append(p.read_text())
            except OSError:
                continue
    for text in texts:
        # deb822 stanzas (``URIs: ... Suites: bookworm ...``)
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split() and (
                    not re.search(r"^Enabled:\s*no", stanza, re.M)):
                return uris.group(1).rstrip("/")
        # one-line entries (``deb http://... bookworm main``)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.M):
            if m.group(2) == SUITE:
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def cache_key(url: str, day: dt.date | None = None) -> str:
    day = day or dt.datetime.now(dt.UTC).date()
    tag = hashlib.sha256(f"{url} {' '.join(INCLUDE)}".encode()).hexdigest()[:10]
    return f"{SUITE}-minbase-{day:%Y%m%d}-{tag}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def write_layout(layer_tar: Path, dest: Path) -> None:
    """An OCI layout at ``dest`` of one uncompressed layer, ``layer_tar`` (moved in)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digest = _sha256(layer_tar)
    size = layer_tar.stat().st_size
    os.rename(layer_tar, blobs / digest[7:])

    def put(raw: bytes) -> str:
        d = "sha256:" + hashlib.sha256(raw).hexdigest()
        (blobs / d[7:]).write_bytes(raw)
        return d

    config = _json({
        "architecture": "amd64", "os": "linux",
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {"Cmd": ["/bin/bash"],
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [digest]},
    })
    manifest = _json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
                    "size": size}],
    })
    (dest / "index.json").write_bytes(_json({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": REF}}]}))
    (dest / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))


def _build(url: str, work: Path) -> Path:
    rootfs = work / "rootfs"
    res = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                          SUITE, rootfs, url], capture_output=True, text=True)
    if res.returncode != 0:
        log = rootfs / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-2000:] if log.exists() else res.stdout[-2000:]
        raise RuntimeError(f"debootstrap failed ({res.returncode}): {res.stderr[-2000:]}\n{tail}")
    # apt's lists and caches are large and useless in an image.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / sub).glob("*"):
            if p.is_file():
                p.unlink()
    layer = work / "layer.tar"
    subprocess.run(["tar", "--format=pax", "--numeric-owner", "--xattrs",
                    "--xattrs-include=*", "--sort=name", "-C", rootfs, "-cf", layer, "."],
                   check=True, capture_output=True)
    shutil.rmtree(rootfs)
    write_layout(layer, work / "oci")
    return work / "oci"


def debian_image() -> Path:
    """The cached OCI layout of today's image, built first if needed (needs root and
    debootstrap; takes a minute or two)."""
    url = mirror()
    root = cache_dir()
    entry = root / cache_key(url)
    if (entry / "oci" / "index.json").exists():
        return entry / "oci"
    root.mkdir(parents=True, exist_ok=True)
    lock = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "oci" / "index.json").exists():
            return entry / "oci"
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
            _build(url, Path(tmp))
            os.rename(tmp, entry)
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
        old = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(SUITE)
                      and p != entry), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in old[KEEP_OLD:]:
            shutil.rmtree(p, ignore_errors=True)
    finally:
        os.close(lock)
    return entry / "oci"


def layer_tar(layout: Path) -> Path:
    """The (uncompressed) layer blob of the layout."""
    index = json.loads((layout / "index.json").read_text())
    mdigest = str(index["manifests"][0]["digest"])
    manifest = json.loads((layout / "blobs/sha256" / mdigest[7:]).read_text())
    return layout / "blobs/sha256" / str(manifest["layers"][0]["digest"])[7:]


if __name__ == "__main__":
    print(debian_image())
