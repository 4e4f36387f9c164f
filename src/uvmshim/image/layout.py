"""Reading local images: OCI image layouts, oci-archive and docker-archive tarballs.

Three on-disk forms are read, as a directory or as a tar of that directory:

* **OCI image layout** (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``): what
  ``skopeo copy … oci:DIR`` and ``podman save --format oci-dir`` write; as a tar, what
  ``podman save --format oci-archive`` writes. Docker 25+ ``docker save`` writes this too (with a
  ``manifest.json`` beside it); the OCI index wins because its descriptors carry digests.
* **docker-archive** (``manifest.json`` listing ``Config`` and ``Layers`` file names, plus
  ``RepoTags``): what ``docker save`` (before 25) and ``podman save`` write. Layer files are
  uncompressed tars whose only check is the config's ``rootfs.diff_ids``; there is no manifest
  digest, so we synthesise the OCI manifest skopeo would and use its digest.

Nothing here trusts a name from the image: blob names come from validated digests, and members
of an archive are looked up by name, never extracted to the host filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from uvmshim.errors import UvmshimError

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}
_REF_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
#: The largest JSON document (index, manifest, config) we read into memory.
_MAX_JSON = 16 << 20


class ImageError(UvmshimError):
    """An image could not be read, verified, converted or stored.

    ``where`` names the file, layer digest or tar entry at fault.
    """


def check_digest(digest: object, where: str) -> str:
    """``digest`` if it is a well-formed sha256/sha512 digest, else an :class:`ImageError`."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ImageError(f"bad digest {digest!r}", where=where)
    return digest


def new_hash(digest: str) -> hashlib._Hash:
    """A hash object for the algorithm of ``digest``."""
    return hashlib.new(digest.split(":", 1)[0])


