"""Unpack one layer tar into a staging directory, the way the overlay in the UVM must see it.

This runs as root in a worker thread. The staging tree is what ``mkfs.ext4 -d`` copies into the
layer disk, so everything the overlay needs is made real here: owners (``lchown``), modes
(``chmod`` *after* ``chown``, which clears setuid/setgid), device nodes, fifos, hard links,
xattrs (PAX ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``) and mtimes (directories last, since
creating children changes them). OCI whiteouts become overlay whiteouts: ``.wh.NAME`` → a 0/0
character device ``NAME``; ``.wh..wh..opq`` → ``trusted.overlay.opaque=y`` on the directory.

Safety: a tar entry never reaches the host by name. Each name is split into components that may
not be ``..`` or absolute; every parent is checked with ``lstat`` to be a real directory in the
stage (an entry written *through* a symlink is refused), files are opened ``O_NOFOLLOW``, a
hard link must name an earlier non-directory entry of this layer, and a relative symlink may not
climb above the layer root. Absolute symlink targets are kept: the kernel resolves them inside
the container's root, and we never follow them here.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from uvmshim import run
from uvmshim.errors import ToolError
from uvmshim.image.layout import ImageError, new_hash

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY_CHUNK = 1 << 20


class Stopped(Exception):
    """Raised inside the worker when the import was cancelled."""


@dataclass
class RootAttrs:
    """The layer root's own entry (``./``): ``mkfs.ext4 -d`` does not copy these."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int | None = None


@dataclass
class UnpackResult:
    diff_id: str
    tar_bytes: int
    entries: int
    root: RootAttrs = field(default_factory=RootAttrs)


class _Tap(io.RawIOBase):
    """A reader that hashes and counts what passes through, and stops on request."""

    def __init__(self, f: IO[bytes] | gzip.GzipFile, h: hashlib._Hash | None, stop: threading.Event,
                 on_bytes: Callable[[int], None] | None = None) -> None:
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
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        if self._h is not None:
            self._h.update(data)
        self.count += n
        if self._on_bytes is not None and n:
            self._on_bytes(n)
        return n


