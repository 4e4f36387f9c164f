"""Property test: the ext4 layer written from a random tar holds the tree the tar describes.

For each random tar, two readings are compared:

* the **reference**: the tar unpacked by Python's ``tarfile`` (another implementation) into a
  directory, with OCI whiteouts turned into what overlay expects, and the xattrs and
  nanosecond mtimes the tar carries (``tarfile`` restores neither);
* the **layer**: the image :func:`~uvmshim.image.tar2ext4.write_layer` writes, checked with
  ``e2fsck -fn`` and read back through a read-only loop mount of the kernel's ext4.

Needs root and loop devices (skipped without).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uvmshim.image.tar2ext4 import write_layer


def _loop_ok() -> bool:
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("e2fsck"):
        return False
    return subprocess.run(["losetup", "-f"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _loop_ok(), reason="needs root, losetup and e2fsprogs")

MTIME0 = 1_700_000_000


@dataclass
class Spec:
    """One generated tar entry."""

    name: str
    kind: str  # dir, file, symlink, hardlink, chr, blk, fifo, whiteout, opaque
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    mtime_ns: int = MTIME0 * 1_000_000_000
    xattrs: dict[str, bytes] = field(default_factory=dict)


_names = st.text(alphabet="abcdefgh-_.é", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh."))
_mode = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2750, 0o1777, 0o000, 0o444])
_ids = st.sampled_from([0, 1, 1000, 65534, 70000, 1 << 31])
_mtime = st.integers(min_value=0, max_value=(1 << 33)).map(lambda s: s * 1_000_000_000) | \
    st.integers(min_value=MTIME0 * 10**9, max_value=MTIME0 * 10**9 + 10**10)
_xattrs = st.dictionaries(
    st.sampled_from(["user.a", "user.long-name-for-an-attribute", "security.test",
                     "trusted.t", "user.b"]),
    st.binary(max_size=200), max_size=3)


@st.composite
def layers(draw: st.DrawFn) -> list[Spec]:
    """A list of entries with unique paths: directories first, then their contents."""
    dirs = [""]
    specs: list[Spec] = []
    files: list[str] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(min_value=1, max_value=25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_names)
        path = f"{parent}/{name}" if parent else name
        if path in used:
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "file", "symlink", "hardlink",
                                     "chr", "blk", "fifo", "whiteout", "opaque"]))
        if kind == "hardlink" and not files:
            kind = "file"
        if kind == "opaque":
            if parent and f"{parent}/.wh..wh..opq" not in used:
                used.add(f"{parent}/.wh..wh..opq")
                specs.append(Spec(f"{parent}/.wh..wh..opq", "opaque"))
            continue
        if kind == "whiteout":
            wh = f"{parent}/.wh.{name}" if parent else f".wh.{name}"
            if name in used or wh in used:
                continue
            used.update((path, wh))
            specs.append(Spec(wh, "whiteout", mtime_ns=draw(_mtime)))
            continue
        used.add(path)
        s = Spec(path, kind, mode=draw(_mode), uid=draw(_ids), gid=draw(_ids),
                 mtime_ns=draw(_mtime))
        if kind in ("dir", "file"):
            s.xattrs = draw(_xattrs)
        if kind == "dir":
            dirs.append(path)
        elif kind == "file":
            s.data = draw(st.binary(max_size=9000) | st.sampled_from(
                [bytes(4096), os.urandom(70000), b"x" * 4097]))
            files.append(path)
        elif kind == "symlink":
            s.link = draw(st.sampled_from(["target", "/abs/x", "a" * 80, "../" * 0 + "b/c",
                                           "/" + "long" * 30]))
        elif kind == "hardlink":
            s.link = draw(st.sampled_from(files))
            # A hard link's header repeats its target's attributes (tarfile applies them).
            t = next(o for o in specs if o.name == s.link)
            s.mode, s.uid, s.gid, s.mtime_ns = t.mode, t.uid, t.gid, t.mtime_ns
        elif kind in ("chr", "blk"):
            s.dev = draw(st.sampled_from([(1, 3), (8, 0), (259, 70000), (4095, 1048575)]))
        specs.append(s)
    return specs


def make_tar(specs: list[Spec]) -> bytes:
    buf = io.BytesIO()
    kinds = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
             "fifo": tarfile.FIFOTYPE, "whiteout": tarfile.REGTYPE, "opaque": tarfile.REGTYPE}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for s in specs:
            ti = tarfile.TarInfo(s.name)
            ti.type = kinds[s.kind]
            ti.mode, ti.uid, ti.gid = s.mode, s.uid, s.gid
            sec, ns = divmod(s.mtime_ns, 10**9)
            ti.mtime = sec
            pax = {"mtime": f"{sec}.{ns:09d}"}
            for k, v in s.xattrs.items():
                pax[f"SCHILY.xattr.{k}"] = v.decode("utf-8", "surrogateescape")
            ti.pax_headers = pax
            ti.linkname = s.link
            ti.devmajor, ti.devminor = s.dev
            ti.size = len(s.data)
            tf.addfile(ti, io.BytesIO(s.data) if s.kind == "file" else None)
    return buf.getvalue()


# Reading a tree ------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """path → what a container can see of it (hard links as groups of the same first path)."""
    out: dict[str, tuple[object, ...]] = {}
    first_of: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            kind = stat.S_IFMT(st_.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(kind):
                extra = os.readlink(p)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                extra = (os.major(st_.st_rdev), os.minor(st_.st_rdev))
            link = None
            if not stat.S_ISDIR(kind):
                link = first_of.setdefault(st_.st_ino, rel)
            mode = stat.S_IMODE(st_.st_mode) if not stat.S_ISLNK(kind) else 0o777
            out[rel] = (kind, mode, st_.st_uid, st_.st_gid, extra, link,
                        None if stat.S_ISDIR(kind) else st_.st_nlink)
    return out


def reference(specs: list[Spec], tar: bytes, dest: Path) -> dict[str, tuple[object, ...]]:
    """The tar unpacked by tarfile, whiteouts made overlay's."""
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, numeric_owner=True, filter="fully_trusted")
    for s in specs:
        if s.kind == "whiteout":
            d, _, base = s.name.rpartition("/")
            (dest / s.name).unlink()
            target = dest / d / base[4:]
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
            os.chown(target, 0, 0)  # not the gid of a setgid parent: whiteouts are root's
        elif s.kind == "opaque":
            (dest / s.name).unlink()
    return snapshot(dest)


