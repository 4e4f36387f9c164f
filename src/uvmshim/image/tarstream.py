"""A lean, forward-only tar reader for layer streams: headers in, file data out in bulk.

Why not :mod:`tarfile`: importing a layer is bound by per-entry work, and ``tarfile`` spends
most of an entry's time decoding header fields the importer then encodes back to bytes. This
reader keeps names as bytes (what ext4 stores), parses only the fields a layer uses, and hands
file data to the caller, who copies it straight into the layer image.

Formats: ustar (with its name prefix), GNU (``L``/``K`` long names, base-256 numbers) and PAX
(``x`` per entry, ``g`` global; ``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``
with nanoseconds, and xattr records). Sparse files (GNU ``S``, PAX ``GNU.sparse.*``) are
refused: image builders do not write them.

The input is a :class:`ChunkStream`: chunks of the decompressed tar that a producer thread
(reading and decompression, which release the GIL) hands over through a bounded queue.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

BLOCKSIZE = 512
_ZERO_BLOCK = bytes(BLOCKSIZE)


class TarFormatError(Exception):
    """The stream is not a well-formed tar (or ends early)."""


@dataclass(slots=True)
class Entry:
    """One tar member. ``type`` is the typeflag byte (``b"0"`` regular, ``b"5"`` directory...)."""

    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    pax: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.name.decode("utf-8", "surrogateescape")

    def isreg(self) -> bool:
        return self.type in (b"0", b"\0", b"7")

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"

    def isfifo(self) -> bool:
        return self.type == b"6"


_STOP = object()


class ChunkStream:
    """The consumer side of a producer thread that iterates ``chunks`` (buffers that are never
    written again once handed over). The iteration runs in a thread of its own; its exceptions
    are raised again in the consumer. :meth:`close` stops it, and closes ``chunks`` (a
    generator's clean-up runs).
    """

    def __init__(self, chunks: Iterable[bytes | memoryview], depth: int = 8) -> None:
        self._q: queue.Queue[object] = queue.Queue(depth)
        self._closed = threading.Event()
        self._chunk = b""
        self._view = memoryview(self._chunk)
        self._off = 0
        self._eof = False
        self.pos = 0
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True,
                                        name="layer-reader")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, chunks: Iterable[bytes | memoryview]) -> None:
        it = iter(chunks)
        try:
            for chunk in it:
                if chunk and not self._put(memoryview(chunk)):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._put(_STOP)

    def _next(self) -> bool:
        if self._eof:
            return False
        item = self._q.get()
        if item is _STOP:
            self._eof = True
            return False
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        assert isinstance(item, memoryview)
        self._view = item
        self._off = 0
        return True

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer at the end of the stream."""
        if len(self._view) - self._off >= n:
            out = bytes(self._view[self._off:self._off + n])
            self._off += n
            self.pos += n
            return out
        parts = []
        got = 0
        while got < n:
            if self._off == len(self._view) and not self._next():
                break
            take = min(n - got, len(self._view) - self._off)
            parts.append(bytes(self._view[self._off:self._off + take]))
            self._off += take
            got += take
        self.pos += got
        return b"".join(parts)

    def take(self, n: int) -> list[memoryview]:
        """The next ``n`` bytes as views of the stream's chunks (no copy: chunks are never
        written again once handed over).

        :raises TarFormatError: the stream ended first.
        """
        views = []
        while n:
            if self._off == len(self._view) and not self._next():
                raise TarFormatError("unexpected end of data")
            take = min(n, len(self._view) - self._off)
            views.append(self._view[self._off:self._off + take])
            self._off += take
            self.pos += take
            n -= take
        return views

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes (fewer at the end); return how many were skipped."""
        got = 0
        while got < n:
            if self._off == len(self._view) and not self._next():
                break
            take = min(n - got, len(self._view) - self._off)
            self._off += take
            got += take
        self.pos += got
        return got

    def drain(self) -> None:
        """Read to the end of the stream."""
        while self._next():
            self.pos += len(self._view)
            self._off = len(self._view)

    def close(self) -> None:
        """Stop the producer and wait for it."""
        self._closed.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


def _num(field_: bytes, what: str) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            value -= 1 << (8 * (len(field_) - 1))
        return value
    s = field_.split(b"\0", 1)[0].strip()
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise TarFormatError(f"bad number in the {what} field: {s!r}") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise TarFormatError("malformed PAX header")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise TarFormatError("malformed PAX header") from None
        rec = data[sp + 1:pos + length]
        if length <= sp - pos or not rec.endswith(b"\n") or b"=" not in rec:
            raise TarFormatError("malformed PAX header")
        key, _, value = rec[:-1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _pax_int(value: bytes, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TarFormatError(f"bad PAX {what}: {value!r}") from None


_PAX_TIME = re.compile(rb"(-?)([0-9]{1,20})(?:\.([0-9]+))?")


def _pax_time(value: bytes) -> int:
    m = _PAX_TIME.fullmatch(value)
    if m is not None:  # the usual form, without Decimal's cost (one per entry)
        sign, sec, frac = m.groups()
        ns = int(sec) * 1_000_000_000 + (int(frac[:9].ljust(9, b"0")) if frac else 0)
        return -ns if sign else ns
    try:
        return int(Decimal(value.decode("ascii")) * 1_000_000_000)
    except (InvalidOperation, UnicodeDecodeError, ValueError):
        raise TarFormatError(f"bad PAX mtime: {value!r}") from None


def _checksum_ok(hdr: bytes, stored: int) -> bool:
    unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 32
    if unsigned == stored:
        return True
    signed = unsigned - 2 * (sum(b for b in hdr[:148] if b > 127)
                             + sum(b for b in hdr[156:] if b > 127))
    return signed == stored


class TarReader:
    """Iterates the entries of the tar in ``stream``. After an entry is returned, the caller
    reads its data (``entry.size`` bytes, regular files only) with :meth:`data` or leaves it;
    the next :meth:`next` skips what is left, and the padding."""

    def __init__(self, stream: ChunkStream) -> None:
        self.stream = stream
        self._global: dict[bytes, bytes] = {}
        self._data_left = 0
        self._pad = 0

    def data(self, n: int) -> list[memoryview]:
        """The next ``n`` bytes of the current entry's data, as views (see
        :meth:`ChunkStream.take`)."""
        if n > self._data_left:
            raise TarFormatError("read past the end of an entry")
        self._data_left -= n
        return self.stream.take(n)

    def _skip_data(self) -> None:
        n = self._data_left + self._pad
        if n and self.stream.skip(n) != n:
            raise TarFormatError("unexpected end of data")
        self._data_left = self._pad = 0

    def _block(self) -> bytes | None:
        hdr = self.stream.read(BLOCKSIZE)
        if not hdr:
            return None
        if len(hdr) < BLOCKSIZE:
            raise TarFormatError("unexpected end of data in a header")
        return hdr

    def _payload(self, size: int) -> bytes:
        data = self.stream.read(size)
        padded = -size % BLOCKSIZE
        if len(data) < size or self.stream.skip(padded) != padded:
            raise TarFormatError("unexpected end of data")
        return data

    def next(self) -> Entry | None:
        """The next entry, or ``None`` at the end-of-archive mark (or the end of the stream)."""
        self._skip_data()
        pax: dict[bytes, bytes] = {}
        longname = longlink = None
        typ = b""
        while True:
            hdr = self._block()
            if hdr is None or hdr == _ZERO_BLOCK:
                return None
            if not _checksum_ok(hdr, _num(hdr[148:156], "checksum")):
                raise TarFormatError("bad header checksum")
            typ = hdr[156:157]
            size = _num(hdr[124:136], "size")
            if size < 0:
                raise TarFormatError("negative size")
            if typ in (b"x", b"g"):
                if size > 64 << 20:
                    raise TarFormatError("PAX header too large")
                recs = _pax_records(self._payload(size))
                (pax if typ == b"x" else self._global).update(recs)
                continue
            if typ in (b"L", b"K"):
                if size > 1 << 20:
                    raise TarFormatError("GNU long name too large")
                value = self._payload(size).split(b"\0", 1)[0]
                if typ == b"L":
                    longname = value
                else:
                    longlink = value
                continue
            break
        if typ == b"S" or any(k.startswith(b"GNU.sparse.") for k in pax):
            raise TarFormatError("sparse files are not supported in layers")
        if self._global:
            pax = {**self._global, **pax}
        name = hdr[0:100].split(b"\0", 1)[0]
        if hdr[257:263] == b"ustar\0":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if longname is not None:
            name = longname
        if b"path" in pax:
            name = pax[b"path"]
        linkname = hdr[157:257].split(b"\0", 1)[0]
        if longlink is not None:
            linkname = longlink
        if b"linkpath" in pax:
            linkname = pax[b"linkpath"]
        if typ == b"\0" and name.endswith(b"/"):
            typ = b"5"
        if typ == b"5":
            name = name.rstrip(b"/")
        if b"size" in pax:
            size = _pax_int(pax[b"size"], "size")
        uid = _pax_int(pax[b"uid"], "uid") if b"uid" in pax else _num(hdr[108:116], "uid")
        gid = _pax_int(pax[b"gid"], "gid") if b"gid" in pax else _num(hdr[116:124], "gid")
        mtime = (_pax_time(pax[b"mtime"]) if b"mtime" in pax
                 else _num(hdr[136:148], "mtime") * 1_000_000_000)
        device = typ in (b"3", b"4")  # the only entries whose device numbers mean anything
        entry = Entry(name=name, type=typ, mode=_num(hdr[100:108], "mode"), uid=uid, gid=gid,
                      size=size, mtime_ns=mtime, linkname=linkname,
                      devmajor=_num(hdr[329:337], "devmajor") if device else 0,
                      devminor=_num(hdr[337:345], "devminor") if device else 0, pax=pax)
        # Only regular files (and types we do not know, which are refused) carry data.
        if entry.isreg() or typ not in (b"1", b"2", b"3", b"4", b"5", b"6"):
            self._data_left = size
            self._pad = -size % BLOCKSIZE
        return entry
