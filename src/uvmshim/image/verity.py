"""dm-verity for layer disks: the hash tree and superblock after the ext4 image.

A verified ``layer.vhd`` is laid out as ``veritysetup format --hash-offset`` would lay out one
device holding both data and hashes, followed by the VHD footer::

    0                    ext4 image: data_blocks × 4096 bytes
    hash_offset          dm-verity superblock (512 bytes; the rest of its 4 KiB block zero)
    hash_offset + 4096   hash tree, top level first, level 0 (hashes of data blocks) last
    ...                  zeros up to an exact CHS geometry (see :mod:`.vhd`)
    size - 512           VHD footer

Hash type 1 (``veritysetup``'s default): a block's digest is ``sha256(salt || block)``; a hash
block holds 128 digests followed by zeros; the root hash is the digest of the single top block.
The salt is derived from the diff id, so the same layer always gives the same disk and root hash.

File data is hashed while the tar is still being read: the ext4 writer hands each run of data
blocks it writes to a :class:`LeafHasher`, which hashes a copy in a thread of its own (hashlib
releases the GIL for each 4 KiB block), so the hashing overlaps decompression and tar parsing.
What the writer lays out at the end (superblock, group descriptors, directories, inode tables)
and the blocks of replaced files are read back from the page cache and hashed then.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from uvmshim.protocol.verity import DIGEST_SIZES, Verity, superblock

BLOCK = 4096
ALGORITHM = "sha256"
_CHUNK_BLOCKS = 1024  # 4 MiB per read
#: Threads hashing the data blocks (the machine may have fewer CPUs: never more than it has).
HASH_THREADS = 2


class VerityStopped(Exception):
    """The caller asked the hashing to stop."""


def salt_for(diff_id: str) -> bytes:
    """The layer's salt: 32 bytes derived from its diff id."""
    return hashlib.sha256(b"uvmshim dm-verity salt\0" + diff_id.encode()).digest()


def _digests(fd: int, first: int, count: int, salt: bytes, stop: threading.Event | None) -> bytes:
    """The concatenated digests of data blocks ``first .. first+count-1`` of ``fd``."""
    base = hashlib.new(ALGORITHM, salt)
    out = bytearray()
    buf = bytearray(_CHUNK_BLOCKS * BLOCK)
    view = memoryview(buf)
    block = first
    end = first + count
    while block < end:
        if stop is not None and stop.is_set():
            raise VerityStopped
        n = min(_CHUNK_BLOCKS, end - block)
        want = n * BLOCK
        got = os.preadv(fd, [view[:want]], block * BLOCK)
        if got < want:  # past the end of the file: the blocks read as zeros
            view[got:want] = bytes(want - got)
        for off in range(0, want, BLOCK):
            h = base.copy()
            h.update(view[off:off + BLOCK])
            out += h.digest()
        block += n
    return bytes(out)


class LeafHasher:
    """Hashes runs of data blocks in a background thread, as the writer flushes them.

    At most ``max_pending`` runs wait (each a copy of up to the writer's buffer): beyond that
    :meth:`add` waits for the oldest, so a slow hasher slows the writer instead of filling
    memory. Call :meth:`close` in all cases.
    """

    def __init__(self, salt: bytes, *, max_pending: int = 2) -> None:
        self._salt = salt
        self._max = max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="verity")
        self._pending: deque[tuple[int, Future[bytes]]] = deque()
        self.done: list[tuple[int, bytes]] = []

    def add(self, first_block: int, data: memoryview) -> None:
        """Hash ``data`` (whole blocks), the content of blocks from ``first_block`` on."""
        while len(self._pending) >= self._max:
            first, fut = self._pending.popleft()
            self.done.append((first, fut.result()))
        self._pending.append((first_block, self._pool.submit(_hash_blocks, bytes(data),
                                                             self._salt)))

    def close(self) -> list[tuple[int, bytes]]:
        """Wait for the runs in progress; return ``(first block, digests)`` of every run."""
        try:
            while self._pending:
                first, fut = self._pending.popleft()
                self.done.append((first, fut.result()))
        finally:
            self._pool.shutdown(cancel_futures=True)
        return self.done


def _hash_blocks(level: bytes, salt: bytes) -> bytes:
    """The digests of each ``BLOCK``-sized block of ``level`` (already padded)."""
    base = hashlib.new(ALGORITHM, salt)
    out = bytearray()
    view = memoryview(level)
    for off in range(0, len(level), BLOCK):
        h = base.copy()
        h.update(view[off:off + BLOCK])
        out += h.digest()
    return bytes(out)