@contextlib.contextmanager
def loop_mounted(image: Path, mnt: Path) -> Iterator[Path]:
    dev = subprocess.run(["losetup", "-r", "-f", "--show", image], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        mnt.mkdir()
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", dev, mnt], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def convert(tar: bytes, image: Path) -> None:
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    write_layer(io.BytesIO(tar), image, diff_id=digest, digest=digest, size=len(tar),
                where="layer", stop=threading.Event())
    res = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=layers())
def test_layer_holds_the_tar_tree(tmp_path_factory: pytest.TempPathFactory,
                                  specs: list[Spec]) -> None:
    work = tmp_path_factory.mktemp("tree")
    tar = make_tar(specs)
    want = reference(specs, tar, work / "ref")
    convert(tar, work / "layer.img")
    with loop_mounted(work / "layer.img", work / "mnt") as mnt:
        got = snapshot(mnt)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k] == want[k], k
        for s in specs:
            p = mnt / s.name
            if s.kind in ("whiteout", "opaque", "hardlink"):
                continue
            if s.kind == "dir" and any(o.kind == "opaque" and o.name == f"{s.name}/.wh..wh..opq"
                                       for o in specs):
                assert os.getxattr(p, "trusted.overlay.opaque") == b"y"
            if s.kind in ("file", "dir"):
                names = set(os.listxattr(p, follow_symlinks=False)) - {"trusted.overlay.opaque"}
                assert names == set(s.xattrs), s.name
                for k, v in s.xattrs.items():
                    assert os.getxattr(p, k) == v
            assert os.lstat(p).st_mtime_ns == s.mtime_ns, s.name


def test_replaced_and_removed_entries(tmp_path: Path) -> None:
    """Later entries replace earlier ones; replaced data leaves no used blocks behind."""
    specs = [Spec("d", "dir", mode=0o755), Spec("d/f", "file", data=os.urandom(50000)),
             Spec("d/f", "file", data=b"second"), Spec("d/g", "file", data=b"g"),
             Spec("d/h", "hardlink", link="d/g"), Spec("d", "dir", mode=0o700),
             Spec("e", "file", data=os.urandom(9000)), Spec(".wh.e", "whiteout")]
    tar = make_tar(specs)
    convert(tar, tmp_path / "layer.img")
    with loop_mounted(tmp_path / "layer.img", tmp_path / "mnt") as mnt:
        assert (mnt / "d/f").read_bytes() == b"second"
        assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o700
        assert os.stat(mnt / "d/g").st_ino == os.stat(mnt / "d/h").st_ino
        assert os.stat(mnt / "d/g").st_nlink == 2
        assert stat.S_ISCHR(os.lstat(mnt / "e").st_mode)
        assert sorted(os.listdir(mnt)) == ["d", "e"]


def test_large_file_and_many_entries(tmp_path: Path) -> None:
    """A file of more than four extents (a tree with a leaf block), a directory of thousands
    of entries (many directory blocks), long names and xattrs in a block of their own."""
    big = 600 << 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("big")
        ti.size = big
        chunk = os.urandom(1 << 20)

        class Big(io.RawIOBase):
            left = big

            def readable(self) -> bool:
                return True

            def readinto(self, b: memoryview) -> int:  # type: ignore[override]
                off = (big - self.left) % len(chunk)  # the file repeats ``chunk``
                n = min(len(b), self.left, len(chunk) - off)
                b[:n] = chunk[off:off + n]
                self.left -= n
                return n

        tf.addfile(ti, io.BufferedReader(Big()))
        for i in range(3000):
            t = tarfile.TarInfo(f"many/{'n' * 200}{i}")
            t.pax_headers = {"SCHILY.xattr.user.big": "v" * 300}
            tf.addfile(t, io.BytesIO())
    tar = buf.getvalue()
    convert(tar, tmp_path / "layer.img")
    del tar, buf
    with loop_mounted(tmp_path / "layer.img", tmp_path / "mnt") as mnt:
        assert os.stat(mnt / "big").st_size == big
        with open(mnt / "big", "rb") as f:
            f.seek(big - (1 << 20))
            assert f.read() == chunk
        assert len(os.listdir(mnt / "many")) == 3000
        assert os.getxattr(mnt / "many" / f"{'n' * 200}2999", "user.big") == b"v" * 300
