"""Just enough ELF64 reading for the boot-file builder: DT_NEEDED and named sections.

readelf(1) would do, but binutils is not installed on a minimal build host, and the two
questions we ask (which sonames does this binary need; what is in a module's ``.modinfo``)
take a few dozen lines to answer directly.
"""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
_SHT_DYNAMIC = 6
_DT_NEEDED = 1


def is_elf(path: str) -> bool:
    """True if ``path`` starts with the ELF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


class ElfFile:
    """A parsed little-endian ELF64 file (sections only).

    :raises ValueError: if the data is not little-endian ELF64.
    """

    def __init__(self, data: bytes) -> None:
        if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
            raise ValueError("not a little-endian ELF64 file")
        self._data = data
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        self._sections: list[tuple[int, int, int, int, int]] = []  # name, type, off, size, link
        for i in range(shnum):
            base = shoff + i * shentsize
            name, typ = struct.unpack_from("<II", data, base)
            off, size = struct.unpack_from("<QQ", data, base + 0x18)
            link, = struct.unpack_from("<I", data, base + 0x28)
            self._sections.append((name, typ, off, size, link))
        self._shstr = self._sections[shstrndx] if shnum else None

    @classmethod
    def open(cls, path: str) -> ElfFile:
        """Read and parse ``path``."""
        with open(path, "rb") as f:
            return cls(f.read())

    def _str(self, section: tuple[int, int, int, int, int], offset: int) -> str:
        start = section[2] + offset
        end = self._data.index(b"\0", start)
        return self._data[start:end].decode("utf-8", errors="replace")

    def section(self, name: str) -> bytes | None:
        """The contents of section ``name``, or None."""
        if self._shstr is None:
            return None
        for sec in self._sections:
            if self._str(self._shstr, sec[0]) == name:
                return self._data[sec[2] : sec[2] + sec[3]]
        return None

    def needed(self) -> list[str]:
        """The DT_NEEDED sonames, in order."""
        out: list[str] = []
        for sec in self._sections:
            if sec[1] != _SHT_DYNAMIC:
                continue
            strtab = self._sections[sec[4]]
            for pos in range(sec[2], sec[2] + sec[3], 16):
                tag, val = struct.unpack_from("<qQ", self._data, pos)
                if tag == 0:
                    break
                if tag == _DT_NEEDED:
                    out.append(self._str(strtab, val))
        return out