def _clean(name: str, where: str) -> list[str]:
    """The path components of a tar entry name; refuses absolute names and ``..``."""
    if name.startswith("/"):
        raise ImageError("absolute path in layer", where=f"{where}: {name}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError("'..' in layer path", where=f"{where}: {name}")
    return parts


class Stager:
    """Applies tar entries, one by one, to a staging directory."""

    def __init__(self, root: Path, where: str) -> None:
        self.root = root
        self.where = where
        self.root_attrs = RootAttrs()
        self._known_dirs: set[str] = {""}
        self._dir_times: dict[str, int] = {}
        self.entries = 0

    def _err(self, msg: str, name: str) -> ImageError:
        return ImageError(msg, where=f"{self.where}: {name}")

    def _parent(self, parts: list[str], name: str) -> str:
        """Make sure every parent of ``parts`` is a real directory; return the parent path."""
        rel = ""
        for comp in parts[:-1]:
            rel = f"{rel}/{comp}" if rel else comp
            if rel in self._known_dirs:
                continue
            full = os.path.join(self.root, rel)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                # Implicit parent (tars may omit directory entries): root-owned 0755.
                os.mkdir(full, 0o755)
                self._known_dirs.add(rel)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self._err(f"entry is written through the symlink /{rel}", name)
            if not stat.S_ISDIR(st.st_mode):
                raise self._err(f"parent /{rel} is not a directory", name)
            self._known_dirs.add(rel)
        return rel

    def _clear(self, rel: str, *, keep_dir: bool) -> bool:
        """Remove what is at ``rel`` (a later entry replaces an earlier one). True if a
        directory was kept."""
        full = os.path.join(self.root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(full)
            prefix = rel + "/"
            self._known_dirs = {d for d in self._known_dirs if d != rel
                                and not d.startswith(prefix)}
            self._dir_times = {d: t for d, t in self._dir_times.items()
                               if d != rel and not d.startswith(prefix)}
        else:
            os.unlink(full)
        return False

    def add(self, ti: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        """Apply one entry."""
        self.entries += 1
        parts = _clean(ti.name, self.where)
        if not parts:
            self._root_entry(ti)
            return
        base = parts[-1]
        parent = self._parent(parts, ti.name)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, ti)
            return
        rel = f"{parent}/{base}" if parent else base
        full = os.path.join(self.root, rel)
        kept_dir = self._clear(rel, keep_dir=ti.isdir())
        if ti.isdir():
            if not kept_dir:
                os.mkdir(full, 0o700)
            self._known_dirs.add(rel)
        elif ti.isreg():
            self._write_file(full, ti, tf)
        elif ti.issym():
            self._check_symlink(parent, ti)
            os.symlink(ti.linkname, full)
        elif ti.islnk():
            target = self._link_target(ti)
            os.link(target, full, follow_symlinks=False)
            return  # a hard link shares its target's inode and metadata
        elif ti.ischr() or ti.isblk():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(ti.devmajor, ti.devminor))
        elif ti.isfifo():
            os.mkfifo(full, 0o600)
        else:
            raise self._err(f"unsupported tar entry type {ti.type!r}", ti.name)
        self._metadata(full, rel, ti)

    def _root_entry(self, ti: tarfile.TarInfo) -> None:
        if not ti.isdir():
            raise self._err("the layer root is not a directory", ti.name)
        self.root_attrs = RootAttrs(mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid,
                                    mtime=int(ti.mtime))
        # mkfs.ext4 -d does copy the root's xattrs (an opaque root, for one).
        for key, value in _xattrs(ti):
            os.setxattr(self.root, key, value)

    def _whiteout(self, parent: str, base: str, ti: tarfile.TarInfo) -> None:
        pdir = os.path.join(self.root, parent) if parent else os.fspath(self.root)
        if base == OPAQUE_MARKER:
            os.setxattr(pdir, OPAQUE_XATTR, b"y")
            return
        if base.startswith(OPAQUE_MARKER[:8]):
            return  # other ".wh..wh." names are aufs bookkeeping (.wh..wh.plnk, ...): no meaning
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise self._err("bad whiteout name", ti.name)
        rel = f"{parent}/{target}" if parent else target
        self._clear(rel, keep_dir=False)
        full = os.path.join(pdir, target)
        # The overlay whiteout: a character device 0/0, mode 0, owned by root.
        os.mknod(full, stat.S_IFCHR, os.makedev(0, 0))

    def _write_file(self, full: str, ti: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        src = tf.extractfile(ti)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as out:
            if src is not None:
                shutil.copyfileobj(src, out, _COPY_CHUNK)

    def _check_symlink(self, parent: str, ti: tarfile.TarInfo) -> None:
        target = ti.linkname
        if not target:
            raise self._err("symlink with an empty target", ti.name)
        if "\0" in target:
            raise self._err("symlink target holds a NUL byte", ti.name)
        if target.startswith("/"):
            return
        depth = len(parent.split("/")) if parent else 0
        for comp in target.split("/"):
            if comp == "..":
                depth -= 1
                if depth < 0:
                    raise self._err(f"symlink points out of the layer root: {target}", ti.name)
            elif comp not in ("", "."):
                depth += 1

    def _link_target(self, ti: tarfile.TarInfo) -> str:
        parts = _clean(ti.linkname, self.where)
        if not parts:
            raise self._err("hard link to the layer root", ti.name)
        parent = self._parent(parts, ti.name)
        rel = f"{parent}/{parts[-1]}" if parent else parts[-1]
        full = os.path.join(self.root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            raise self._err(f"hard link to {ti.linkname}, which is not in this layer",
                            ti.name) from None
        if stat.S_ISDIR(st.st_mode):
            raise self._err(f"hard link to the directory {ti.linkname}", ti.name)
        return full

    def _metadata(self, full: str, rel: str, ti: tarfile.TarInfo) -> None:
        # Order matters: chown clears setuid/setgid, so chmod comes after it.
        os.chown(full, ti.uid, ti.gid, follow_symlinks=False)
        is_link = ti.issym()
        if not is_link:
            os.chmod(full, ti.mode & 0o7777)
        for key, value in _xattrs(ti):
            try:
                os.setxattr(full, key, value, follow_symlinks=False)
            except OSError as e:
                # Linux refuses user.* xattrs on symlinks; nothing can carry those.
                if not (is_link and e.errno in (errno.EPERM, errno.ENOTSUP)):
                    raise
        mtime_ns = int(ti.mtime * 1_000_000_000)
        if ti.isdir():
            self._dir_times[rel] = mtime_ns  # set after its children are in place
        else:
            os.utime(full, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        """Set directory mtimes, deepest first."""
        for rel in sorted(self._dir_times, key=lambda r: r.count("/"), reverse=True):
            t = self._dir_times[rel]
            os.utime(os.path.join(self.root, rel), ns=(t, t), follow_symlinks=False)


def _xattrs(ti: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The xattrs a PAX header carries, minus ``trusted.overlay.*`` and SELinux labels.

    Overlay's own xattrs are ours to set (from whiteouts); taken from a tar they could forge
    redirects or metacopy on the read-only layer.
    """
    out: dict[str, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                out.setdefault(name, base64.b64decode(value + "=" * (-len(value) % 4)))
            except ValueError:
                continue
        elif key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values with surrogateescape: this gives back the raw bytes.
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
    # security.selinux labels belong to the host policy that made them; setting one here can
    # fail (or mislabel) under this host's policy, and the guest does not enforce SELinux.
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
            self._proc = run.start(["zstd", "-dcq"], stdin=run.PIPE, stdout=run.PIPE,
                                   stderr=run.PIPE)
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


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def unpack_layer(blob: IO[bytes], stage: Path, *, where: str, diff_id: str,
                 digest: str | None, size: int | None, stop: threading.Event,
                 on_bytes: Callable[[int], None] | None = None) -> UnpackResult:
    """Unpack a layer tar into ``stage``, verifying its digests.

    The compression is told by magic bytes, not media type (docker-archives say nothing):
    gzip (Python's zlib), zstd (the ``zstd`` program, as Python 3.11 has no zstd) or none.

    :param digest: the blob's digest (of the compressed bytes), if known.
    :param diff_id: the digest of the uncompressed tar, from the image config.
    :raises ImageError: a corrupt or truncated stream, a bad entry, or a digest mismatch.
    :raises Stopped: ``stop`` was set.
    """
    # An uncompressed blob's digest is its diff id: hash those bytes once, not twice.
    blob_hash = new_hash(digest) if digest is not None and digest != diff_id else None
    raw = _Tap(blob, blob_hash, stop, on_bytes)
    counted = io.BufferedReader(raw, _COPY_CHUNK)
    magic = counted.peek(4)[:4]
    decomp: IO[bytes] | gzip.GzipFile
    if magic.startswith(_GZIP_MAGIC):
        decomp = gzip.GzipFile(fileobj=counted, mode="rb")
    elif magic == _ZSTD_MAGIC:
        decomp = io.BufferedReader(_Zstd(counted, where), _COPY_CHUNK)
    else:
        decomp = counted
    diff_hash = new_hash(diff_id)
    tar_tap = _Tap(decomp, diff_hash, stop)
    tar_in = io.BufferedReader(tar_tap, _COPY_CHUNK)
    stager = Stager(stage, where)
    name = ""
    try:
        with tarfile.open(fileobj=tar_in, mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tf:
            for ti in tf:
                name = ti.name
                stager.add(ti, tf)
        stager.finish()
        # The diff id covers the whole stream, including padding after the end-of-archive
        # marker; the blob digest covers every compressed byte.
        while tar_in.read(_COPY_CHUNK):
            pass
        while counted.read(_COPY_CHUNK):
            pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _ZstdError) as e:
        at = f"{where}: after {name}" if name else where
        raise ImageError(f"corrupt or truncated layer: {e}", where=at) from None
    except Stopped:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ImageError("no space left on device while unpacking", where=where,
                             hint=f"free disk space under {stage.parent}") from None
        hint = ("importing images needs root (device nodes, ownership, trusted.* xattrs)"
                if e.errno == errno.EPERM and os.geteuid() != 0 else None)
        raise ImageError(f"cannot unpack: {e}", where=f"{where}: {name}", hint=hint) from None
    finally:
        decomp.close()
    if blob_hash is not None and digest is not None:
        got_blob = f"{digest.split(':', 1)[0]}:{blob_hash.hexdigest()}"
        if got_blob != digest:
            raise ImageError(f"layer blob does not match its digest (got {got_blob})",
                             where=where)
    if size is not None and raw.count != size:
        raise ImageError(f"layer blob has {raw.count} bytes, its descriptor says {size}",
                         where=where)
    got = f"{diff_id.split(':', 1)[0]}:{diff_hash.hexdigest()}"
    if got != diff_id:
        raise ImageError(f"uncompressed layer does not match its diff id {diff_id} "
                         f"(got {got})", where=where)
    return UnpackResult(diff_id=got, tar_bytes=tar_tap.count, entries=stager.entries,
                        root=stager.root_attrs)
