"""The import's streaming parts, one by one: gzip members and chunk boundaries, the zstd child,
the read-ahead pump, the tar header fields, and the writer's vectored writes.

The whole import (and hostile layers) is tested in test_image_import.py and
test_image_safety.py; these pin down the edges those cannot reach cheaply.
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uvmshim.image import ext4, tar2ext4, tarstream, unpack


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the (sorted, deduplicated) positions ``cuts``."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# gzip ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
       pads=st.lists(st.integers(0, 5), min_size=4, max_size=4),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_gunzip_members_padding_and_chunk_boundaries(parts: list[bytes], pads: list[int],
                                                     cuts: list[int]) -> None:
    """Members one after the other, zero padding after any of them (as ``gzip -d`` reads
    them), cut into chunks anywhere: the same bytes as decompressing them one by one."""
    stream = b"".join(gzip.compress(p) + bytes(n) for p, n in zip(parts, pads, strict=False))
    assert b"".join(unpack._gunzip(_split(stream, cuts))) == b"".join(parts)


def test_gunzip_refuses_garbage_after_a_member() -> None:
    with pytest.raises(unpack._IsalError):
        list(unpack._gunzip([gzip.compress(b"tar") + b"\0\0" + b"junk" * 10]))


def test_gunzip_refuses_a_wrong_checksum() -> None:
    data = bytearray(gzip.compress(b"x" * 10000))
    data[-6] ^= 1  # the CRC-32 in the trailer
    with pytest.raises(unpack._IsalError):
        list(unpack._gunzip([bytes(data)]))


def test_gunzip_refuses_a_truncated_member() -> None:
    data = gzip.compress(os.urandom(5000))
    with pytest.raises(EOFError):
        list(unpack._gunzip(_split(data[:-4], [100, 2000])))


def test_gunzip_bounds_each_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bomb inflates in pieces of at most _OUT_MAX bytes, never in one."""
    monkeypatch.setattr(unpack, "_OUT_MAX", 1 << 20)
    bomb = gzip.compress(bytes(24 << 20), 9)  # ~24 KB
    sizes = [len(out) for out in unpack._gunzip([bomb])]
    assert sum(sizes) == 24 << 20
    assert max(sizes) <= 1 << 20


# zstd ---------------------------------------------------------------------------------------


def _children_named(name: str) -> list[int]:
    """Our child processes called ``name``."""
    me = str(os.getpid())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm == name and stat[stat.rindex(")") + 2:].split()[1] == me:
            found.append(int(pid))
    return found


@pytest.mark.skipif(not shutil.which("zstd"), reason="needs zstd")
def test_unzstd_left_early_kills_its_child(tmp_path: Path) -> None:
    import subprocess

    data = os.urandom(1 << 20) * 8
    packed = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                            check=True).stdout
    gen = unpack._unzstd(iter(_split(packed, [4096, 65536])), "layer")
    first = next(gen)
    assert first and data.startswith(first)
    assert _children_named("zstd")
    gen.close()
    assert not _children_named("zstd")


@pytest.mark.skipif(not shutil.which("zstd"), reason="needs zstd")
def test_unzstd_whole_stream() -> None:
    import subprocess

    data = os.urandom(300000) + bytes(700000)
    packed = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                            check=True).stdout
    assert b"".join(unpack._unzstd(iter(_split(packed, [10, 999])), "layer")) == data
    assert not _children_named("zstd")


# The pump -----------------------------------------------------------------------------------


def test_pump_hands_over_items_and_the_error() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("broken")

    pump = tarstream.Pump(items(), 1, "test-pump")
    try:
        assert pump.next() == 1
        assert pump.next() == 2
        with pytest.raises(ValueError, match="broken"):
            pump.next()
        assert pump.next() is None
    finally:
        pump.close()


def test_pump_close_stops_a_blocked_producer_and_runs_its_clean_up() -> None:
    cleaned = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"x"
        finally:
            cleaned.set()

    pump = tarstream.Pump(endless(), 2, "test-pump")
    assert pump.next() == b"x"
    time.sleep(0.05)  # the producer now waits on a full queue
    pump.close()
    assert cleaned.is_set()
    assert not any(t.name == "test-pump" for t in threading.enumerate())


# Tar header fields --------------------------------------------------------------------------


@given(st.binary(min_size=512, max_size=512))
def test_byte_sum_is_sum(block: bytes) -> None:
    assert tarstream._byte_sum(block) == sum(block)


