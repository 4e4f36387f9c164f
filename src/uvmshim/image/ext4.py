"""A one-pass ext4 writer for read-only layer disks.

File data is written into the image as the tar streams past; everything else (the tree, modes,
owners, xattrs, link targets) is kept in memory and written at the end, so no staging directory
is ever made. What the filesystem looks like, and why:

* **4 KiB blocks, 128 MiB groups, 256-byte inodes** with 32 extra bytes (nanosecond and creation
  timestamps) and the rest for in-inode xattrs.
* **flex_bg** lets a group's bitmaps and inode table live anywhere in the filesystem, so they
  all go *after* the data: the data area starts right after the superblock and the group
  descriptors, and grows as files arrive, without knowing their count or size in advance.
* **sparse_super2 with no backups**: only group 0 holds a superblock and descriptors. Room for
  the descriptors of a filesystem of up to :data:`MAX_BYTES` is reserved up front (it stays a
  hole in the file: free, unwritten blocks).
* **extents** for files, directories and long symlinks; data is contiguous, so a file needs one
  extent per 128 MiB (more than four get a one-level tree with leaf blocks).
* **Linear directories** (no ``dir_index``): a layer is read, never searched by the writer; the
  kernel reads a linear directory correctly at any size.
* No journal, no resize inode, no ``lost+found``, no checksums (``metadata_csum``,
  ``uninit_bg``): the layer is mounted read-only and never written, so these would only cost
  space and time (integrity of the whole disk is a job for dm-verity, not per-block sums).

Layout (block numbers)::

    0                superblock (at byte 1024)
    1 ..             group descriptors (reserved: GDT_RESERVED blocks)
    data_start ..    file data, in tar order
    ..               directory blocks, long symlinks, extent leaves, xattr blocks
    ..               block bitmaps, inode bitmaps, inode tables (one of each per group)
    .. blocks_count  free (rounding up to the disk geometry)

Blocks of files that a later tar entry replaced are marked free (and punched out of the file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import queue
import stat
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BLOCK = 4096
INODE_SIZE = 256
EXTRA_ISIZE = 32
BLOCKS_PER_GROUP = 8 * BLOCK
#: Group descriptor blocks reserved at the start (32-byte descriptors, 128 per block).
GDT_RESERVED = 64
#: The largest filesystem the reserved descriptors can describe (1 TiB).
MAX_BYTES = GDT_RESERVED * (BLOCK // 32) * BLOCKS_PER_GROUP * BLOCK
FIRST_INO = 11
ROOT_INO = 2
MAX_LINKS = 65000
_MAX_EXTENT = 32768
_EXT_MAGIC = 0xF30A
_XATTR_MAGIC = 0xEA020000
_EXTENTS_FL = 0x80000
_FAST_SYMLINK_MAX = 59

_COMPAT = 0x8 | 0x200  # ext_attr, sparse_super2
_INCOMPAT = 0x2 | 0x40 | 0x200  # filetype, extents, flex_bg
_RO_COMPAT = 0x1 | 0x2 | 0x20 | 0x40  # sparse_super, large_file, dir_nlink, extra_isize

_FTYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
          stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
#: xattr name prefixes and their on-disk index, longest first.
_XATTR_PREFIXES = (("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
                   ("security.", 6), ("trusted.", 4), ("system.", 7), ("user.", 1))


class Ext4Error(Exception):
    """Something the layer holds that this filesystem cannot (the caller words the error)."""


@dataclass(slots=True)
class Node:
    """One inode of the tree being built."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    #: Directories: name → child. ``None`` for everything else.
    children: dict[bytes, Node] | None = None
    #: Regular files: first data block and size in bytes.
    start: int = 0
    size: int = 0
    #: Symlinks: the target.
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] | None = None
    #: Names that refer to this node (hard links); directories count 1.
    links: int = 0
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def new_dir(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> Node:
    return Node(stat.S_IFDIR | mode, uid, gid, mtime_ns, children={})


# Encoding helpers ---------------------------------------------------------------------------


def _time(ns: int) -> tuple[int, int]:
    """(32-bit seconds, extra field) for a time in ns: 2 epoch bits + 30 bits of ns."""
    sec, nsec = divmod(ns, 1_000_000_000)
    sec = min(max(sec, -(1 << 31)), (1 << 31) - 1 + 3 * (1 << 32))
    epoch = (sec + (1 << 31)) >> 32
    return (sec - (epoch << 32)) & 0xFFFFFFFF, (nsec << 2) | epoch


def _xattr_key(name: str) -> tuple[int, bytes]:
    for prefix, index in _XATTR_PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix):].encode("utf-8", "surrogateescape")
            if index in (2, 3) and suffix:
                continue
            if len(suffix) > 255:
                raise Ext4Error(f"xattr name too long: {name}")
            return index, suffix
    raise Ext4Error(f"unsupported xattr namespace: {name}")


