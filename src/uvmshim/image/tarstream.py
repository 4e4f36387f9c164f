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
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Generic, TypeVar

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
T = TypeVar("T")


class Pump(Generic[T]):
    """Iterates ``items`` in a thread of its own, at most ``depth`` items ahead of the consumer
    (:meth:`next`, or iterating the pump); the iteration's exception is raised again in the
    consumer. :meth:`close` stops the thread and closes ``items`` (a generator's clean-up runs).
    """

    def __init__(self, items: Iterable[T], depth: int, name: str) -> None:
        self._q: queue.Queue[object] = queue.Queue(depth)
        self._closed = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True,
                                        name=name)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterable[T]) -> None:
        it = iter(items)
        try:
            for item in it:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._put(_STOP)

    def next(self) -> T | None:
        """The next item, or ``None`` at the end."""
        if self._done:
            return None
        item = self._q.get()
        if item is _STOP:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item  # type: ignore[return-value]

    def __iter__(self) -> Iterator[T]:
        while (item := self.next()) is not None:
            yield item

    def close(self) -> None:
        """Stop the thread and wait for it."""
        self._closed.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


class ChunkStream:
    """A byte stream read from ``chunks`` (buffers that are never written again once handed
    over), which a thread of its own iterates (see :class:`Pump`)."""

    def __init__(self, chunks: Iterable[bytes | memoryview], depth: int = 8) -> None:
        self._pump = Pump(chunks, depth, "layer-decompress")
        self._view = memoryview(b"")
        self._off = 0
        self.pos = 0

    def _next(self) -> bool:
        while (chunk := self._pump.next()) is not None:
            if chunk:
                self._view = memoryview(chunk)
                self._off = 0
                return True
        return False

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
        self._pump.close()


def _num(field_: bytes, what: str) -> int:
    try:  # the usual form: octal digits, then NULs or spaces
        return int(field_.rstrip(b"\0 "), 8)
    except ValueError:
        pass
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
    """The records (``LENGTH KEY=VALUE\\n``, LENGTH counting the whole record) of a PAX
    header; values may hold any byte, newlines too."""
    out: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end and data[pos]:
        sp = data.find(b" ", pos, pos + 21)
        try:
            if sp <= pos:
                raise ValueError
            length = int(data[pos:sp])
        except ValueError:
            raise TarFormatError("malformed PAX header") from None
        nxt = pos + length
        eq = data.find(b"=", sp + 1, nxt - 1)
        if length <= sp - pos or nxt > end or data[nxt - 1] != 0x0A or eq < 0:
            raise TarFormatError("malformed PAX header")
        out[data[sp + 1:eq]] = data[eq + 1:nxt - 1]
        pos = nxt
    return out


def _pax_int(value: bytes, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TarFormatError(f"bad PAX {what}: {value!r}") from None


_PAX_TIME_LIMIT = Decimal(1 << 40)


def _pax_time(value: bytes) -> int:
    """A PAX time (decimal seconds, with a fraction) in nanoseconds."""
    sec, _, frac = value.partition(b".")
    digits = sec[1:] if sec[:1] == b"-" else sec
    if digits.isdigit() and len(digits) <= 20 and (not frac or frac.isdigit()):
        ns = int(digits) * 1_000_000_000 + (int(frac[:9].ljust(9, b"0")) if frac else 0)
        return -ns if sec[:1] == b"-" else ns
    try:  # other forms Decimal reads (an exponent...), rare enough for its cost
        t = Decimal(value.decode("ascii"))
        if not t.is_finite():
            raise ValueError
        # Clamped first: "1e999999" would make a million-digit int, slowly (ext4 keeps
        # about 2**34 seconds either way of 1970 anyway).
        return int(min(max(t, -_PAX_TIME_LIMIT), _PAX_TIME_LIMIT) * 1_000_000_000)
    except (ArithmeticError, UnicodeDecodeError, ValueError):  # decimal's errors too
        raise TarFormatError(f"bad PAX mtime: {value!r}") from None


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` for a 512-byte block, ten times as fast: Adler-32's low half is 1 plus
    the byte sum modulo 65521, and 256 bytes sum to at most 65280, so each half is exact."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _checksum_ok(hdr: bytes, stored: int) -> bool:
    # The checksum field counts as 8 spaces.
    unsigned = _byte_sum(hdr) - sum(hdr[148:156]) + 8 * 32
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
        padded = size + -size % BLOCKSIZE
        data = self.stream.read(padded)
        if len(data) < padded:
            raise TarFormatError("unexpected end of data")
        return data[:size]

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
        if typ == b"S":
            raise TarFormatError("sparse files are not supported in layers")
        for key in pax:
            if key.startswith(b"GNU.sparse."):
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