@dataclass(frozen=True)
class ImageConfig:
    """The run defaults from an image config (``config.config`` in OCI terms)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageConfig:
        c = config.get("config") or {}
        if not isinstance(c, dict):
            raise ImageError("'config' is not an object", where="image config")

        def strings(key: str) -> list[str]:
            v = c.get(key) or []
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise ImageError(f"'{key}' is not a list of strings", where="image config")
            return list(v)

        def string(key: str) -> str:
            v = c.get(key) or ""
            if not isinstance(v, str):
                raise ImageError(f"'{key}' is not a string", where="image config")
            return v

        return cls(entrypoint=strings("Entrypoint"), cmd=strings("Cmd"), env=strings("Env"),
                   working_dir=string("WorkingDir"), user=string("User"))

    def to_json(self) -> dict[str, Any]:
        return {"Entrypoint": self.entrypoint, "Cmd": self.cmd, "Env": self.env,
                "WorkingDir": self.working_dir, "User": self.user}


# Sources: a directory or a tar archive, read by member name -------------------------------------


class Source:
    """Named files of an image, from a directory or an archive."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """The size of file ``name``, or ``None`` if unknown."""
        return None

    def close(self) -> None:
        pass

    def read_json(self, name: str) -> tuple[Any, bytes]:
        """The parsed JSON document ``name`` and its raw bytes."""
        with self.open(name) as f:
            raw = f.read(_MAX_JSON + 1)
        if len(raw) > _MAX_JSON:
            raise ImageError("JSON document too large", where=name)
        try:
            return json.loads(raw), raw
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"not valid JSON: {e}", where=name) from None


def _member_name(name: str) -> str:
    clean = posixpath.normpath(name.lstrip("/"))
    if clean.startswith("../") or clean == "..":
        raise ImageError("file name leaves the image", where=name)
    return clean


class DirSource(Source):
    def _resolve(self, name: str) -> Path:
        p = (self.path / _member_name(name)).resolve()
        # A symlink inside the image directory must not lead us elsewhere on the host.
        if not p.is_relative_to(self.path.resolve()):
            raise ImageError("file leaves the image directory", where=name)
        return p

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._resolve(name), "rb")
        except OSError as e:
            raise ImageError(f"cannot open: {e.strerror}", where=name) from None

    def exists(self, name: str) -> bool:
        return self._resolve(name).is_file()

    def size(self, name: str) -> int | None:
        try:
            return self._resolve(name).stat().st_size
        except OSError:
            return None


class TarSource(Source):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            # "r:*" also reads a compressed archive (``docker save | gzip``), at the cost of
            # decompressing it again for every blob read.
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
            self._members = {_member_name(m.name): m for m in self._tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as e:
            reason = str(e).splitlines()[-1].strip(" -")
            raise ImageError(f"not an image: neither a layout directory nor a readable tar "
                             f"archive ({reason})", where=str(path)) from None

    def open(self, name: str) -> IO[bytes]:
        m = self._members.get(_member_name(name))
        try:
            f = self._tar.extractfile(m) if m is not None else None
        except (tarfile.TarError, KeyError) as e:
            raise ImageError(f"cannot read from the archive: {e}", where=name) from None
        if f is None:
            raise ImageError("no such file in the archive", where=name)
        return f

    def exists(self, name: str) -> bool:
        m = self._members.get(_member_name(name))
        return m is not None and (m.isfile() or m.issym() or m.islnk())

    def size(self, name: str) -> int | None:
        m = self._members.get(_member_name(name))
        return m.size if m is not None and m.isfile() else None

    def close(self) -> None:
        self._tar.close()


# The resolved image ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    """One layer of a resolved image, bottom-most first.

    :ivar member: the file holding the (maybe compressed) layer tar in its :class:`Source`.
    :ivar digest: the blob digest to verify, or ``None`` (docker-archive: only ``diff_id``).
    :ivar size: the blob size from the descriptor, or ``None`` when unknown.
    """

    member: str
    diff_id: str
    digest: str | None
    size: int | None
    media_type: str


@dataclass
class ResolvedImage:
    """An image found in a layout or archive, ready to import. Close it (or use ``with``)."""

    source: Source
    manifest_digest: str
    config_digest: str
    config: dict[str, Any]
    layers: list[LayerBlob]
    ref_names: list[str]

    def __enter__(self) -> ResolvedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.close()

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


def _blob_name(digest: str) -> str:
    alg, hexd = digest.split(":", 1)
    return f"blobs/{alg}/{hexd}"


def _read_blob_json(src: Source, desc: dict[str, Any], where: str) -> tuple[Any, str]:
    digest = check_digest(desc.get("digest"), where)
    doc, raw = src.read_json(_blob_name(digest))
    h = new_hash(digest)
    h.update(raw)
    if f"{digest.split(':')[0]}:{h.hexdigest()}" != digest:
        raise ImageError("content does not match its digest", where=digest)
    return doc, digest


def host_arch() -> str:
    """The host's architecture in OCI terms (``amd64``, ``arm64``, ...)."""
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _pick(manifests: list[dict[str, Any]], name: str | None, where: str) -> dict[str, Any]:
    """The manifest descriptor to import from an index's ``manifests``."""
    if name is not None:
        named = [d for d in manifests
                 if name in ((d.get("annotations") or {}).get(a) for a in _REF_ANNOTATIONS)]
        if named:
            manifests = named
    if len(manifests) == 1:
        return manifests[0]
    # A multi-platform index: take the host's platform, if exactly one entry has it.
    plat = [d for d in manifests if (d.get("platform") or {}).get("os") == "linux"
            and (d.get("platform") or {}).get("architecture") == host_arch()]
    if len(plat) == 1:
        return plat[0]
    if not manifests:
        raise ImageError("the index lists no manifests", where=where)
    refs = sorted({str(r) for d in manifests for a in _REF_ANNOTATIONS
                   if (r := (d.get("annotations") or {}).get(a))})
    raise ImageError(f"{len(manifests)} images here; choose one with --name",
                     where=where, hint=f"names: {', '.join(refs)}" if refs else None)


def _diff_ids(config: dict[str, Any], where: str) -> list[str]:
    rootfs = config.get("rootfs") or {}
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise ImageError("config has no rootfs.diff_ids", where=where)
    return [check_digest(d, f"{where} rootfs.diff_ids") for d in ids]


def _resolve_oci(src: Source, name: str | None) -> ResolvedImage:
    index, _ = src.read_json("index.json")
    desc: dict[str, Any] = {}
    where = "index.json"
    refs: list[str] = []
    for _depth in range(4):  # an index may point at a (multi-platform) index
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
            raise ImageError("'manifests' is not a list of descriptors", where=where)
        desc = _pick(manifests, name, where)
        # The name is on the top-level descriptor (docker save: on the platform index).
        refs = refs or [str(r) for a in _REF_ANNOTATIONS
                        if (r := (desc.get("annotations") or {}).get(a))]
        if desc.get("mediaType") not in _INDEX_TYPES:
            break
        index, where = _read_blob_json(src, desc, where)
    else:
        raise ImageError("indexes nested too deeply", where=where)
    manifest, mdigest = _read_blob_json(src, desc, where)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise ImageError("manifest has no config descriptor", where=mdigest)
    config, cdigest = _read_blob_json(src, manifest["config"], mdigest)
    if not isinstance(config, dict):
        raise ImageError("config is not an object", where=cdigest)
    descs = manifest.get("layers")
    if not isinstance(descs, list) or not all(isinstance(d, dict) for d in descs):
        raise ImageError("manifest 'layers' is not a list of descriptors", where=mdigest)
    diff_ids = _diff_ids(config, cdigest)
    if len(diff_ids) != len(descs):
        raise ImageError(f"manifest lists {len(descs)} layers, config {len(diff_ids)} diff ids",
                         where=mdigest)
    layers = []
    for d, diff in zip(descs, diff_ids, strict=True):
        digest = check_digest(d.get("digest"), f"{mdigest} layers")
        size = d.get("size")
        layers.append(LayerBlob(member=_blob_name(digest), diff_id=diff, digest=digest,
                                size=size if isinstance(size, int) else None,
                                media_type=str(d.get("mediaType", ""))))
    return ResolvedImage(src, mdigest, cdigest, config, layers, refs)


