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

File data is hashed *while* the tar is unpacked, by a child process (:class:`DataHasher`):
the writer tells it each range of blocks as soon as it is written, and the child reads them back
from the page cache. A child, not a thread: hashing is one short GIL-releasing call per 4 KiB
block, and a thread doing it waits for the GIL at every block (two threads hashing the finished
image are no faster than one, measured). What the child cannot know is hashed once the writer
has finished the image: the superblock and descriptors, the metadata after the data, and the
blocks of replaced files (punched out at the end). Without the child (it could not start, or
failed), the whole image is hashed then; the result is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from uvmshim.image import blockhash
from uvmshim.image.blockhash import ALGORITHM, BLOCK, CHUNK_BLOCKS, file_digests, hash_blocks
from uvmshim.protocol.verity import DIGEST_SIZES, Verity, superblock

#: Threads hashing the data blocks (the machine may have fewer CPUs: never more than it has).
HASH_THREADS = 2


def salt_for(diff_id: str) -> bytes:
    """The layer's salt: 32 bytes derived from its diff id."""
    return hashlib.sha256(b"uvmshim dm-verity salt\0" + diff_id.encode()).digest()


class DataHasher:
    """Hashes data blocks of ``fd`` in a child process, as the writer finishes them.

    :meth:`add` (from any one thread) hands over blocks that will not change; :meth:`digests`
    collects what the child computed. Any failure of the child only loses its work: the
    blocks are then hashed by :func:`build_tree`. :meth:`close` kills the child if it runs.
    """

    def __init__(self, fd: int, salt: bytes) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        with contextlib.suppress(OSError):
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", blockhash.__file__, str(fd), salt.hex()],  # see there
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                pass_fds=(fd,))

    def add(self, first: int, count: int) -> None:
        """Blocks ``first .. first+count-1`` are final: hash them."""
        proc = self._proc
        if proc is None or proc.stdin is None or not count:
            return
        try:
            os.write(proc.stdin.fileno(), f"{first} {count}\n".encode())
        except (OSError, ValueError):  # the child died: build_tree hashes these blocks
            self.close()
            return
        self._ranges.append((first, count))

    def digests(self) -> list[tuple[int, bytes]]:
        """Wait for the child: (first block, concatenated digests) of each range it hashed;
        nothing if it failed."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return []
        try:
            proc.stdin.close()
            out = proc.stdout.read()
            rc = proc.wait()
        except OSError:
            rc = -1
        finally:
            self.close()
        digest_size = DIGEST_SIZES[ALGORITHM]
        if rc != 0 or len(out) != sum(c for _, c in self._ranges) * digest_size:
            return []
        parts = []
        pos = 0
        for first, count in self._ranges:
            parts.append((first, out[pos:pos + count * digest_size]))
            pos += count * digest_size
        return parts

    def close(self) -> None:
        """Stop the child (if it still runs) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _level0(fd: int, data_blocks: int, salt: bytes, stop: threading.Event | None) -> bytes:
    """The digests of the first ``data_blocks`` blocks of ``fd``."""
    threads = max(1, min(HASH_THREADS, os.cpu_count() or 1, data_blocks // CHUNK_BLOCKS))
    if threads == 1:
        return file_digests(fd, 0, data_blocks, salt, stop)
    # Split on chunk boundaries so that each thread reads whole chunks.
    per = -(-data_blocks // threads // CHUNK_BLOCKS) * CHUNK_BLOCKS
    ranges = [(s, min(per, data_blocks - s)) for s in range(0, data_blocks, per)]
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="verity") as pool:
        parts = list(pool.map(lambda r: file_digests(fd, r[0], r[1], salt, stop), ranges))
    return b"".join(parts)


def build_tree(fd: int, data_blocks: int, salt: bytes, *,
               stop: threading.Event | None = None,
               known: list[tuple[int, bytes]] | None = None,
               stale: list[tuple[int, int]] | None = None) -> tuple[bytes, list[bytes]]:
    """Hash the first ``data_blocks`` blocks of ``fd``.

    :param known: (first block, digests) of blocks already hashed (by a :class:`DataHasher`);
        the others are hashed here.
    :param stale: (first block, count) of blocks among ``known`` that changed since: hashed
        again.
    :return: the root hash and the tree's levels, bottom (level 0) first, each padded to whole
        hash blocks.
    """
    digest_size = DIGEST_SIZES[ALGORITHM]
    per_block = BLOCK // digest_size
    if not known:
        cur = _level0(fd, data_blocks, salt, stop)
    else:
        level0 = bytearray(data_blocks * digest_size)
        done = bytearray(data_blocks)  # 1: hashed
        for first, digests in known:
            count = min(len(digests) // digest_size, data_blocks - first)
            if first < 0 or count <= 0:
                continue
            level0[first * digest_size:(first + count) * digest_size] = \
                digests[:count * digest_size]
            done[first:first + count] = b"\1" * count
        for first, count in stale or ():
            done[first:first + count] = bytes(len(done[first:first + count]))
        block = 0
        while (block := done.find(0, block)) >= 0:
            end = done.find(1, block)
            end = data_blocks if end < 0 else end
            level0[block * digest_size:end * digest_size] = \
                file_digests(fd, block, end - block, salt, stop)
            block = end
        cur = bytes(level0)
    levels: list[bytes] = []
    while len(cur) > digest_size:
        count = len(cur) // digest_size
        padded = cur + bytes(-count % per_block * digest_size)
        levels.append(padded)
        cur = hash_blocks(padded, salt)
    return cur, levels


def append_hash_tree(fd: int, data_bytes: int, *, salt: bytes, uuid: bytes,
                     stop: threading.Event | None = None,
                     known: list[tuple[int, bytes]] | None = None,
                     stale: list[tuple[int, int]] | None = None) -> tuple[Verity, int]:
    """Write the superblock and hash tree of the first ``data_bytes`` of ``fd`` at
    ``data_bytes`` (a multiple of 4096).

    :param known: digests already computed, and ``stale``: those of them to compute again
        (see :func:`build_tree`).
    :return: the layer's :class:`Verity` and the end of the hash area (bytes).
    """
    if data_bytes % BLOCK or data_bytes <= 0:
        raise ValueError(f"verity data size {data_bytes} is not a positive multiple of {BLOCK}")
    data_blocks = data_bytes // BLOCK
    root, levels = build_tree(fd, data_blocks, salt, stop=stop, known=known, stale=stale)
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
