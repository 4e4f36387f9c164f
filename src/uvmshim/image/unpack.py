"""Read one layer tar, stream by stream, into an :class:`~uvmshim.image.ext4.Ext4Writer`.

This runs in a worker thread, in one pass: file data is copied from the (decompressed) tar
straight into the layer image in large blocks, and the tree, modes, owners, xattrs, link
targets and nanosecond mtimes are kept in memory until the writer lays out the filesystem.
Nothing is written to the host by name, so no entry can reach outside the image. OCI whiteouts
become overlay whiteouts: ``.wh.NAME`` → a 0/0 character device ``NAME``; ``.wh..wh..opq`` →
``trusted.overlay.opaque=y`` on the directory.

Safety: the same rules as a careful unpacker, checked in the in-memory tree. Each name is split
into components that may not be ``..`` or absolute; every parent must be a directory of this
layer (an entry *through* a symlink is refused), a hard link must name an earlier non-directory
entry of this layer, and a relative symlink may not climb above the layer root. Absolute
symlink targets are kept: the kernel resolves them inside the container's root.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import hashlib
import io
import queue
import stat
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote

from uvmshim import tools
from uvmshim.errors import ToolError
from uvmshim.image.ext4 import MAX_LINKS, Ext4Error, Ext4Writer, Node, check_xattr, new_dir
from uvmshim.image.layout import ImageError, new_hash
from uvmshim.image.tarstream import ChunkStream, Entry, TarFormatError, TarReader


def _gzip_reader(f: IO[bytes]) -> IO[bytes]:
    """A gzip decompressing reader: ISA-L's (2-3x as fast as zlib) if installed."""
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a dependency; stay correct without it
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return igzip.IGzipFile(fileobj=f, mode="rb")  # type: ignore[no-untyped-call,return-value]


def _gzip_errors() -> tuple[type[Exception], ...]:
    try:
        from isal import igzip_lib
    except ImportError:  # pragma: no cover
        return ()
    err = getattr(igzip_lib, "IsalError", None)
    return (err,) if isinstance(err, type) and issubclass(err, Exception) else ()


WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY_CHUNK = 1 << 20


class Stopped(Exception):
    """Raised inside the worker when the import was cancelled."""


@dataclass
class UnpackResult:
    diff_id: str
    tar_bytes: int
    entries: int


class _Tap(io.RawIOBase):
    """A reader that hashes and counts what passes through, and stops on request."""

    def __init__(self, f: IO[bytes] | gzip.GzipFile, h: hashlib._Hash | _HashThread | None,
                 stop: threading.Event, on_bytes: Callable[[int], None] | None = None) -> None:
        self._f = f
        self._h = h
        self._stop = stop
        self._on_bytes = on_bytes
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._stop.is_set():
            raise Stopped
        n = self._f.readinto(b)  # type: ignore[union-attr]
        if not n:
            return 0
        if isinstance(self._h, _HashThread):
            self._h.update(memoryview(bytes(b[:n])))  # a copy: the caller reuses ``b``
        elif self._h is not None:
            self._h.update(b[:n] if n < len(b) else b)
        self.count += n
        if self._on_bytes is not None:
            self._on_bytes(n)
        return n


