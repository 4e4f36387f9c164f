"""What the guest needs to mount a layer through dm-verity. STDLIB ONLY.

A verified layer disk holds its ext4 image in ``data_blocks`` blocks of ``data_block_size``
bytes from offset 0, and at byte ``hash_offset`` a dm-verity superblock (the format
``veritysetup`` writes and reads) followed, one hash block later, by the hash tree. The root
hash is *not* taken from the disk: it comes from the host (the layer folder's ``verity.json``,
written at import), so a disk changed on the host no longer matches it and the guest's reads of
the changed blocks fail with EIO.

The same structure is the ``verity`` argument of ``mount_scsi`` / ``mount_vpmem``, the content
of ``verity.json``, and the input of :func:`dm_table`, which turns it into the kernel's
``verity`` target line.
"""

from __future__ import annotations

import struct

from uvmshim.protocol.schema import Struct

TYPE_CHECKING = False  # not from typing: importing typing costs guest boot time
if TYPE_CHECKING:
    from uvmshim.protocol.schema import Index

#: Digest sizes of the hash algorithms we accept (the kernel's crypto API names).
DIGEST_SIZES = {"sha256": 32, "sha512": 64}
#: dm-verity's superblock signature and the size of the superblock.
SUPERBLOCK_MAGIC = b"verity\0\0"
SUPERBLOCK_SIZE = 512
#: The superblock, little-endian: signature, version (1), hash type (1), uuid, algorithm name,
#: data and hash block sizes, data blocks, salt size, padding, salt, padding.
_SB_FORMAT = "<8sII16s32sIIQH6s256s168s"
#: The name of the file beside ``layer.vhd`` that holds a layer's :class:`Verity` as JSON.
VERITY_FILE = "verity.json"


class VerityError(ValueError):
    """A :class:`Verity` that cannot describe a dm-verity device."""


class Verity(Struct):
    """dm-verity parameters of one layer disk (hash type 1, the ``veritysetup`` default)."""

    root_hash: str
    salt: str
    data_blocks: Index
    hash_offset: Index
    algorithm: str = "sha256"
    data_block_size: Index = 4096
    hash_block_size: Index = 4096

    @classmethod
    def wire_name(cls) -> str:
        return "verity"

    def check(self) -> Verity:
        """Return self if every field makes sense together.

        :raises VerityError: naming the field that does not.
        """
        size = DIGEST_SIZES.get(self.algorithm)
        if size is None:
            raise VerityError(f"verity: unsupported hash algorithm {self.algorithm!r}")
        if not _is_hex(self.root_hash, size):
            raise VerityError(f"verity: root_hash must be {2 * size} hex digits")
        if len(self.salt) > 512 or (self.salt and not _is_hex(self.salt, len(self.salt) // 2)):
            raise VerityError("verity: salt must be at most 256 bytes in hex")
        for name in ("data_block_size", "hash_block_size"):
            value = getattr(self, name)
            if value < 512 or value > 65536 or value & (value - 1):
                raise VerityError(f"verity: {name} must be a power of two from 512 to 65536")
        if self.data_blocks < 1:
            raise VerityError("verity: data_blocks must be at least 1")
        if self.hash_offset % self.hash_block_size:
            raise VerityError("verity: hash_offset must be a multiple of hash_block_size")
        if self.hash_offset < self.data_blocks * self.data_block_size:
            raise VerityError("verity: the hash area overlaps the data")
        return self

    @property
    def data_bytes(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def hash_start_block(self) -> int:
        """The first block of the hash tree (in hash blocks): one block after the superblock."""
        return self.hash_offset // self.hash_block_size + 1


def _is_hex(text: str, nbytes: int) -> bool:
    if len(text) != 2 * nbytes:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower()


def tree_blocks(data_blocks: int, hash_block_size: int = 4096, digest_size: int = 32) -> int:
    """How many hash blocks the tree over ``data_blocks`` takes (every level)."""
    per_block = 1 << ((hash_block_size // digest_size).bit_length() - 1)
    total, n = 0, data_blocks
    while n > 1:
        n = -(-n // per_block)
        total += n
    return total


def dm_table(v: Verity, data_device: str, hash_device: str | None = None) -> str:
    """The parameters of the kernel's ``verity`` target for ``v`` (without start and length).

    ``data_device`` (and ``hash_device``, default: the same) is a path or ``major:minor``.
    Corruption makes reads fail with EIO (the target's default), never restarts the guest.
    """
    return (f"1 {data_device} {hash_device or data_device} {v.data_block_size} "
            f"{v.hash_block_size} {v.data_blocks} {v.hash_start_block} {v.algorithm} "
            f"{v.root_hash} {v.salt or '-'}")


def superblock(v: Verity, uuid: bytes = bytes(16)) -> bytes:
    """The 512-byte dm-verity superblock describing ``v`` (as ``veritysetup format`` writes)."""
    salt = bytes.fromhex(v.salt)
    return struct.pack(_SB_FORMAT, SUPERBLOCK_MAGIC, 1, 1, uuid, v.algorithm.encode(),
                       v.data_block_size, v.hash_block_size, v.data_blocks, len(salt), b"",
                       salt, b"")


def check_superblock(raw: bytes, v: Verity) -> None:
    """Check that the superblock ``raw`` (read at ``v.hash_offset``) describes ``v``'s tree.

    The root hash is not in the superblock; the kernel checks it against the tree.

    :raises VerityError: no superblock there, or one with other parameters.
    """
    if len(raw) < SUPERBLOCK_SIZE or raw[:8] != SUPERBLOCK_MAGIC:
        raise VerityError(f"no dm-verity superblock at byte {v.hash_offset} of the disk "
                          "(was the layer imported without verity?)")
    (_, version, hash_type, _uuid, alg, dbs, hbs, blocks, salt_size, _, salt,
     _) = struct.unpack(_SB_FORMAT, raw[:SUPERBLOCK_SIZE])
    found = (version, hash_type, alg.rstrip(b"\0").decode("ascii", "replace"), dbs, hbs, blocks,
             salt[:min(salt_size, 256)].hex())
    want = (1, 1, v.algorithm, v.data_block_size, v.hash_block_size, v.data_blocks, v.salt)
    if found != want:
        names = ("version", "hash type", "algorithm", "data block size", "hash block size",
                 "data blocks", "salt")
        diff = [f"{n} {f!r} (expected {w!r})" for n, f, w in zip(names, found, want, strict=True)
                if f != w]
        raise VerityError("the disk's dm-verity superblock does not match the layer's "
                          "verity.json: " + ", ".join(diff))
