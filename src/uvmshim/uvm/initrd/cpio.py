"""Write uncompressed ``newc`` cpio archives (the initramfs format), without cpio(1).

Writing it ourselves means no host tool is needed, device nodes need no root (they are just
headers), and every entry is owned by root whatever user builds it. The kernel boots an
uncompressed cpio fastest under TCG: decompressing costs 0.4-0.9 s.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Append entries to ``out`` (a binary file opened for writing).

    :param out: destination stream.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()

    def _header(self, name: str, mode: int, size: int, mtime: int,
                rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name = name.lstrip("/") or "."
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, max(mtime, 0), size, 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(head + encoded)
        self._pad(len(head) + len(encoded))

    def _pad(self, n: int) -> None:
        self._out.write(b"\0" * (-n % 4))

    def add_dir(self, name: str, *, mode: int = 0o755, mtime: int = 0) -> None:
        """Add a directory."""
        self._header(name, stat.S_IFDIR | mode, 0, mtime, nlink=2)

    def add_bytes(self, name: str, data: bytes, *, mode: int = 0o644, mtime: int = 0) -> None:
        """Add a regular file holding ``data``."""
        self._header(name, stat.S_IFREG | mode, len(data), mtime)
        self._out.write(data)
        self._pad(len(data))

    def add_symlink(self, name: str, target: str, *, mtime: int = 0) -> None:
        """Add a symbolic link to ``target``."""
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data), mtime)
        self._out.write(data)
        self._pad(len(data))

    def add_device(self, name: str, *, char: bool, major: int, minor: int,
                   mode: int = 0o600) -> None:
        """Add a character (or block) device node."""
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        self._header(name, kind | mode, 0, 0, rdev=(major, minor))

    def add_path(self, name: str, path: str) -> None:
        """Add the file, directory or symlink at host ``path`` as ``name`` (lstat, no follow)."""
        st = os.lstat(path)
        mtime = int(st.st_mtime)
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            self.add_dir(name, mode=perm, mtime=mtime)
        elif stat.S_ISLNK(st.st_mode):
            self.add_symlink(name, os.readlink(path), mtime=mtime)
        elif stat.S_ISREG(st.st_mode):
            # Hard links become independent copies: simpler, and the tree has almost none.
            self._header(name, stat.S_IFREG | perm, st.st_size, mtime)
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self._out)
            self._pad(st.st_size)
        else:
            raise ValueError(f"unsupported file type for cpio: {path}")

    def add_tree(self, root: str) -> None:
        """Add everything below ``root`` (not ``root`` itself), in sorted order."""
        entries: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                entries.append(os.path.relpath(os.path.join(dirpath, n), root))
        for rel in sorted(entries):
            self.add_path(rel, os.path.join(root, rel))

    def close(self) -> None:
        """Write the trailer entry (does not close the stream)."""
        self._header(_TRAILER, 0, 0, 0, nlink=1)
        self._out.write(b"\0" * (-self._out.tell() % 512) if self._out.seekable() else b"")
