"""What a disk image is and which other files it names, read from its headers in Python.

A disk image is untrusted data (``docs/security.md``): a qcow2 header can name any host file as
its *backing file* or *external data file*, a differencing VHD or a VHDX with a parent names a
parent disk. QEMU opens such files by itself when it opens the image, so before anything is
attached, :func:`inspect_image` reads the headers here (never with ``qemu-img info``, which would
open the backing chain itself) and reports every file the image refers to; the host backend then
refuses the image unless the caller allowed exactly those files (:mod:`.host`).

Formats, by magic (anything else is ``raw``, which QEMU never interprets):

* **qcow2** (``QFI\\xfb`` at 0): the backing file name (``backing_file_offset``/``_size``, and its
  format from header extension ``0xe2792aca``); the external data file (incompatible feature
  bit 2, and its name from header extension ``0x44415441``).
* **VHD** (QEMU's ``vpc``; a ``conectix`` footer in the last 512 bytes, or its copy in the first
  512): disk type 4 is a differencing disk, whose parent is named in the dynamic header.
* **VHDX** (``vhdxfile`` at 0): the metadata region's file parameters (``HasParent``) and a parent
  locator item (whose ``relative_path``/``absolute_win32_path`` name the parent).

Reading is bounded (a header, one cluster of qcow2 extensions, at most a few KiB of names) and
works on an already-open descriptor, the very one later handed to QEMU, so the file inspected is
the file attached.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from ...errors import BackendError

ImageFormat = Literal["raw", "qcow2", "vpc", "vhdx"]
ReferenceKind = Literal["backing file", "data file", "parent disk"]

_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_EXT_END = 0
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
#: QEMU refuses longer backing file names; we read no more than this of any name.
_MAX_NAME = 1023

_VHD_COOKIE = b"conectix"
_VHD_DIFFERENCING = 4
_VHD_KNOWN_TYPES = {2: "fixed", 3: "dynamic", _VHD_DIFFERENCING: "differencing"}

_VHDX_MAGIC = b"vhdxfile"
_VHDX_REGION_TABLES = (192 * 1024, 256 * 1024)
_VHDX_METADATA_REGION = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
_VHDX_FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
_VHDX_PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
_VHDX_HAS_PARENT = 1 << 1
_VHDX_MAX_ENTRIES = 2047  # both tables are at most 64 KiB of 32-byte entries after a header


@dataclass(frozen=True)
class ImageReference:
    """A file an image names: ``kind``, the ``name`` as written in the image (None when the
    image only says that there is one), and the format the header gives for it, if any."""

    kind: ReferenceKind
    name: str | None
    format: str | None = None


@dataclass(frozen=True)
class ImageInfo:
    """The result of :func:`inspect_image`."""

    format: ImageFormat
    references: tuple[ImageReference, ...] = ()


def _pread(fd: int, size: int, offset: int) -> bytes:
    if offset < 0 or size <= 0:
        return b""
    return os.pread(fd, size, offset)


def _name(raw: bytes) -> str:
    return raw[:_MAX_NAME].decode("utf-8", errors="replace")


def format_of(head: bytes, tail: bytes) -> ImageFormat:
    """The format from the first and the last 512 bytes of an image (see the module docstring)."""
    if head.startswith(_QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(_VHDX_MAGIC):
        return "vhdx"
    if tail.startswith(_VHD_COOKIE) or head.startswith(_VHD_COOKIE):
        return "vpc"
    return "raw"


def inspect_image(fd: int, what: str) -> ImageInfo:
    """The format of the image open on ``fd`` and every file its headers name.

    :param what: how to name the image in errors (its path).
    :raise BackendError: the file can't be read, or its headers are inconsistent in a way that
        leaves the answer open (then it is not attached at all).
    """
    try:
        size = os.fstat(fd).st_size
        head = _pread(fd, 512, 0)
        tail = _pread(fd, 512, max(0, size - 512)) if size else b""
        fmt = format_of(head, tail)
        if fmt == "qcow2":
            refs = _qcow2_references(fd, what)
        elif fmt == "vpc":
            refs = _vhd_references(head, tail, what)
        elif fmt == "vhdx":
            refs = _vhdx_references(fd, what)
        else:
            refs = []
    except OSError as e:
        raise BackendError(f"cannot read disk image {what}: {e.strerror}") from e
    except struct.error as e:  # a truncated header
        raise BackendError(f"disk image {what}: truncated {fmt} header ({e})") from e
    return ImageInfo(fmt, tuple(refs))


def _qcow2_references(fd: int, what: str) -> list[ImageReference]:
    hdr = _pread(fd, 112, 0)
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", hdr, 4)
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise BackendError(
            f"disk image {what}: unsupported qcow2 header (version {version}, "
            f"cluster_bits {cluster_bits})"
        )
    incompatible, header_length = 0, 72
    if version == 3:
        (incompatible,) = struct.unpack_from(">Q", hdr, 72)
        (header_length,) = struct.unpack_from(">I", hdr, 100)
    refs: list[ImageReference] = []
    backing_format: str | None = None
    data_file: str | None = None
    # Header extensions: from the end of the header to the end of the first cluster (or to the
    # backing file name, which QEMU stores right after them).
    cluster = 1 << cluster_bits
    end = min(cluster, backing_offset) if backing_offset else cluster
    ext = _pread(fd, max(0, end - header_length), header_length)
    pos = 0
    while pos + 8 <= len(ext):
        kind, length = struct.unpack_from(">II", ext, pos)
        pos += 8
        if kind == _QCOW2_EXT_END:
            break
        data = ext[pos : pos + length]
        if kind == _QCOW2_EXT_BACKING_FORMAT:
            backing_format = _name(data)
        elif kind == _QCOW2_EXT_DATA_FILE:
            data_file = _name(data)
        pos += (length + 7) & ~7
    if backing_offset or backing_size:
        name = _name(_pread(fd, min(backing_size, _MAX_NAME), backing_offset))
        refs.append(ImageReference("backing file", name or None, backing_format))
    if incompatible & _QCOW2_INCOMPAT_DATA_FILE or data_file is not None:
        refs.append(ImageReference("data file", data_file or None, "raw"))
    return refs


def _vhd_references(head: bytes, tail: bytes, what: str) -> list[ImageReference]:
    # QEMU reads the footer copy at offset 0 first, then the one at the end: check both.
    footers = [f for f in (head, tail) if f.startswith(_VHD_COOKIE) and len(f) >= 64]
    for footer in footers:
        (disk_type,) = struct.unpack_from(">I", footer, 60)
        if disk_type == _VHD_DIFFERENCING:
            return [ImageReference("parent disk", None, "vpc")]
        if disk_type not in _VHD_KNOWN_TYPES:
            raise BackendError(f"disk image {what}: unknown VHD disk type {disk_type}")
    return []


def _vhdx_entries(table: bytes, first: int, count: int) -> Iterator[tuple[uuid.UUID, bytes]]:
    """The (GUID, entry) of each 32-byte entry of a VHDX region or metadata table, from byte
    ``first``: at most ``count`` (and :data:`_VHDX_MAX_ENTRIES`), as many as ``table`` holds."""
    for i in range(min(count, _VHDX_MAX_ENTRIES)):
        entry = table[first + 32 * i : first + 32 * (i + 1)]
        if len(entry) < 32:
            return
        yield uuid.UUID(bytes_le=entry[:16]), entry


def _vhdx_references(fd: int, what: str) -> list[ImageReference]:
    metadata_regions: set[tuple[int, int]] = set()
    for table_offset in _VHDX_REGION_TABLES:
        table = _pread(fd, 64 * 1024, table_offset)
        if not table.startswith(b"regi"):
            continue
        (count,) = struct.unpack_from("<I", table, 8)
        for guid, entry in _vhdx_entries(table, 16, count):
            offset, length = struct.unpack_from("<QI", entry, 16)
            if guid == _VHDX_METADATA_REGION:
                metadata_regions.add((offset, length))
    if not metadata_regions:
        raise BackendError(f"disk image {what}: not a valid VHDX (no metadata region found)")
    refs: list[ImageReference] = []
    for region_offset, region_length in sorted(metadata_regions):
        table = _pread(fd, min(region_length, 64 * 1024), region_offset)
        if not table.startswith(b"metadata"):
            raise BackendError(f"disk image {what}: not a valid VHDX (bad metadata table)")
        (count,) = struct.unpack_from("<H", table, 10)
        has_parent = False
        locator: str | None = None
        for item, entry in _vhdx_entries(table, 32, count):
            offset, length = struct.unpack_from("<II", entry, 16)
            if item == _VHDX_FILE_PARAMETERS:
                (flags,) = struct.unpack_from("<I", _pread(fd, 8, region_offset + offset), 4)
                has_parent = has_parent or bool(flags & _VHDX_HAS_PARENT)
            elif item == _VHDX_PARENT_LOCATOR:
                has_parent = True
                data = _pread(fd, min(length, 64 * 1024), region_offset + offset)
                locator = _vhdx_parent_path(data)
        if has_parent and not refs:
            refs.append(ImageReference("parent disk", locator, "vhdx"))
    return refs


def _vhdx_parent_path(locator: bytes) -> str | None:
    """The parent's path from a VHDX parent locator item (best effort: for error messages)."""
    if len(locator) < 20:
        return None
    (count,) = struct.unpack_from("<H", locator, 18)
    found: dict[str, str] = {}
    for i in range(min(count, 64)):
        base = 20 + 12 * i
        if base + 12 > len(locator):
            break
        key_off, value_off, key_len, value_len = struct.unpack_from("<IIHH", locator, base)
        key = locator[key_off : key_off + key_len].decode("utf-16-le", errors="replace")
        value = locator[value_off : value_off + value_len].decode("utf-16-le", errors="replace")
        found[key] = value[:_MAX_NAME]
    return found.get("relative_path") or found.get("absolute_win32_path") or None