def _acl_to_disk(value: bytes) -> bytes:
    """A POSIX ACL as the kernel's xattr interface gives it (version 2) → ext4's disk format."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        raise Ext4Error("malformed POSIX ACL")
    out = bytearray(struct.pack("<I", 1))
    for off in range(4, len(value), 8):
        tag, perm, ident = struct.unpack_from("<HHI", value, off)
        if tag in (2, 8):  # ACL_USER, ACL_GROUP: with an id
            out += struct.pack("<HHI", tag, perm, ident)
        elif tag in (1, 4, 0x10, 0x20):  # USER_OBJ, GROUP_OBJ, MASK, OTHER
            out += struct.pack("<HH", tag, perm)
        else:
            raise Ext4Error("malformed POSIX ACL")
    return bytes(out)


def check_xattr(name: str, value: bytes) -> None:
    """Refuse an xattr this filesystem cannot hold.

    :raises Ext4Error: an unknown namespace, a malformed ACL or a value too large.
    """
    index, suffix = _xattr_key(name)
    if index in (2, 3):
        value = _acl_to_disk(value)
    if 32 + 16 + len(suffix) + len(value) + 8 > BLOCK:
        raise Ext4Error(f"xattr {name} is too large ({len(value)} bytes)")


def _xattr_hash(name: bytes, value: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    padded = value + bytes(-len(value) % 4)
    for (w,) in struct.iter_unpack("<I", padded):
        h = ((h << 16) ^ (h >> 16) ^ w) & 0xFFFFFFFF
    return h


def _xattr_entries(xattrs: dict[str, bytes]) -> list[tuple[int, bytes, bytes]]:
    """(index, name suffix, value) for each xattr, sorted as ext4 sorts block entries."""
    out = []
    for name, value in xattrs.items():
        index, suffix = _xattr_key(name)
        if index in (2, 3):
            value = _acl_to_disk(value)
        out.append((index, suffix, value))
    out.sort(key=lambda e: (e[0], len(e[1]), e[1]))
    return out


def _pack_xattrs(entries: list[tuple[int, bytes, bytes]], size: int, first: int,
                 with_hash: bool) -> bytearray | None:
    """Entries from offset ``first``, values from the end of a ``size``-byte area; value
    offsets relative to ``first`` (in-inode) or to 0 (block). ``None`` if they do not fit."""
    area = bytearray(size)
    pos, end = first, size
    base = first if not with_hash else 0
    for index, name, value in entries:
        vlen = len(value) + (-len(value) % 4)
        elen = 16 + len(name) + (-len(name) % 4)
        if pos + elen + 4 > end - vlen:
            return None
        end -= vlen
        area[end:end + len(value)] = value
        h = _xattr_hash(name, value) if with_hash else 0
        struct.pack_into("<BBHIII", area, pos, len(name), index,
                         (end - base) if value else 0, 0, len(value), h)
        area[pos + 16:pos + 16 + len(name)] = name
        pos += elen
    return area


def _xattr_block(entries: list[tuple[int, bytes, bytes]]) -> bytes:
    area = _pack_xattrs(entries, BLOCK, 32, True)
    if area is None:
        raise Ext4Error("extended attributes larger than one block")
    h = 0
    pos = 32
    for _ in entries:
        (name_len,) = struct.unpack_from("<B", area, pos)
        (eh,) = struct.unpack_from("<I", area, pos + 12)
        h = ((h << 16) ^ (h >> 16) ^ eh) & 0xFFFFFFFF
        pos += 16 + name_len + (-name_len % 4)
    struct.pack_into("<IIII", area, 0, _XATTR_MAGIC, 1, 1, h)
    return bytes(area)


def _extents(start: int, nblocks: int) -> list[tuple[int, int, int]]:
    """(logical, physical, length) extents of a contiguous run."""
    return [(lb, start + lb, min(_MAX_EXTENT, nblocks - lb))
            for lb in range(0, nblocks, _MAX_EXTENT)]


#: An inode: the 128-byte base and the 32 extra bytes (EXTRA_ISIZE) after it.
_INODE = struct.Struct("<HHIIIIIHHIII60sIIIIHHHHHH" + "HHIIIIIII")
_DIRENT = struct.Struct("<IHBB")  # inode, record length, name length, file type
_REC_LEN = struct.Struct("<H")
_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")


def _extent_header(entries: int, max_entries: int, depth: int) -> bytes:
    return struct.pack("<HHHHI", _EXT_MAGIC, entries, max_entries, depth, 0)


def _leaf(exts: list[tuple[int, int, int]]) -> bytes:
    return b"".join(struct.pack("<IHHI", lb, n, pb >> 32, pb & 0xFFFFFFFF)
                    for lb, pb, n in exts)


_EMPTY_EXTENTS = _extent_header(0, 4, 0)


def _set_bits(bm: bytearray, start: int, end: int) -> None:
    """Set bits [start, end) of a little-endian bitmap."""
    while start < end and start % 8:
        bm[start >> 3] |= 1 << (start % 8)
        start += 1
    full = (end - start) // 8
    if full > 0:
        bm[start >> 3:(start >> 3) + full] = b"\xff" * full
        start += full * 8
    while start < end:
        bm[start >> 3] |= 1 << (start % 8)
        start += 1


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded on first use."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _punch(fd: int, offset: int, length: int) -> None:
    """Give the space of ``[offset, offset + length)`` back to the host (best effort)."""
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    _libc().fallocate(fd, 0x02 | 0x01, ctypes.c_int64(offset), ctypes.c_int64(length))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset + length)`` of ``fd`` to disk, without waiting (best
    effort): the final ``fsync`` then finds most of the image already written, or on its way."""
    sync_file_range = getattr(_libc(), "sync_file_range", None)
    if sync_file_range is not None:  # SYNC_FILE_RANGE_WRITE
        sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), 2)