class _HashThread:
    """Hashes chunks in a thread of its own, so that the decompressing thread does not wait
    for it (hashlib releases the GIL on large chunks: the two run on two CPUs).

    The chunks handed to :meth:`update` must not change afterwards.
    """

    def __init__(self, h: hashlib._Hash, depth: int = 32) -> None:
        self.h = h
        self._q: queue.Queue[memoryview | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, daemon=True, name="layer-hash")
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self.h.update(chunk)

    def update(self, chunk: memoryview) -> None:
        self._q.put(chunk)

    def close(self) -> hashlib._Hash:
        """Wait until every chunk is hashed; return the hash."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        return self.h


def _clean(name: bytes, where: str) -> list[bytes]:
    """The path components of a tar entry name; refuses absolute names and ``..``."""
    if name.startswith(b"/"):
        raise ImageError("absolute path in layer", where=f"{where}: {_text(name)}")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ImageError("'..' in layer path", where=f"{where}: {_text(name)}")
    return parts


def _text(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _drop(node: Node) -> None:
    """``node`` lost a name: so do its descendants, if it is a directory."""
    node.links -= 1
    if node.children is not None:
        stack = [node]
        while stack:
            d = stack.pop()
            assert d.children is not None
            for c in d.children.values():
                if c.children is not None:
                    stack.append(c)
                else:
                    c.links -= 1


class Builder:
    """Applies tar entries, one by one, to the writer's in-memory tree."""

    def __init__(self, writer: Ext4Writer, reader: TarReader, where: str) -> None:
        self.writer = writer
        self.reader = reader
        self.root = writer.root
        self.where = where
        self.entries = 0

    def _err(self, msg: str, name: bytes) -> ImageError:
        return ImageError(msg, where=f"{self.where}: {_text(name)}")

    def _parent(self, parts: list[bytes], name: bytes, mtime_ns: int) -> Node:
        """Check that every parent of ``parts`` is a directory of this layer (made if
        missing, root-owned 0755, as tars may leave them out); return the last."""
        d = self.root
        for i, comp in enumerate(parts[:-1]):
            assert d.children is not None
            child = d.children.get(comp)
            if child is None:
                child = new_dir(mtime_ns=mtime_ns)
                child.links = 1
                d.children[comp] = child
            elif child.children is None:
                rel = _text(b"/".join(parts[:i + 1]))
                if stat.S_ISLNK(child.mode):
                    raise self._err(f"entry is written through the symlink /{rel}", name)
                raise self._err(f"parent /{rel} is not a directory", name)
            d = child
        return d

    def add(self, e: Entry) -> None:
        """Apply one entry."""
        self.entries += 1
        parts = _clean(e.name, self.where)
        if not parts:
            self._root_entry(e)
            return
        base = parts[-1]
        parent = self._parent(parts, e.name, e.mtime_ns)
        assert parent.children is not None
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, e)
            return
        if len(base) > 255:
            raise self._err("name longer than 255 bytes", e.name)
        old = parent.children.get(base)
        if e.isdir() and old is not None and old.children is not None:
            self._metadata(old, e)  # a directory named again: new metadata
            return
        if old is not None:
            del parent.children[base]
            _drop(old)
        if e.islnk():
            target = self._link_target(e)
            if target.links >= MAX_LINKS:
                raise self._err(f"more than {MAX_LINKS} hard links", e.name)
            target.links += 1
            parent.children[base] = target  # a hard link shares its target's inode
            return
        node = Node(0)
        if e.isdir():
            node = new_dir()
        elif e.isreg():
            node.mode = stat.S_IFREG
            self.writer.add_data(node, e.size, self.reader.data)
        elif e.issym():
            self._check_symlink(parts, e)
            node.mode = stat.S_IFLNK | 0o777
            node.target = e.linkname
            if len(node.target) >= 4096:
                raise self._err("symlink target longer than 4095 bytes", e.name)
        elif e.ischr() or e.isblk():
            node.mode = stat.S_IFCHR if e.ischr() else stat.S_IFBLK
            node.rdev = (e.devmajor, e.devminor)
            if not (0 <= e.devmajor < 1 << 12 and 0 <= e.devminor < 1 << 20):
                raise self._err("device number out of range", e.name)
        elif e.isfifo():
            node.mode = stat.S_IFIFO
        else:
            raise self._err(f"unsupported tar entry type {e.type!r}", e.name)
        node.links = 1
        self._metadata(node, e)
        parent.children[base] = node

    def _root_entry(self, e: Entry) -> None:
        if not e.isdir():
            raise self._err("the layer root is not a directory", e.name)
        self._metadata(self.root, e)

    def _whiteout(self, parent: Node, base: bytes, e: Entry) -> None:
        assert parent.children is not None
        if base == OPAQUE_MARKER:
            if parent.xattrs is None:
                parent.xattrs = {}
            parent.xattrs[OPAQUE_XATTR] = b"y"
            return
        if base.startswith(OPAQUE_MARKER[:8]):
            return  # other ".wh..wh." names are aufs bookkeeping (.wh..wh.plnk, ...): no meaning
        target = base[len(WHITEOUT_PREFIX):]
        if target in (b"", b".", b".."):
            raise self._err("bad whiteout name", e.name)
        old = parent.children.pop(target, None)
        if old is not None:
            _drop(old)
        # The overlay whiteout: a character device 0/0, mode 0, owned by root.
        parent.children[target] = Node(stat.S_IFCHR, mtime_ns=e.mtime_ns, links=1)

    def _check_symlink(self, parts: list[bytes], e: Entry) -> None:
        target = e.linkname
        if not target:
            raise self._err("symlink with an empty target", e.name)
        if b"\0" in target:
            raise self._err("symlink target holds a NUL byte", e.name)
        if target.startswith(b"/"):
            return
        depth = len(parts) - 1
        for comp in target.split(b"/"):
            if comp == b"..":
                depth -= 1
                if depth < 0:
                    raise self._err(f"symlink points out of the layer root: {_text(target)}",
                                    e.name)
            elif comp not in (b"", b"."):
                depth += 1

    def _link_target(self, e: Entry) -> Node:
        parts = _clean(e.linkname, self.where)
        if not parts:
            raise self._err("hard link to the layer root", e.name)
        parent = self._parent(parts, e.name, 0)
        assert parent.children is not None
        node = parent.children.get(parts[-1])
        link = _text(e.linkname)
        if node is None:
            raise self._err(f"hard link to {link}, which is not in this layer", e.name)
        if node.children is not None:
            raise self._err(f"hard link to the directory {link}", e.name)
        return node

    def _metadata(self, node: Node, e: Entry) -> None:
        if not (0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32):
            raise self._err("uid or gid out of range", e.name)
        node.uid, node.gid = e.uid, e.gid
        if not stat.S_ISLNK(node.mode):
            node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
        node.mtime_ns = e.mtime_ns
        if not e.pax:
            return
        plain = stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)
        for key, value in _xattrs(e.pax):
            # Linux keeps user.* xattrs to files and directories: nothing else can show them.
            if key.startswith("user.") and not plain:
                continue
            try:
                check_xattr(key, value)
            except Ext4Error as err:
                raise self._err(str(err), e.name) from None
            if node.xattrs is None:
                node.xattrs = {}
            node.xattrs[key] = value


