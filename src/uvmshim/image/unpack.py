"""Read one layer tar, stream by stream, into an :class:`~uvmshim.image.ext4.Ext4Writer`.

This runs in a worker thread, in one pass: file data goes from the decompressed chunks of the
tar straight into the layer image (the writer takes views of them, no copy), and the tree,
modes, owners, xattrs, link targets and nanosecond mtimes are kept in memory until the writer
lays out the filesystem.
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
import fcntl
import hashlib
import itertools
import os
import queue
import stat
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote

from isal import igzip_lib

from uvmshim import tools
from uvmshim.errors import ToolError
from uvmshim.image.ext4 import MAX_LINKS, Ext4Error, Ext4Writer, Node, check_xattr, new_dir
from uvmshim.image.layout import ImageError, new_hash
from uvmshim.image.tarstream import ChunkStream, Entry, Pump, TarFormatError, TarReader

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: The blob is read, and decompressed, this many bytes at a time. Few, large calls: each
#: one lets go of the GIL and has to win it back from the thread parsing the tar, which on
#: 2 CPUs made the 512 KiB reads of a gzip reader the import's bottleneck (measured on the
#: Debian layer: 2 MiB imports ~8 % faster than 512 KiB; 4 and 8 MiB are no better).
_READ_CHUNK = 2 << 20
#: The most bytes one decompression call may produce: 2 MiB of a gzip bomb inflate to 2 GiB.
_OUT_MAX = 8 << 20


class Stopped(Exception):
    """Raised inside the worker when the import was cancelled."""


@dataclass
class UnpackResult:
    diff_id: str
    tar_bytes: int
    entries: int


class _Counter:
    """Counts the bytes that pass."""

    def __init__(self) -> None:
        self.count = 0


def _blob_chunks(blob: IO[bytes], stop: threading.Event, counter: _Counter,
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The bytes of ``blob``, in chunks of up to :data:`_READ_CHUNK`, counted and reported.

    :raises Stopped: ``stop`` was set.
    """
    while True:
        if stop.is_set():
            raise Stopped
        chunk = blob.read(_READ_CHUNK)
        if not chunk:
            return
        counter.count += len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
        yield chunk


def _hashed(chunks: Iterable[bytes], h: _HashThread | hashlib._Hash | None) -> Iterator[bytes]:
    """``chunks``, each handed to ``h`` on its way."""
    for chunk in chunks:
        if h is not None:
            h.update(chunk)
        yield chunk


class _HashThread:
    """Hashes chunks in a thread of its own, so that the decompressing thread does not wait
    for it (hashlib releases the GIL on large chunks: the two run on two CPUs).

    The chunks handed to :meth:`update` must not change afterwards.
    """

    def __init__(self, h: hashlib._Hash, depth: int = 8) -> None:
        self.h = h
        #: Bytes handed over so far.
        self.count = 0
        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, daemon=True, name="layer-hash")
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self.h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.count += len(chunk)
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


