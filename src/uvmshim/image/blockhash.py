"""Salted digests of 4 KiB blocks, as dm-verity's hash type 1 makes them:
``sha256(salt || block)`` for each block. Standard library only.

Run as a script (``python -I -S blockhash.py FD SALT_HEX``) it is the child process of
:class:`uvmshim.image.verity.DataHasher`: it reads lines ``FIRST COUNT`` on stdin, hashes those
blocks of the inherited file descriptor ``FD``, and writes all the digests to stdout at the
end. A script, not ``-m``: with ``-I -S`` it starts in a few milliseconds and imports nothing
but what it needs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

BLOCK = 4096
ALGORITHM = "sha256"
CHUNK_BLOCKS = 1024  # 4 MiB per read


class VerityStopped(Exception):
    """The caller asked the hashing to stop."""


def hash_blocks(data: bytes | bytearray | memoryview, salt: bytes) -> bytes:
    """The concatenated digests of each ``BLOCK``-sized block of ``data`` (whole blocks)."""
    base = hashlib.new(ALGORITHM, salt)
    out = bytearray()
    view = memoryview(data)
    for off in range(0, len(view), BLOCK):
        h = base.copy()
        h.update(view[off:off + BLOCK])
        out += h.digest()
    return bytes(out)


def file_digests(fd: int, first: int, count: int, salt: bytes,
                 stop: threading.Event | None = None) -> bytes:
    """The concatenated digests of blocks ``first .. first+count-1`` of ``fd`` (blocks past
    its end read as zeros), read in 4 MiB chunks.

    :raises VerityStopped: ``stop`` was set.
    """
    out = bytearray()
    view = memoryview(bytearray(CHUNK_BLOCKS * BLOCK))
    block = first
    end = first + count
    while block < end:
        if stop is not None and stop.is_set():
            raise VerityStopped
        n = min(CHUNK_BLOCKS, end - block)
        want = n * BLOCK
        got = os.preadv(fd, [view[:want]], block * BLOCK)
        if got < want:  # past the end of the file: the blocks read as zeros
            view[got:want] = bytes(want - got)
        out += hash_blocks(view[:want], salt)
        block += n
    return bytes(out)


def _main() -> None:
    fd, salt = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
    out = bytearray()
    for line in sys.stdin.buffer:
        first, count = map(int, line.split())
        out += file_digests(fd, first, count, salt)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _main()