def _xattrs(pax: dict[bytes, bytes]) -> list[tuple[str, bytes]]:
    """The xattrs a PAX header carries, minus ``trusted.overlay.*`` and SELinux labels.

    Overlay's own xattrs are ours to set (from whiteouts); taken from a tar they could forge
    redirects or metacopy on the read-only layer.
    """
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith(b"LIBARCHIVE.xattr."):
            name = unquote(_text(key[len(b"LIBARCHIVE.xattr."):]))
            try:
                out.setdefault(name, base64.b64decode(value + b"=" * (-len(value) % 4)))
            except ValueError:
                continue
        elif key.startswith(b"SCHILY.xattr."):
            out[_text(key[len(b"SCHILY.xattr."):])] = value
    # security.selinux labels belong to the host policy that made them, and the guest does not
    # enforce SELinux.
    return [(k, v) for k, v in out.items()
            if not k.startswith("trusted.overlay.") and k != "security.selinux"]


class _ZstdError(Exception):
    """``zstd -d`` failed: corrupt or truncated input."""


class _Zstd(io.RawIOBase):
    """Decompresses zstd through the ``zstd`` program (Python 3.11 has no zstd module).

    A feeder thread copies the compressed stream into the child; we read its stdout. Closing
    kills the child if it is still running, so an error or a cancel never leaves it behind.
    """

    def __init__(self, src: IO[bytes], where: str) -> None:
        try:
            self._proc = tools.start(["zstd", "-dcq"], stdin=tools.PIPE, stdout=tools.PIPE,
                                   stderr=tools.PIPE)
        except ToolError:
            raise ImageError("a zstd-compressed layer needs the zstd program", where=where,
                             hint="install it (Debian: apt-get install zstd)") from None
        stdin, stdout = self._proc.stdin, self._proc.stdout
        if stdin is None or stdout is None:  # not reached: both are pipes
            self._proc.kill()
            self._proc.wait()
            raise ImageError("zstd was started without pipes", where=where)
        self._stdin, self._stdout = stdin, stdout
        self._feed_error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, args=(src,), daemon=True)
        self._feeder.start()

    def _feed(self, src: IO[bytes]) -> None:
        stdin = self._stdin
        try:
            while chunk := src.read(_COPY_CHUNK):
                stdin.write(chunk)
        except BaseException as e:  # handed to the reading thread
            self._feed_error = e
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        out = self._stdout
        data = out.read1(len(b)) if hasattr(out, "read1") else out.read(len(b))
        n = len(data)
        b[:n] = data
        if n == 0:
            self._feeder.join()
            rc = self._proc.wait()
            if isinstance(self._feed_error, Stopped):
                raise Stopped
            if rc != 0 or self._feed_error is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr \
                    else ""
                raise _ZstdError(err.strip() or str(self._feed_error) or f"zstd exit {rc}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for f in (self._proc.stdout, self._proc.stderr):
            if f is not None:
                f.close()
        self._feeder.join()
        super().close()


#: What a corrupt or truncated stream raises.
_CORRUPT: tuple[type[Exception], ...] = (TarFormatError, EOFError, zlib.error,
                                         gzip.BadGzipFile, _ZstdError, *_gzip_errors())
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompressed(counted: io.BufferedReader[_Tap], where: str) -> IO[bytes]:
    """``counted``'s bytes decompressed, the compression told by magic bytes (gzip, zstd or
    none)."""
    magic = counted.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        return _gzip_reader(counted)
    if magic == _ZSTD_MAGIC:
        return io.BufferedReader(_Zstd(counted, where), _COPY_CHUNK)
    return counted


def _check_blob(raw: _Tap, blob_hash: hashlib._Hash | None, digest: str | None,
                size: int | None, where: str) -> None:
    """Raise ImageError unless the blob read through ``raw`` matches ``digest`` and ``size``
    (each when given)."""
    if blob_hash is not None and digest is not None:
        got_blob = f"{digest.split(':', 1)[0]}:{blob_hash.hexdigest()}"
        if got_blob != digest:
            raise ImageError(f"layer blob does not match its digest (got {got_blob})",
                             where=where)
    if size is not None and raw.count != size:
        raise ImageError(f"layer blob has {raw.count} bytes, its descriptor says {size}",
                         where=where)


def _check_diff_id(diff_hash: hashlib._Hash, diff_id: str, where: str) -> None:
    """Raise ImageError unless the uncompressed stream hashed to ``diff_id``."""
    got = f"{diff_id.split(':', 1)[0]}:{diff_hash.hexdigest()}"
    if got != diff_id:
        raise ImageError(f"uncompressed layer does not match its diff id {diff_id} "
                         f"(got {got})", where=where)


def unpack_layer(blob: IO[bytes], writer: Ext4Writer, *, where: str, diff_id: str,
                 digest: str | None, size: int | None, stop: threading.Event,
                 on_bytes: Callable[[int], None] | None = None) -> UnpackResult:
    """Read a layer tar into ``writer``'s tree and image, verifying its digests.

    The compression is told by magic bytes, not media type (docker-archives say nothing):
    gzip (ISA-L's ``igzip`` when installed, else Python's zlib), zstd (the ``zstd`` program, as
    Python 3.11 has no zstd) or none. Reading and decompressing run in a thread of their own,
    and for a compressed blob each digest in another (they release the GIL); this thread parses
    headers and fills the writer's buffers (which the writer writes in a thread of its own).

    :param digest: the blob's digest (of the compressed bytes), if known.
    :param diff_id: the digest of the uncompressed tar, from the image config.
    :raises ImageError: a corrupt or truncated stream, a bad entry, or a digest mismatch.
    :raises Stopped: ``stop`` was set.
    """
    # An uncompressed blob's digest is its diff id: hash those bytes once, not twice.
    blob_hash = new_hash(digest) if digest is not None and digest != diff_id else None
    # The blob's digest is computed in a thread of its own, off the decompressing thread.
    blob_hasher = _HashThread(blob_hash) if blob_hash is not None else None
    raw = _Tap(blob, blob_hasher, stop, on_bytes)
    counted = io.BufferedReader(raw, _COPY_CHUNK)
    try:
        decomp = _decompressed(counted, where)
    except BaseException:
        if blob_hasher is not None:
            blob_hasher.close()
        raise
    diff_hash = new_hash(diff_id)
    # Decompressing, the diff id is computed in a thread of its own too (the stream's chunks
    # are fresh buffers, never written again: they are hashed as they are); reading a plain
    # tar costs little, and the thread would only add work.
    hasher = _HashThread(diff_hash) if decomp is not counted else None
    tar_tap = _Tap(decomp, diff_hash if hasher is None else None, stop)

    def produce(buf: memoryview) -> int:
        n = tar_tap.readinto(buf)
        if n and hasher is not None:
            hasher.update(buf[:n])
        elif not n:  # the blob digest covers every compressed byte, after the tar's end too
            while counted.read(_COPY_CHUNK):
                pass
        return n

    stream = ChunkStream(produce)
    reader = TarReader(stream)
    builder = Builder(writer, reader, where)
    name = b""
    try:
        while (entry := reader.next()) is not None:
            name = entry.name
            builder.add(entry)
        # The diff id covers the whole stream, including padding after the end-of-archive
        # marker.
        stream.drain()
    except _CORRUPT as e:
        at = f"{where}: after {_text(name)}" if name else where
        raise ImageError(f"corrupt or truncated layer: {e}", where=at) from None
    except Ext4Error as e:
        raise ImageError(str(e), where=f"{where}: {_text(name)}") from None
    except Stopped:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ImageError("no space left on device while importing", where=where,
                             hint="free disk space under the image store") from None
        raise ImageError(f"cannot import: {e}", where=f"{where}: {_text(name)}") from None
    finally:
        stream.close()
        if hasher is not None:
            hasher.close()
        if blob_hasher is not None:
            blob_hasher.close()
        decomp.close()
    _check_blob(raw, blob_hash, digest, size, where)
    _check_diff_id(diff_hash, diff_id, where)
    return UnpackResult(diff_id=diff_id, tar_bytes=tar_tap.count, entries=builder.entries)


def verify_blob(blob: IO[bytes], *, where: str, diff_id: str, digest: str | None,
                size: int | None, check_diff_id: bool) -> None:
    """Check a layer blob against its descriptor without unpacking it.

    The blob's bytes must hash to ``digest`` and count ``size`` (when given); with
    ``check_diff_id`` the decompressed stream must also hash to ``diff_id``. Used for a layer
    already in the store, whose disk is reused: the manifest must still describe this blob.

    :raises ImageError: a mismatch, or a corrupt or truncated stream.
    """
    blob_hash = new_hash(digest) if digest is not None and digest != diff_id else None
    raw = _Tap(blob, blob_hash, threading.Event())
    counted = io.BufferedReader(raw, _COPY_CHUNK)
    uncompressed = digest == diff_id
    if check_diff_id or uncompressed:
        decomp = _decompressed(counted, where)
        diff_hash = new_hash(diff_id)
        tap = _Tap(decomp, diff_hash, threading.Event())
        buf = bytearray(_COPY_CHUNK)
        try:
            while tap.readinto(buf):
                pass
            while counted.read(_COPY_CHUNK):  # bytes after the compressed stream count too
                pass
        except _CORRUPT as e:
            raise ImageError(f"corrupt or truncated layer: {e}", where=where) from None
        finally:
            decomp.close()
        _check_diff_id(diff_hash, diff_id, where)
    else:
        while counted.read(_COPY_CHUNK):
            pass
    _check_blob(raw, blob_hash, digest, size, where)