def _unzstd(chunks: Iterable[bytes], where: str) -> Generator[bytes, None, None]:
    """Decompress zstd through the ``zstd`` program (Python 3.11 has no zstd module).

    A feeder thread copies ``chunks`` into the child; this generator yields its stdout. Closing
    the generator (or an error) kills the child if it still runs: it is never left behind.
    """
    try:
        proc = tools.start(["zstd", "-dcq"], stdin=tools.PIPE, stdout=tools.PIPE,
                           stderr=tools.PIPE)
    except ToolError:
        raise ImageError("a zstd-compressed layer needs the zstd program", where=where,
                         hint="install it (Debian: apt-get install zstd)") from None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None and stdout is not None and stderr is not None  # all pipes
    with contextlib.suppress(OSError):  # reads of up to 1 MiB, not 64 KiB (best effort)
        fcntl.fcntl(stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    feed_error: list[BaseException] = []

    def feed() -> None:
        try:
            for chunk in chunks:
                stdin.write(chunk)
        except BaseException as e:  # handed to the reading side
            feed_error.append(e)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    feeder = threading.Thread(target=feed, daemon=True, name="layer-zstd-feed")
    feeder.start()
    try:
        while data := os.read(stdout.fileno(), _READ_CHUNK):
            yield data
        feeder.join()
        rc = proc.wait()
        if feed_error and isinstance(feed_error[0], Stopped):
            raise Stopped
        if rc != 0 or feed_error:
            err = stderr.read().decode(errors="replace").strip()
            raise _ZstdError(err or (str(feed_error[0]) if feed_error else f"zstd exit {rc}"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stdout.close()
        stderr.close()
        feeder.join()


def _gunzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream with ISA-L: its members one after the other, skipping zero
    padding after a member (as ``gzip -d`` does), at most :data:`_OUT_MAX` bytes at a time.

    ``IgzipDecompressor``, not ``decompressobj``: the latter grows its output as it goes and
    takes the GIL back at each step, each time waiting for the parsing thread to let go of it
    (measured next to a busy Python thread: 2 MiB chunks of the Debian layer inflate in 372 ms
    with ``decompressobj``, 240 ms with this; 233 and 203 ms alone).

    :raises EOFError: the stream ends inside a member.
    :raises _IsalError: corrupt data, a wrong checksum or length, or trailing bytes that are
        neither zeros nor a member.
    """
    d: igzip_lib.IgzipDecompressor | None = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP)
    for chunk in chunks:
        data = chunk
        while True:
            if d is None:  # between members
                data = data.lstrip(b"\0")
                if not data:
                    break
                d = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP)
            if out := d.decompress(data, _OUT_MAX):
                yield out
            data = b""
            if d.eof:
                data, d = d.unused_data, None
            elif d.needs_input:
                break
    if d is not None:
        raise EOFError("compressed stream ended before its end-of-stream marker")


#: What a corrupt or truncated stream raises.
#: ISA-L's error class (its type stubs call it an instance).
_IsalError: type[Exception] = igzip_lib.IsalError  # type: ignore[assignment]
_CORRUPT: tuple[type[Exception], ...] = (TarFormatError, EOFError, _ZstdError, _IsalError)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompressed(chunks: Iterator[bytes], where: str) -> Generator[bytes, None, None]:
    """``chunks`` decompressed, the compression told by magic bytes (gzip, zstd or none)."""
    first = next(chunks, b"")
    stream = itertools.chain((first,), chunks)
    if first.startswith(_GZIP_MAGIC):
        yield from _gunzip(stream)
    elif first[:4] == _ZSTD_MAGIC:
        yield from _unzstd(stream, where)
    else:
        yield from stream


def _check_blob(count: int, blob_hash: hashlib._Hash | None, digest: str | None,
                size: int | None, where: str) -> None:
    """Raise ImageError unless the blob (``count`` bytes, hashed into ``blob_hash``) matches
    ``digest`` and ``size`` (each when given)."""
    if blob_hash is not None and digest is not None:
        got_blob = f"{digest.split(':', 1)[0]}:{blob_hash.hexdigest()}"
        if got_blob != digest:
            raise ImageError(f"layer blob does not match its digest (got {got_blob})",
                             where=where)
    if size is not None and count != size:
        raise ImageError(f"layer blob has {count} bytes, its descriptor says {size}",
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
    gzip (ISA-L), zstd (the ``zstd`` program, as Python 3.11 has no zstd) or none. One
    thread reads the blob in large chunks and computes its digest, another decompresses them,
    a third computes the diff id (all of which let go of the GIL); this thread parses headers
    and hands the file data, as it is, to the writer (which writes it in a thread of its own).

    :param digest: the blob's digest (of the compressed bytes), if known.
    :param diff_id: the digest of the uncompressed tar, from the image config.
    :raises ImageError: a corrupt or truncated stream, a bad entry, or a digest mismatch.
    :raises Stopped: ``stop`` was set.
    """
    # An uncompressed blob's digest is its diff id: hash those bytes once, not twice.
    blob_hash = new_hash(digest) if digest is not None and digest != diff_id else None
    diff_hash = new_hash(diff_id)
    diff_hasher = _HashThread(diff_hash)
    read = _Counter()
    # The blob is read, and its digest computed, a few chunks ahead by a thread of its own:
    # the decompressing thread never waits for a read (nor for the GIL after one).
    ahead = Pump(_hashed(_blob_chunks(blob, stop, read, on_bytes), blob_hash), 4, "layer-read")
    stream = ChunkStream(_hashed(_decompressed(iter(ahead), where), diff_hasher))
    reader = TarReader(stream)
    builder = Builder(writer, reader, where)
    name = b""
    try:
        while (entry := reader.next()) is not None:
            name = entry.name
            builder.add(entry)
        # The digests cover the whole blob, including what follows the end-of-archive marker.
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
        ahead.close()
        diff_hasher.close()
    _check_blob(read.count, blob_hash, digest, size, where)
    _check_diff_id(diff_hash, diff_id, where)
    return UnpackResult(diff_id=diff_id, tar_bytes=diff_hasher.count, entries=builder.entries)


def verify_blob(blob: IO[bytes], *, where: str, diff_id: str, digest: str | None,
                size: int | None, check_diff_id: bool) -> None:
    """Check a layer blob against its descriptor without unpacking it.

    The blob's bytes must hash to ``digest`` and count ``size`` (when given); with
    ``check_diff_id`` the decompressed stream must also hash to ``diff_id``. Used for a layer
    already in the store, whose disk is reused: the manifest must still describe this blob.

    :raises ImageError: a mismatch, or a corrupt or truncated stream.
    """
    blob_hash = new_hash(digest) if digest is not None and digest != diff_id else None
    read = _Counter()
    chunks = _hashed(_blob_chunks(blob, threading.Event(), read), blob_hash)
    if check_diff_id or digest == diff_id:
        diff_hash = new_hash(diff_id)
        tar = _decompressed(chunks, where)
        try:
            for chunk in tar:
                diff_hash.update(chunk)
        except _CORRUPT as e:
            raise ImageError(f"corrupt or truncated layer: {e}", where=where) from None
        finally:
            tar.close()
        _check_diff_id(diff_hash, diff_id, where)
    else:
        for _ in chunks:
            pass
    _check_blob(read.count, blob_hash, digest, size, where)