#: A batch is also written once it holds this many buffers (small files, small chunks): one
#: ``pwritev`` takes at most IOV_MAX (1024 on Linux) of them; :func:`_pwritev_all` writes a
#: longer list in several calls.
_IOV_FLUSH = 1024 - 32
_ZEROS = memoryview(bytes(BLOCK))


def _pwritev_all(fd: int, iov: list[memoryview], offset: int) -> None:
    """Write all of ``iov`` at ``offset`` (``pwritev`` may write less than asked)."""
    i = 0
    while i < len(iov):
        n = os.pwritev(fd, iov[i:i + 1024], offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while i < len(iov) and n >= len(iov[i]):
            n -= len(iov[i])
            i += 1
        if n:
            iov[i] = iov[i][n:]


# The writer ---------------------------------------------------------------------------------


class Ext4Writer:
    """Builds an ext4 image in the open file ``fd`` (positioned writes only).

    Regular file data goes through :meth:`add_data` as it arrives: views of the caller's
    buffers, gathered into batches of about 8 MiB that a thread of the writer writes with
    ``pwritev`` (and starts writing back to disk, so that the final ``fsync`` has little left
    to do); :meth:`finish` lays out everything else and returns the filesystem size.
    :meth:`close` stops that thread (``finish`` does, too).
    """

    def __init__(self, fd: int, *, fs_uuid: uuid.UUID, batch_bytes: int = 8 << 20,
                 in_flight: int = 2,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        """:param batch_bytes: file data is written in batches of about this size.
        :param in_flight: batches handed to the writing thread and not yet written, at most.
        :param on_written: called (in the writing thread) with the first block and the
            count of each run of file data blocks once written: they do not change after,
            unless :attr:`freed` lists them."""
        self.fd = fd
        self.uuid = fs_uuid
        self.root = new_dir()
        self.root.links = 1
        self.data_start = 1 + GDT_RESERVED
        self.next_block = self.data_start
        if batch_bytes <= 0 or batch_bytes % BLOCK:
            raise ValueError("batch_bytes must be a positive multiple of the block size")
        self._batch = batch_bytes
        #: The batch being gathered: views of the tar stream's chunks (file data, no copy)
        #: and zero padding, to be written from block _batch_block on.
        self._iov: list[memoryview] = []
        self._pending = 0
        self._batch_block = self.next_block
        #: Batches are written by a thread of its own (os.pwritev releases the GIL), so that
        #: parsing the tar never waits for the page cache.
        self._todo: queue.Queue[tuple[list[memoryview], int, int] | None] = \
            queue.Queue(in_flight)
        self._write_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._on_written = on_written
        #: (first block, count) of the data of replaced files, punched out by :meth:`finish`.
        self.freed: list[tuple[int, int]] = []
        #: Regular files whose data was written, to find the ones no longer in the tree.
        self._files: list[Node] = []

    # Data ---------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while (job := self._todo.get()) is not None:
            iov, length, offset = job
            try:
                if self._write_error is None:
                    _pwritev_all(self.fd, iov, offset)
                    start_writeback(self.fd, offset, length)
                    if self._on_written is not None:
                        self._on_written(offset // BLOCK, length // BLOCK)
            except BaseException as e:  # raised again in the parsing thread
                self._write_error = e

    def _check_write(self) -> None:
        if self._write_error is not None:
            raise self._write_error

    def _flush(self) -> None:
        """Hand the batch to the writing thread (waiting while it has ``in_flight``)."""
        self._check_write()
        if self._pending:
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, daemon=True,
                                                name="ext4-writer")
                self._thread.start()
            self._todo.put((self._iov, self._pending, self._batch_block * BLOCK))
            self._batch_block += self._pending // BLOCK
            self._iov = []
            self._pending = 0

    def close(self) -> None:
        """Wait for every batch to be written (and stop the writing thread).

        :raises OSError: a write failed.
        """
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        self._check_write()

    def add_data(self, node: Node, size: int, take: Callable[[int], list[memoryview]]) -> None:
        """Give regular file ``node`` ``size`` bytes, got with ``take(n)``: the next ``n``
        bytes, as buffers that stay unchanged until written (or it raises)."""
        node.start = self.next_block
        node.size = size
        nblocks = -(-size // BLOCK)
        if (self.next_block + nblocks) * BLOCK > MAX_BYTES:
            raise Ext4Error(f"the layer is larger than {MAX_BYTES >> 30} GiB")
        left = size
        while left:
            # Whole batches of a large file keep every batch block-aligned.
            n = min(left, self._batch)
            self._iov += take(n)
            self._pending += n
            left -= n
            if left and (self._pending >= self._batch or len(self._iov) >= _IOV_FLUSH):
                self._flush()
        pad = -size % BLOCK
        if pad:
            self._iov.append(_ZEROS[:pad])
            self._pending += pad
        if self._pending >= self._batch or len(self._iov) >= _IOV_FLUSH:
            self._flush()
        self.next_block += nblocks
        self._files.append(node)

    # Layout -------------------------------------------------------------------------------

    def _walk(self) -> Iterator[Node]:
        """Every node in the tree, each once (hard links), parents before children."""
        stack = [self.root]
        while stack:
            d = stack.pop()
            yield d
            assert d.children is not None
            for child in d.children.values():
                if child.children is not None:
                    stack.append(child)
                elif child.ino == 0:
                    child.ino = -1  # seen
                    yield child

    def finish(self, disk_size: Callable[[int], int] | None = None) -> int:
        """Write the metadata; return the size of the image file in bytes.

        :param disk_size: rounds a size in bytes up to one the disk can have (the filesystem
            then takes its whole blocks; a partial last block stays unused).
        """
        self._flush()
        self.close()
        nodes = list(self._walk())
        # Inode numbers: the root is 2, the rest from FIRST_INO on, densely.
        nodes[0].ino = ROOT_INO
        for i, node in enumerate(nodes[1:]):
            node.ino = FIRST_INO + i
        max_ino = FIRST_INO + len(nodes) - 2
        used_files = {id(n) for n in nodes if n.mode & 0o170000 == stat.S_IFREG}
        freed = [(n.start, -(-n.size // BLOCK)) for n in self._files
                 if id(n) not in used_files and n.size]
        for start, count in freed:
            _punch(self.fd, start * BLOCK, count * BLOCK)
        self.freed = freed

        # Metadata blocks after the data, in one buffer: directories, long symlinks, extent
        # leaves, xattr blocks.
        meta = bytearray()
        meta_start = self.next_block
        block_of: dict[int, list[tuple[int, int, int]]] = {}  # id(node) → extents
        leaves: dict[int, int] = {}  # id(node) → first extent leaf block
        xblock: dict[int, int] = {}  # id(node) → xattr block
        shared_x: dict[bytes, int] = {}
        inline_x: dict[int, bytearray] = {}

        def put(data: bytes | bytearray) -> int:
            b = meta_start + len(meta) // BLOCK
            meta.extend(data)
            meta.extend(bytes(-len(data) % BLOCK))
            return b

        parent_ino: dict[int, int] = {id(nodes[0]): ROOT_INO}
        for node in nodes:
            kind = node.mode & 0o170000
            if node.children is not None:
                for child in node.children.values():
                    if child.children is not None:
                        parent_ino[id(child)] = node.ino
                data = self._dir_blocks(node, parent_ino[id(node)])
                b = put(data)
                node.size = len(data)
                block_of[id(node)] = _extents(b, len(data) // BLOCK)
            elif kind == stat.S_IFREG:
                block_of[id(node)] = _extents(node.start, -(-node.size // BLOCK))
            elif kind == stat.S_IFLNK and len(node.target) > _FAST_SYMLINK_MAX:
                b = put(node.target)
                block_of[id(node)] = _extents(b, 1)
            if node.xattrs:
                entries = _xattr_entries(node.xattrs)
                area = _pack_xattrs(entries, INODE_SIZE - 128 - EXTRA_ISIZE, 4, False)
                if area is not None:
                    struct.pack_into("<I", area, 0, _XATTR_MAGIC)
                    inline_x[id(node)] = area
                else:
                    blk = _xattr_block(entries)
                    if blk in shared_x:
                        xblock[id(node)] = shared_x[blk]
                    else:
                        xblock[id(node)] = shared_x[blk] = put(blk)
        shared_refs: dict[int, int] = {}
        for b in xblock.values():
            shared_refs[b] = shared_refs.get(b, 0) + 1
        for key, exts in block_of.items():  # in the nodes' order
            if len(exts) > 4:
                first = meta_start + len(meta) // BLOCK
                for i in range(0, len(exts), 340):
                    chunk = exts[i:i + 340]
                    put(_extent_header(len(chunk), 340, 0) + _leaf(chunk))
                leaves[key] = first
                if (len(exts) + 339) // 340 > 4:
                    raise Ext4Error("file too large for a one-level extent tree")
        # Shared xattr blocks count their references.
        for b, refs in shared_refs.items():
            off = (b - meta_start) * BLOCK
            struct.pack_into("<I", meta, off + 4, refs)
        meta_end = meta_start + len(meta) // BLOCK

        # Groups: bitmaps and inode tables after the metadata; the inode count sets their size.
        inodes_needed = max_ino
        groups = 1
        while True:
            ipg = max(16, -(-inodes_needed // groups))
            ipg = -(-ipg // 16) * 16
            if ipg > BLOCKS_PER_GROUP:
                groups += 1
                continue
            itb = ipg * INODE_SIZE // BLOCK
            end = meta_end + 2 * groups + groups * itb
            disk = disk_size(end * BLOCK) if disk_size is not None else end * BLOCK
            total = disk // BLOCK
            need = -(-total // BLOCKS_PER_GROUP)
            if need <= groups:
                break
            groups = need
        if groups > GDT_RESERVED * (BLOCK // 32) or total * BLOCK > MAX_BYTES:
            raise Ext4Error(f"the layer is larger than {MAX_BYTES >> 30} GiB")
        if total <= (groups - 1) * BLOCKS_PER_GROUP:
            # More groups than blocks need (for the inodes): the last one needs blocks too.
            total = (groups - 1) * BLOCKS_PER_GROUP + 1
            disk = disk_size(total * BLOCK) if disk_size is not None else total * BLOCK
            total = disk // BLOCK
        bb_start = meta_end
        ib_start = bb_start + groups
        it_start = ib_start + groups
        gdt_blocks = -(-groups * 32 // BLOCK)

        # Inode table.
        itable = bytearray(groups * ipg * INODE_SIZE)
        dirs_per_group = [0] * groups
        for node in nodes:
            key = id(node)
            if node.children is not None:
                dirs_per_group[(node.ino - 1) // ipg] += 1
            self._inode(itable, (node.ino - 1) * INODE_SIZE, node, block_of.get(key),
                        leaves.get(key), xblock.get(key), inline_x.get(key))

        # Block bitmap (all groups in one) and counts.
        bitmap = bytearray(groups * BLOCK)
        _set_bits(bitmap, 0, 1 + gdt_blocks)
        _set_bits(bitmap, self.data_start, it_start + groups * ipg * INODE_SIZE // BLOCK)
        for start, count in freed:
            for b in range(start, start + count):  # rare: replaced files
                bitmap[b >> 3] &= ~(1 << (b % 8)) & 0xFF
        _set_bits(bitmap, total, groups * BLOCKS_PER_GROUP)  # padding past the end
        free_blocks = []
        for g in range(groups):
            used = int.from_bytes(bitmap[g * BLOCK:(g + 1) * BLOCK], "little").bit_count()
            free_blocks.append(BLOCKS_PER_GROUP - used)

        # Inode bitmaps.
        ibitmaps = bytearray(groups * BLOCK)
        free_inodes = []
        for g in range(groups):
            first = g * ipg + 1
            used = max(0, min(max_ino, first + ipg - 1) - first + 1)
            base = g * BLOCK * 8
            _set_bits(ibitmaps, base, base + used)
            _set_bits(ibitmaps, base + ipg, base + BLOCK * 8)
            free_inodes.append(ipg - used)

        gdt = bytearray(gdt_blocks * BLOCK)
        for g in range(groups):
            struct.pack_into("<IIIHHHH", gdt, g * 32, bb_start + g, ib_start + g,
                             it_start + g * itb, free_blocks[g], free_inodes[g],
                             dirs_per_group[g], 0)

        os.pwrite(self.fd, meta, meta_start * BLOCK)
        os.pwrite(self.fd, bitmap, bb_start * BLOCK)
        os.pwrite(self.fd, ibitmaps, ib_start * BLOCK)
        os.pwrite(self.fd, itable, it_start * BLOCK)
        os.pwrite(self.fd, gdt, BLOCK)
        os.pwrite(self.fd, self._superblock(total, groups, ipg, sum(free_blocks),
                                            sum(free_inodes)), 1024)
        os.ftruncate(self.fd, disk)
        return disk

    def _dir_blocks(self, node: Node, parent: int) -> bytes:
        """A linear directory's blocks: entries never cross a block, and the last entry of
        each block stretches to its end."""
        assert node.children is not None
        out = bytearray()
        block = 0  # offset in out of the current block
        last = 0  # offset in out of its last entry
        entries = [(node.ino, b".", 2), (parent, b"..", 2)]
        entries += [(child.ino, name, _FTYPE[child.mode & 0o170000])
                    for name, child in node.children.items()]
        for ino, name, ftype in entries:
            n = len(name)
            need = 8 + n + (-n % 4)
            if len(out) - block + need > BLOCK:
                _REC_LEN.pack_into(out, last + 4, block + BLOCK - last)
                out += bytes(block + BLOCK - len(out))
                block += BLOCK
            last = len(out)
            out += _DIRENT.pack(ino, need, n, ftype)
            out += name
            out += _PADS[-n % 4]
        _REC_LEN.pack_into(out, last + 4, block + BLOCK - last)
        out += bytes(block + BLOCK - len(out))
        return bytes(out)

    def _inode(self, table: bytearray, off: int, node: Node,
               exts: list[tuple[int, int, int]] | None, leaf: int | None, xblock: int | None,
               inline: bytearray | None) -> None:
        kind = node.mode & 0o170000
        flags = 0
        iblock = b""  # the 60-byte i_block, zero-padded by the struct
        blocks = 0
        if exts is not None:
            flags = _EXTENTS_FL
            blocks = sum(n for _, _, n in exts)
            if leaf is None:
                iblock = _extent_header(len(exts), 4, 0) + _leaf(exts)
            else:
                nleaves = -(-len(exts) // 340)
                iblock = _extent_header(nleaves, 4, 1) + b"".join(
                    struct.pack("<IIHH", exts[i * 340][0], leaf + i, 0, 0)
                    for i in range(nleaves))
                blocks += nleaves
        elif kind == stat.S_IFREG or kind == stat.S_IFDIR:
            flags = _EXTENTS_FL
            iblock = _EMPTY_EXTENTS
        elif kind == stat.S_IFLNK:
            iblock = node.target
        elif kind == stat.S_IFCHR or kind == stat.S_IFBLK:
            major, minor = node.rdev
            if major < 256 and minor < 256:
                iblock = struct.pack("<I", (major << 8) | minor)
            else:
                iblock = struct.pack("<II", 0,
                                     (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))
        if xblock is not None:
            blocks += 1
        if kind == stat.S_IFLNK:
            size = len(node.target)
        elif kind == stat.S_IFREG or kind == stat.S_IFDIR:
            size = node.size
        else:
            size = 0
        if node.children is not None:
            nlink = 2
            for c in node.children.values():
                if c.children is not None:
                    nlink += 1
            if nlink > MAX_LINKS:
                nlink = 1  # dir_nlink: "many"
        else:
            nlink = node.links
        t, tx = _time(node.mtime_ns)
        uid, gid = node.uid, node.gid
        _INODE.pack_into(
            table, off, node.mode & 0xFFFF, uid & 0xFFFF, size & 0xFFFFFFFF, t, t, t, 0,
            gid & 0xFFFF, nlink, blocks * (BLOCK // 512), flags, 0, iblock, 0, xblock or 0,
            size >> 32, 0, 0, 0, (uid >> 16) & 0xFFFF, (gid >> 16) & 0xFFFF, 0, 0,
            EXTRA_ISIZE, 0, tx, tx, tx, t, tx, 0, 0)
        if inline is not None:
            table[off + 128 + EXTRA_ISIZE:off + INODE_SIZE] = inline

    def _superblock(self, total: int, groups: int, ipg: int, free_blocks: int,
                    free_inodes: int) -> bytes:
        sb = bytearray(1024)
        struct.pack_into(
            "<IIIIIIIIIIIIIHhHHHHIIIIHHIHHIII", sb, 0,
            groups * ipg, total, 0, free_blocks, free_inodes, 0, 2, 2, BLOCKS_PER_GROUP,
            BLOCKS_PER_GROUP, ipg, 0, 0, 0, -1, 0xEF53, 1, 1, 0, 0, 0, 0, 1, 0, 0, FIRST_INO,
            INODE_SIZE, 0, _COMPAT, _INCOMPAT, _RO_COMPAT)
        sb[104:120] = self.uuid.bytes
        sb[236:252] = self.uuid.bytes  # hash seed (unused without dir_index)
        sb[252] = 1  # half_md4
        struct.pack_into("<HH", sb, 0x15C, EXTRA_ISIZE, EXTRA_ISIZE)
        struct.pack_into("<I", sb, 0x160, 1)  # signed directory hash
        sb[0x174] = 4  # log2 groups per flex group
        struct.pack_into("<II", sb, 0x24C, 0, 0)  # sparse_super2: no backup superblocks
        return bytes(sb)
