"""The image store: layer disks cached by diff id, and named images that use them.

Layout under the store root (``UVMSHIM_IMAGE_ROOT``, else ``/var/lib/uvmshim/images`` as root,
else ``${XDG_DATA_HOME:-~/.local/share}/uvmshim/images``; see :mod:`uvmshim.hostpath`)::

    lock                               flock(2) target: one writer at a time
    images.json                        {"version": 1, "images": {name: record}}
    layers/sha256/<hex>/layer.vhd      a layer folder, as LayerFolders wants it
    layers/sha256/<hex>/layer.json     {"diff_id", "tar_bytes", "disk_bytes", "created", "verity",
                                        "blobs": blob digests verified to hold this layer}
    layers/sha256/<hex>/verity.json    the disk's dm-verity parameters and root hash (if it has
                                       a hash tree: the default; ``--no-verity`` leaves it out)
    tmp/                               work in progress; anything here is garbage

A layer appears by ``rename(2)`` of a finished directory from ``tmp/``, and ``images.json`` by
``rename(2)`` of a finished file, so a crash, an error or Ctrl-C never leaves a partial layer or
a half-written index. Layers are shared by every image that lists their diff id; an import
reuses layers already present, only hashing their blobs against the manifest (a blob digest
not yet noted in ``layer.json`` is also unpacked to check its diff id), so importing the same
image twice converts nothing. A layer left unreferenced by a crash between the two renames is
harmless (a later import reuses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from uvmshim import hostpath
from uvmshim.image.layout import ImageConfig, ImageError, LayerBlob, ResolvedImage, open_image
from uvmshim.image.tar2ext4 import LAYER_FILE, convert_layer
from uvmshim.image.unpack import verify_blob
from uvmshim.protocol.verity import VERITY_FILE

_INDEX_VERSION = 1
#: ext4 overhead over the tar size, for the free-space check (no staging: a layer is written
#: once, straight into its disk).
_SPACE_FACTOR = 1.15
#: Assumed compression ratio when the uncompressed size can't be read from the blob.
_GUESS_RATIO = 4


@dataclass(frozen=True)
class ImageRecord:
    """A named image in the store.

    :ivar id: the config digest (what ``docker images`` calls the image id).
    :ivar diff_ids: the layers, bottom-most first (the config's ``rootfs.diff_ids`` order).
    :ivar layer_dirs: the layer folder of each diff id, same order.
    :ivar size: uncompressed layer content, bytes.
    :ivar created: when the image was built (its config's ``created``), else ``imported``.
    :ivar imported: when it was imported into this store.
    """

    name: str
    id: str
    manifest_digest: str
    diff_ids: tuple[str, ...]
    config: ImageConfig
    created: str
    imported: str
    size: int
    source: str
    layer_dirs: tuple[Path, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "manifest_digest": self.manifest_digest,
                "diff_ids": list(self.diff_ids), "config": self.config.to_json(),
                "created": self.created, "imported": self.imported, "size": self.size,
                "source": self.source}


#: The diff id of an empty layer (a tar of just its end-of-archive blocks), which builders
#: emit for steps that change nothing; the same layer can thus appear several times.
EMPTY_LAYER = "sha256:" + hashlib.sha256(bytes(1024)).hexdigest()


def layer_folders(record: ImageRecord, scratch_folder: str | os.PathLike[str]) -> list[str]:
    """``windows.layerFolders`` for a container of ``record``: top-most layer first, the
    scratch folder last (the reverse of the diff id order, then the scratch).

    Empty layers are left out (they add nothing to the overlay, and would attach the same disk
    several times), unless the image has nothing else.
    """
    pairs = list(zip(record.diff_ids, record.layer_dirs, strict=True))
    kept = [d for diff, d in pairs if diff != EMPTY_LAYER] or [d for _, d in pairs[:1]]
    return [os.fspath(d) for d in reversed(kept)] + [os.fspath(scratch_folder)]


def image_config(record: ImageRecord) -> ImageConfig:
    """The image's run defaults: entrypoint, cmd, env, working dir, user."""
    return record.config


@dataclass(frozen=True)
class ImportEvent:
    """Progress of :func:`import_image`, reported on the event loop.

    ``kind`` is ``"image"`` (resolved: ``count`` layers, ``total`` blob bytes to convert),
    ``"layer-cached"`` (layer ``index`` is already in the store), ``"layer-start"``,
    ``"layer-bytes"`` (``done`` more blob bytes of layer ``index`` were read; ``total`` is the
    blob size if known), ``"layer-done"`` or ``"done"``.
    """

    kind: Literal["image", "layer-cached", "layer-start", "layer-bytes", "layer-done", "done"]
    index: int = 0
    count: int = 0
    diff_id: str = ""
    done: int = 0
    total: int | None = None


Progress = Callable[[ImportEvent], None]


class ImageStore:
    """One store root. Cheap to make; nothing is created until something is written."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else hostpath.image_store_dir()

    @property
    def index_path(self) -> Path:
        return self.root / "images.json"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def layer_dir(self, diff_id: str) -> Path:
        alg, hexd = diff_id.split(":", 1)
        return self.root / "layers" / alg / hexd

    def has_layer(self, diff_id: str, *, verity: bool = False) -> bool:
        """Is the layer in the store (with a dm-verity hash tree, if ``verity``)?"""
        d = self.layer_dir(diff_id)
        return (d / LAYER_FILE).is_file() and (not verity or (d / VERITY_FILE).is_file())

    # Locking ------------------------------------------------------------------------------

    def _lock_fd(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store lock (blocking)."""
        fd = self._lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def alocked(self) -> AsyncIterator[None]:
        """Hold the store lock, waiting without blocking the event loop (cancellable)."""
        fd = self._lock_fd()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # The index ----------------------------------------------------------------------------

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read the image index: {e}", where=str(self.index_path),
                             hint="restore or remove the file") from None
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, dict):
            raise ImageError("malformed image index", where=str(self.index_path))
        return images

    def _write_index(self, images: dict[str, dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".images-", dir=self.root)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _INDEX_VERSION, "images": images}, f, indent=1,
                          sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _record(self, obj: dict[str, Any]) -> ImageRecord:
        try:
            diff_ids = tuple(str(d) for d in obj["diff_ids"])
            return ImageRecord(
                name=str(obj["name"]), id=str(obj["id"]),
                manifest_digest=str(obj["manifest_digest"]), diff_ids=diff_ids,
                config=ImageConfig.from_config({"config": obj["config"]}),
                created=str(obj["created"]), imported=str(obj.get("imported", obj["created"])),
                size=int(obj["size"]), source=str(obj["source"]),
                layer_dirs=tuple(self.layer_dir(d) for d in diff_ids))
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"malformed image record: {e}", where=str(self.index_path)) from None

    def images(self) -> list[ImageRecord]:
        """Every image, by name."""
        return [self._record(v) for _, v in sorted(self._read_index().items())]

    def get(self, name: str) -> ImageRecord:
        """The image called ``name``.

        :raises ImageError: no such image.
        """
        obj = self._read_index().get(name)
        if obj is None:
            raise ImageError(f"no image named {name!r}", hint="see `uvmshim image ls`")
        return self._record(obj)

    # Garbage ------------------------------------------------------------------------------

    def _discard(self, path: Path) -> None:
        """Remove a directory, first renaming it into tmp/ so it vanishes atomically."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        dead = Path(tempfile.mkdtemp(prefix="dead-", dir=self.tmp_dir))
        os.rename(path, dead / "x")
        shutil.rmtree(dead, ignore_errors=True)

    def clean_tmp(self) -> None:
        """Remove leftovers of interrupted work (call with the lock held)."""
        if self.tmp_dir.is_dir():
            for p in self.tmp_dir.iterdir():
                shutil.rmtree(p, ignore_errors=True)

    def _gc(self, candidates: set[str], images: dict[str, dict[str, Any]]) -> list[str]:
        used = {d for rec in images.values() for d in rec.get("diff_ids", [])}
        removed = []
        for diff in sorted(candidates - used):
            if self.layer_dir(diff).exists():
                self._discard(self.layer_dir(diff))
                removed.append(diff)
        return removed


# Free space ----------------------------------------------------------------------------------


def _uncompressed_estimate(img: ResolvedImage, layer: LayerBlob) -> int:
    """About how many bytes a layer's tar has, without reading the layer."""
    try:
        with img.source.open(layer.member) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            magic = f.read(2)
            if magic != b"\x1f\x8b":
                return size if "zstd" not in layer.media_type else size * _GUESS_RATIO
            # gzip's trailer holds the uncompressed size modulo 4 GiB; trust it if plausible.
            f.seek(size - 4)
            (isize,) = struct.unpack("<I", f.read(4))
            return isize if isize >= size else size * _GUESS_RATIO
    except (OSError, ValueError, struct.error, ImageError):
        return (layer.size or 0) * _GUESS_RATIO


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (a seam for tests)."""
    return shutil.disk_usage(path).free


def _check_space(store: ImageStore, img: ResolvedImage, todo: list[LayerBlob]) -> None:
    if not todo:
        return
    sizes = [_uncompressed_estimate(img, layer) for layer in todo]
    need = int(sum(sizes) * _SPACE_FACTOR)
    free = free_bytes(store.root)
    if need > free:
        raise ImageError(f"the image needs about {need >> 20} MiB to import, but only "
                         f"{free >> 20} MiB are free", where=str(store.root),
                         hint=f"free disk space, or point {hostpath.IMAGE_ROOT_ENV} at a bigger "
                              "filesystem")


# The public operations ------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


async def import_image(path: str | os.PathLike[str], *, name: str | None = None,
                       store: ImageStore | None = None,
                       progress: Progress | None = None, verity: bool = True,
                       source: str | None = None) -> ImageRecord:
    """Import the image at ``path`` (OCI layout dir, oci-archive or docker-archive tar).

    Each layer not yet in the store is verified (blob digest, diff id) and converted to a
    ``layer.vhd``; layers already there are reused once their blob is checked against the
    manifest's digest. With ``verity`` (the default) each
    new disk gets a dm-verity hash tree and the layer folder a ``verity.json``, and a cached
    layer without one is converted again; without it, cached layers are reused as they are
    (with their hash tree, if they have one). ``source`` is what the record names as the
    image's origin (default: ``path``). The image is recorded under
    ``name``, else its first ref name / repo tag, else its short id; an image of the same name
    is replaced (its layers that nothing else uses are removed).

    :raises ImageError: unreadable, malformed, corrupt, unsafe or too big for the free space.
        No image is recorded and no partial layer is left; layers completed before the
        failure stay cached for the next import.
    """
    store = store or ImageStore()

    def emit(ev: ImportEvent) -> None:
        if progress is not None:
            progress(ev)

    async with store.alocked():
        await asyncio.to_thread(store.clean_tmp)
        img = await asyncio.to_thread(open_image, path, name=name)
        with img:
            rec_name = name or (img.ref_names[0] if img.ref_names else img.config_digest[7:19])
            run_config = ImageConfig.from_config(img.config)  # check it before the long part
            todo: dict[str, LayerBlob] = {}
            for layer in img.layers:
                if not store.has_layer(layer.diff_id, verity=verity):
                    todo.setdefault(layer.diff_id, layer)
            await asyncio.to_thread(_check_space, store, img, list(todo.values()))
            emit(ImportEvent("image", count=len(img.layers),
                             total=sum(layer.size or img.source.size(layer.member) or 0
                                       for layer in todo.values())))
            for i, layer in enumerate(img.layers):
                if layer.diff_id not in todo:
                    # Its disk is reused, but the manifest must still describe this blob.
                    await asyncio.to_thread(_check_cached_layer, store, img, layer, i)
                    emit(ImportEvent("layer-cached", i, len(img.layers), layer.diff_id))
                    continue
                await _import_layer(store, img, layer, i, emit, verity=verity)
                del todo[layer.diff_id]
            tar_bytes = sum(_layer_meta(store, d).get("tar_bytes", 0) for d in img.diff_ids)
            now = _now()
            built = img.config.get("created")
            record = {"name": rec_name, "id": img.config_digest,
                      "manifest_digest": img.manifest_digest, "diff_ids": img.diff_ids,
                      "config": run_config.to_json(),
                      "created": built if isinstance(built, str) and built else now,
                      "imported": now, "size": tar_bytes,
                      "source": source if source is not None else os.fspath(path)}
        images = store._read_index()
        old = images.get(rec_name)
        images[rec_name] = record
        store._write_index(images)
        if old is not None:
            store._gc(set(old.get("diff_ids", [])), images)
        emit(ImportEvent("done", count=len(img.layers)))
        return store._record(record)


def _check_cached_layer(store: ImageStore, img: ResolvedImage, layer: LayerBlob,
                        index: int) -> None:
    """Check that the blob the manifest names for a cached layer is that layer.

    A blob digest once verified to unpack to the layer's diff id is noted in ``layer.json``
    (``blobs``); then only the blob's own digest is checked, else the whole stream is.

    :raises ImageError: the blob is missing, corrupt, or does not match its descriptor.
    """
    where = f"layer {index} ({layer.digest or layer.diff_id})"
    meta = _layer_meta(store, layer.diff_id)
    known = meta.get("blobs")
    known_blobs = [b for b in known if isinstance(b, str)] if isinstance(known, list) else []
    check_diff_id = layer.digest is None or layer.digest not in known_blobs
    with img.source.open(layer.member) as blob:
        verify_blob(blob, where=where, diff_id=layer.diff_id, digest=layer.digest,
                    size=layer.size, check_diff_id=check_diff_id)
    if check_diff_id and layer.digest is not None and meta:
        meta["blobs"] = [*known_blobs, layer.digest]
        path = store.layer_dir(layer.diff_id) / "layer.json"
        tmp = path.with_name("layer.json.tmp")
        with contextlib.suppress(OSError):  # only a note that saves work next time
            tmp.write_text(json.dumps(meta, indent=1) + "\n")
            os.rename(tmp, path)


def _layer_meta(store: ImageStore, diff_id: str) -> dict[str, Any]:
    try:
        meta = json.loads((store.layer_dir(diff_id) / "layer.json").read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


async def _import_layer(store: ImageStore, img: ResolvedImage, layer: LayerBlob, index: int,
                        emit: Progress, *, verity: bool = True) -> None:
    where = f"layer {index} ({layer.digest or layer.diff_id})"
    count = len(img.layers)
    total = layer.size if layer.size is not None else img.source.size(layer.member)
    emit(ImportEvent("layer-start", index, count, layer.diff_id, total=total))
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="layer-", dir=store.tmp_dir))
    try:
        res = await convert_layer(
            lambda: img.source.open(layer.member), work, diff_id=layer.diff_id,
            digest=layer.digest, size=layer.size, where=where,
            on_bytes=lambda n: emit(ImportEvent("layer-bytes", index, count, layer.diff_id,
                                                done=n, total=total)),
            verity=verity)
        meta: dict[str, Any] = {"diff_id": layer.diff_id, "tar_bytes": res.tar_bytes,
                                "disk_bytes": res.disk_bytes, "created": _now()}
        if layer.digest is not None:
            meta["blobs"] = [layer.digest]  # verified by convert_layer
        if res.verity is not None:
            meta["verity"] = res.verity.to_json()
        (work / "layer.json").write_text(json.dumps(meta, indent=1) + "\n")
        dest = store.layer_dir(layer.diff_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            # A copy without a hash tree: ours replaces it (a running container keeps the
            # disk it has open).
            store._discard(dest)
        try:
            os.rename(work, dest)
        except OSError as e:
            # Someone else made it meanwhile (only possible without the lock): theirs is as
            # good as ours.
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    except OSError as e:
        raise ImageError(f"cannot store the layer: {e.strerror}", where=where) from e
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    emit(ImportEvent("layer-done", index, count, layer.diff_id, total=total))


def list_images(store: ImageStore | None = None) -> list[ImageRecord]:
    """Every image in the store, by name."""
    return (store or ImageStore()).images()


def get_image(name: str, store: ImageStore | None = None) -> ImageRecord:
    """The image called ``name``.

    :raises ImageError: no such image.
    """
    return (store or ImageStore()).get(name)


def remove_image(name: str, store: ImageStore | None = None) -> list[str]:
    """Remove the image ``name`` and those of its layers no other image uses.

    :return: the diff ids of the layers removed.
    :raises ImageError: no such image.
    """
    store = store or ImageStore()
    with store.locked():
        images = store._read_index()
        old = images.pop(name, None)
        if old is None:
            raise ImageError(f"no image named {name!r}", hint="see `uvmshim image ls`")
        store._write_index(images)
        return store._gc(set(old.get("diff_ids", [])), images)