def _num_reference(field: bytes) -> int | None:
    """What a tar number field means (None: refused)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    s = field.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        return None


@given(st.binary(max_size=12) | st.text("01234567 \0", max_size=12).map(str.encode))
def test_num_fast_path_means_the_same(field: bytes) -> None:
    try:
        got: int | None = tarstream._num(field, "size")
    except tarstream.TarFormatError:
        got = None
    assert got == _num_reference(field)


def test_pax_time_forms() -> None:
    assert tarstream._pax_time(b"1700000000.123456789123") == 1700000000123456789
    assert tarstream._pax_time(b"-1.5") == -1500000000
    assert tarstream._pax_time(b"12") == 12_000_000_000
    assert tarstream._pax_time(b"1.5e3") == 1500_000_000_000
    for bad in (b"", b"x", b"NaN", b"Infinity", b"1..2"):
        with pytest.raises(tarstream.TarFormatError):
            tarstream._pax_time(bad)


def test_pax_time_with_a_huge_exponent_is_clamped_at_once() -> None:
    """Before clamping, int() of Decimal('1e999999') took ~25 s: a hostile tar could stall
    the import for hours."""
    start = time.monotonic()
    assert tarstream._pax_time(b"1e999999") == (1 << 40) * 1_000_000_000
    assert tarstream._pax_time(b"-1e999999") == -(1 << 40) * 1_000_000_000
    assert time.monotonic() - start < 1


def test_pax_records() -> None:
    assert tarstream._pax_records(b"12 path=a\nb\n10 uid=12\n\0\0") == {b"path": b"a\nb",
                                                                     b"uid": b"12"}
    for bad in (b"8 path=a\n", b"99 path=abc\n", b"x path=a\n", b"5 pa\n", b"8 path\n\n",
                b"0 =\n", b"12345678901234567890123 a=b\n"):
        with pytest.raises(tarstream.TarFormatError):
            tarstream._pax_records(bad)


# The writer's vectored writes ---------------------------------------------------------------


def test_pwritev_all_finishes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    real = os.pwritev

    def short(fd: int, bufs: list[memoryview], offset: int) -> int:
        return real(fd, [memoryview(bufs[0])[:1000]], offset)  # at most 1000 bytes a call

    monkeypatch.setattr(os, "pwritev", short)
    parts = [os.urandom(n) for n in (10, 5000, 1, 2048, 700)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        ext4._pwritev_all(fd, [memoryview(p) for p in parts], 100)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(100) + b"".join(parts)


def test_file_data_across_batches_and_chunks(tmp_path: Path) -> None:
    """Files cut across stream chunks, and larger than a batch, land whole and aligned."""
    files = [os.urandom(n) for n in (1, 4096, 4097, 3 * 8192 + 5, 0, 100000)]
    stream = b"".join(files)
    chunks = _split(stream, [7, 4100, 20000, 50000, 50001])
    views = (memoryview(c) for c in chunks)
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    try:
        writer = ext4.Ext4Writer(fd, fs_uuid=uuid.uuid4(), batch_bytes=8192, in_flight=1)
        reader = tarstream.ChunkStream(views, depth=2)
        nodes = []
        assert writer.root.children is not None
        for i, data in enumerate(files):
            node = ext4.Node(0o100644, links=1)
            writer.add_data(node, len(data), reader.take)
            writer.root.children[b"f%d" % i] = node  # in the tree: finish keeps its data
            nodes.append(node)
        reader.close()
        writer.finish()  # writes the last batch, then the metadata after the data
        image = os.pread(fd, writer.next_block * ext4.BLOCK, 0)
    finally:
        os.close(fd)
    for node, data in zip(nodes, files, strict=True):
        at = node.start * ext4.BLOCK
        assert image[at:at + len(data)] == data
        assert image[at + len(data):at + -(-len(data) // ext4.BLOCK) * ext4.BLOCK] == \
            bytes(-len(data) % ext4.BLOCK)


# Process-wide tuning ------------------------------------------------------------------------


def test_tuning_is_restored_after_the_last_writer() -> None:
    before = sys.getswitchinterval()
    with tar2ext4._tuned_for_writing():
        with tar2ext4._tuned_for_writing():
            assert sys.getswitchinterval() == min(before, tar2ext4.SWITCH_INTERVAL)
        assert sys.getswitchinterval() == min(before, tar2ext4.SWITCH_INTERVAL)
    assert sys.getswitchinterval() == before