def _resolve_docker(src: Source, name: str | None) -> ResolvedImage:
    entries, _ = src.read_json("manifest.json")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict)
                                                                for e in entries):
        raise ImageError("not a list of image entries", where="manifest.json")
    entry = entries[0]
    if len(entries) > 1:
        named = [e for e in entries if name in (e.get("RepoTags") or [])]
        if len(named) != 1:
            tags = sorted(str(t) for e in entries for t in e.get("RepoTags") or [])
            raise ImageError(f"{len(entries)} images here; choose one with --name",
                             where="manifest.json", hint=f"names: {', '.join(tags)}")
        entry = named[0]
    cfg_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(cfg_name, str) or not isinstance(layer_names, list) or not all(
            isinstance(x, str) for x in layer_names):
        raise ImageError("entry needs 'Config' and 'Layers'", where="manifest.json")
    config, raw = src.read_json(cfg_name)
    if not isinstance(config, dict):
        raise ImageError("config is not an object", where=cfg_name)
    cdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
    # The config's file name is its digest (``<hex>.json`` or ``blobs/sha256/<hex>``): check it.
    stem = posixpath.basename(cfg_name).removesuffix(".json")
    if re.fullmatch(r"[0-9a-f]{64}", stem) and stem != cdigest[7:]:
        raise ImageError("config does not match its digest", where=cfg_name)
    diff_ids = _diff_ids(config, cfg_name)
    if len(diff_ids) != len(layer_names):
        raise ImageError(f"{len(layer_names)} layers but {len(diff_ids)} diff ids",
                         where="manifest.json")
    layers: list[LayerBlob] = []
    manifest_layers = []
    for member, diff in zip(layer_names, diff_ids, strict=True):
        if not src.exists(member):
            raise ImageError("layer file missing from the archive", where=member)
        # A blob named by digest (newer docker save) can be checked as a blob too.
        m = re.fullmatch(r"blobs/(sha256|sha512)/([0-9a-f]+)", _member_name(member))
        digest = f"{m.group(1)}:{m.group(2)}" if m else None
        layers.append(LayerBlob(member=member, diff_id=diff, digest=digest, size=None,
                                media_type=MT_OCI_LAYER_TAR))
        manifest_layers.append({"mediaType": MT_OCI_LAYER_TAR, "digest": digest or diff})
    # No manifest in a docker-archive: digest the OCI manifest skopeo would write for it (sizes
    # left out, as we do not read the layers here).
    synth = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
             "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": len(raw)},
             "layers": manifest_layers}
    mdigest = "sha256:" + hashlib.sha256(
        json.dumps(synth, separators=(",", ":"), sort_keys=True).encode()).hexdigest()
    refs = [str(t) for t in entry.get("RepoTags") or []]
    return ResolvedImage(src, mdigest, cdigest, config, layers, refs)


def open_image(path: str | os.PathLike[str], *, name: str | None = None) -> ResolvedImage:
    """Find the image at ``path`` (a layout directory or an archive) and read its metadata.

    Layers are not read yet. ``name`` selects among several images (ref name / repo tag).

    :raises ImageError: not an image, a malformed document, or a digest that doesn't match.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError("no such file or directory", where=str(p))
    src: Source = DirSource(p) if p.is_dir() else TarSource(p)
    try:
        if src.exists("index.json"):
            return _resolve_oci(src, name)
        if src.exists("manifest.json"):
            return _resolve_docker(src, name)
        raise ImageError("neither an OCI image layout (index.json) nor a docker-archive "
                         "(manifest.json)", where=str(p))
    except BaseException:
        src.close()
        raise
