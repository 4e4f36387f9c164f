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

The image is hashed once the writer has finished it, read back from the page cache in 4 MiB
chunks by two threads (hashlib releases the GIL while it hashes each 4 KiB block). Hashing in a
thread or a process *while* the tar is unpacked was measured too: a thread contends with the
unpacking for the GIL at every block, and a process was slower on a loaded machine; the hash
costs about 1 ms per MiB of image and one CPU, which is what the separate pass adds.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

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


def build_tree(fd: int, data_blocks: int, salt: bytes, *,
               stop: threading.Event | None = None) -> tuple[bytes, list[bytes]]:
    """Hash the first ``data_blocks`` blocks of ``fd``.

    :return: the root hash and the tree's levels, bottom (level 0) first, each padded to whole
        hash blocks.
    """
    digest_size = DIGEST_SIZES[ALGORITHM]
    per_block = BLOCK // digest_size
    threads = max(1, min(HASH_THREADS, os.cpu_count() or 1, data_blocks // _CHUNK_BLOCKS))
    if threads == 1:
        cur = _digests(fd, 0, data_blocks, salt, stop)
    else:
        # Split on chunk boundaries so that each thread reads whole chunks.
        per = -(-data_blocks // threads // _CHUNK_BLOCKS) * _CHUNK_BLOCKS
        ranges = [(s, min(per, data_blocks - s)) for s in range(0, data_blocks, per)]
        with ThreadPoolExecutor(len(ranges), thread_name_prefix="verity") as pool:
            parts = list(pool.map(lambda r: _digests(fd, r[0], r[1], salt, stop), ranges))
        cur = b"".join(parts)
    levels: list[bytes] = []
    while len(cur) > digest_size:
        count = len(cur) // digest_size
        padded = cur + bytes(-count % per_block * digest_size)
        levels.append(padded)
        cur = _hash_blocks(padded, salt)
    return cur, levels


def append_hash_tree(fd: int, data_bytes: int, *, salt: bytes, uuid: bytes,
                     stop: threading.Event | None = None) -> tuple[Verity, int]:
    """Write the superblock and hash tree of the first ``data_bytes`` of ``fd`` at
    ``data_bytes`` (a multiple of 4096).

    :return: the layer's :class:`Verity` and the end of the hash area (bytes).
    """
    if data_bytes % BLOCK or data_bytes <= 0:
        raise ValueError(f"verity data size {data_bytes} is not a positive multiple of {BLOCK}")
    data_blocks = data_bytes // BLOCK
    root, levels = build_tree(fd, data_blocks, salt, stop=stop)
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