def _read_and_hash(fd: int, ranges: list[tuple[int, int]], salt: bytes,
                   stop: threading.Event | None) -> list[bytes]:
    """The digests of each ``(first, count)`` block range of ``fd``, in threads for big ones."""
    total = sum(count for _, count in ranges)
    threads = max(1, min(HASH_THREADS, os.cpu_count() or 1, total // _CHUNK_BLOCKS))
    if threads == 1:
        return [_digests(fd, first, count, salt, stop) for first, count in ranges]
    # Split on chunk boundaries so that each thread reads whole chunks.
    pieces: list[tuple[int, int, int]] = []  # (range index, first, count)
    per = max(_CHUNK_BLOCKS, -(-total // threads // _CHUNK_BLOCKS) * _CHUNK_BLOCKS)
    for i, (first, count) in enumerate(ranges):
        pieces += [(i, s, min(per, first + count - s)) for s in range(first, first + count, per)]
    with ThreadPoolExecutor(threads, thread_name_prefix="verity") as pool:
        parts = list(pool.map(lambda p: _digests(fd, p[1], p[2], salt, stop), pieces))
    out = [b""] * len(ranges)
    for (i, _, _), digests in zip(pieces, parts, strict=True):
        out[i] += digests
    return out


def build_tree(fd: int, data_blocks: int, salt: bytes, *,
               known: Iterable[tuple[int, bytes]] = (),
               stale: Iterable[tuple[int, int]] = (),
               stop: threading.Event | None = None) -> tuple[bytes, list[bytes]]:
    """Hash the first ``data_blocks`` blocks of ``fd``.

    :param known: ``(first block, digests)`` already computed (by a :class:`LeafHasher`); the
        other blocks are read from ``fd``.
    :param stale: ``(first block, count)`` ranges whose known digests no longer hold (the
        blocks were rewritten): read again.
    :return: the root hash and the tree's levels, bottom (level 0) first, each padded to whole
        hash blocks.
    """
    digest_size = DIGEST_SIZES[ALGORITHM]
    per_block = BLOCK // digest_size
    leaves = bytearray(data_blocks * digest_size)
    have = bytearray(data_blocks)  # 1: the leaf digest is known
    for first, digests in known:
        n = min(len(digests) // digest_size, data_blocks - first)
        if n > 0:
            leaves[first * digest_size:(first + n) * digest_size] = digests[:n * digest_size]
            have[first:first + n] = b"\1" * n
    for first, count in stale:
        end = min(first + count, data_blocks)
        if end > first:
            have[first:end] = bytes(end - first)
    todo: list[tuple[int, int]] = []
    block = 0
    while block < data_blocks:
        start = have.find(0, block)
        if start < 0:
            break
        end = have.find(1, start)
        end = data_blocks if end < 0 else end
        todo.append((start, end - start))
        block = end
    for (first, count), digests in zip(todo, _read_and_hash(fd, todo, salt, stop),
                                       strict=True):
        leaves[first * digest_size:(first + count) * digest_size] = digests
    cur = bytes(leaves)
    levels: list[bytes] = []
    while len(cur) > digest_size:
        count = len(cur) // digest_size
        padded = cur + bytes(-count % per_block * digest_size)
        levels.append(padded)
        cur = _hash_blocks(padded, salt)
    return cur, levels


def append_hash_tree(fd: int, data_bytes: int, *, salt: bytes, uuid: bytes,
                     known: Iterable[tuple[int, bytes]] = (),
                     stale: Iterable[tuple[int, int]] = (),
                     stop: threading.Event | None = None) -> tuple[Verity, int]:
    """Write the superblock and hash tree of the first ``data_bytes`` of ``fd`` at
    ``data_bytes`` (a multiple of 4096); ``known`` and ``stale`` as for :func:`build_tree`.

    :return: the layer's :class:`Verity` and the end of the hash area (bytes).
    """
    if data_bytes % BLOCK or data_bytes <= 0:
        raise ValueError(f"verity data size {data_bytes} is not a positive multiple of {BLOCK}")
    data_blocks = data_bytes // BLOCK
    root, levels = build_tree(fd, data_blocks, salt, known=known, stale=stale, stop=stop)
    info = Verity(root_hash=root.hex(), salt=salt.hex(), data_blocks=data_blocks,
                  hash_offset=data_bytes, algorithm=ALGORITHM, data_block_size=BLOCK,
                  hash_block_size=BLOCK).check()
    sb = superblock(info, uuid)
    area = bytearray(sb + bytes(BLOCK - len(sb)))
    for level in reversed(levels):  # top level first
        area += level
    pos = data_bytes
    view = memoryview(area)
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
    return info, data_bytes + len(area)
