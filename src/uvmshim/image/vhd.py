"""The 512-byte footer that turns a raw disk image into a *fixed* VHD.

A fixed VHD is the raw disk bytes followed by one footer (Microsoft's "Virtual Hard Disk Image
Format Specification", 2006). hcsshim's ``tar2ext4 -vhd`` writes layer disks this way, and QEMU's
``vpc`` driver reads them. All fields are big-endian::

    off size field
      0    8 cookie "conectix"
      8    4 features (2 = reserved bit, always set)
     12    4 file format version 0x00010000
     16    8 data offset (all ones: a fixed disk has no dynamic header)
     24    4 timestamp, seconds since 2000-01-01 00:00:00 UTC
     28    4 creator application
     32    4 creator version
     36    4 creator host OS ("Wi2k")
     40    8 original size
     48    8 current size
     56    4 geometry: cylinders (2), heads (1), sectors per track (1)
     60    4 disk type (2 = fixed)
     64    4 checksum: ones' complement of the byte sum of the footer with this field zeroed
     68   16 unique id
     84    1 saved state
     85  427 reserved (zero)

Why :func:`round_to_geometry` exists: QEMU decides the virtual size of a VHD by its creator
application. For apps it does not know as "size-based" (Hyper-V's ``win ``, ``qem2``, ``d2v ``,
...) it uses cylinders × heads × sectors × 512 and ignores ``current size``. A disk whose size is
not exactly representable in CHS would then look a few sectors *smaller* in the guest, cutting
the end off the ext4 filesystem. So we size every disk to an exact CHS value; then both readings
agree, whatever the reader believes about our creator app. Above the CHS maximum (about 127 GiB)
QEMU uses ``current size`` anyway.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass

FOOTER_SIZE = 512
SECTOR = 512
COOKIE = b"conectix"
DISK_TYPE_FIXED = 2
#: Our creator application: honest about who wrote the disk (see the module docstring for why
#: this does not matter to QEMU's size computation).
CREATOR_APP = b"uvms"
CREATOR_VERSION = 0x00010000
CREATOR_HOST_OS = b"Wi2k"
#: 65535 cylinders × 16 heads × 255 sectors: the largest geometry a footer can hold.
MAX_CHS_SECTORS = 65535 * 16 * 255
_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z
_FMT = ">8sIIQI4sI4sQQHBBII16sB427s"


@dataclass(frozen=True)
class Geometry:
    cylinders: int
    heads: int
    sectors: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors


def geometry(total_sectors: int) -> Geometry:
    """The CHS geometry for ``total_sectors``, by the algorithm in the VHD specification."""
    total = min(total_sectors, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return Geometry(cth // heads, heads, spt)


def round_to_geometry(size: int) -> int:
    """The smallest disk size ≥ ``size`` (bytes) that CHS represents exactly.

    Sizes beyond the CHS maximum are only rounded up to a whole sector.
    """
    sectors = -(-size // SECTOR)
    if sectors >= MAX_CHS_SECTORS:
        return sectors * SECTOR
    # At most sectors-per-track × heads (255 × 16) steps; in practice a few hundred.
    while geometry(sectors).total_sectors != sectors:
        sectors += 1
    return sectors * SECTOR


def _checksum(raw: bytes) -> int:
    return ~sum(raw) & 0xFFFFFFFF


def footer(size: int, *, unique_id: bytes | None = None, timestamp: float | None = None) -> bytes:
    """The fixed-VHD footer for a disk of ``size`` bytes (a multiple of 512).

    :param unique_id: 16 bytes; default: a random UUID. Deriving it from the content (as the
        layer store does from the diff id) makes the output reproducible.
    :param timestamp: Unix time for the footer's timestamp; default: now.
    """
    if size % SECTOR:
        raise ValueError(f"VHD size {size} is not a multiple of {SECTOR}")
    uid = unique_id if unique_id is not None else uuid.uuid4().bytes
    if len(uid) != 16:
        raise ValueError("a VHD unique id has 16 bytes")
    ts = int(time.time() if timestamp is None else timestamp) - _VHD_EPOCH
    geo = geometry(size // SECTOR)
    fields = [COOKIE, 2, 0x00010000, 0xFFFFFFFFFFFFFFFF, max(ts, 0) & 0xFFFFFFFF, CREATOR_APP,
              CREATOR_VERSION, CREATOR_HOST_OS, size, size, geo.cylinders, geo.heads,
              geo.sectors, DISK_TYPE_FIXED, 0, uid, 0, b""]
    raw = struct.pack(_FMT, *fields)
    fields[14] = _checksum(raw)
    return struct.pack(_FMT, *fields)


@dataclass(frozen=True)
class Footer:
    """A parsed footer (only the fields anyone reads)."""

    current_size: int
    disk_type: int
    geometry: Geometry
    creator_app: bytes
    unique_id: bytes


def parse_footer(raw: bytes) -> Footer:
    """Parse and check a footer.

    :raises ValueError: wrong length, cookie or checksum.
    """
    if len(raw) != FOOTER_SIZE:
        raise ValueError(f"a VHD footer has {FOOTER_SIZE} bytes, not {len(raw)}")
    f = struct.unpack(_FMT, raw)
    if f[0] != COOKIE:
        raise ValueError("no 'conectix' cookie: not a VHD footer")
    zeroed = raw[:64] + b"\0\0\0\0" + raw[68:]
    if _checksum(zeroed) != f[14]:
        raise ValueError("VHD footer checksum mismatch")
    return Footer(current_size=f[9], disk_type=f[13], geometry=Geometry(f[10], f[11], f[12]),
                  creator_app=f[5], unique_id=f[15])
