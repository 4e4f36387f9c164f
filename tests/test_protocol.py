"""The wire protocol: framing, message parsing, versioning, round trips over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from uvmshim.protocol import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    SCSI_CONTROLLER_PCI_SLOTS,
    Event,
    FrameDecoder,
    ProtocolError,
    Request,
    Response,
    check_share_name,
    decode_payload,
    encode_frame,
    parse_message,
    plan9_share_guest_path,
    plan9_share_host_path,
    read_frame,
    scsi_controller_pci_address,
    scsi_linux_lun,
    vpmem_root_port_pci_address,
    write_frame,
)

json_values = hst.recursive(
    hst.none() | hst.booleans() | hst.integers(-(2**53), 2**53) | hst.text(),
    lambda inner: hst.lists(inner, max_size=4) | hst.dictionaries(hst.text(), inner, max_size=4),
    max_leaves=12,
)


def test_frame_layout() -> None:
    frame = encode_frame({"a": 1})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert json.loads(frame[4:]) == {"a": 1}


def test_frame_is_utf8() -> None:
    frame = encode_frame({"s": "ünïcødé ✓"})
    assert decode_payload(frame[4:]) == {"s": "ünïcødé ✓"}


@given(hst.dictionaries(hst.text(), json_values, max_size=5))
def test_decoder_round_trip_any_split(obj: dict[str, object]) -> None:
    data = encode_frame(obj) * 3
    for cut in (1, 3, 4, 5, len(data) // 2):
        dec = FrameDecoder()
        out = []
        for i in range(0, len(data), cut):
            out += dec.feed(data[i : i + cut])
        assert out == [obj, obj, obj]
        assert dec.pending == 0


def test_decoder_partial_then_reset() -> None:
    dec = FrameDecoder()
    frame = encode_frame({"x": 1})
    assert dec.feed(frame[:6]) == []
    assert dec.pending == 6
    dec.reset()
    assert dec.feed(frame) == [{"x": 1}]


def test_oversize_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"data": "x" * 100}, max_size=50)
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder(max_size=10).feed(struct.pack(">I", 11) + b"{}")
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_SIZE + 1))


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"not json", b"[1,2]", b'"str"'])
def test_bad_payloads(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def test_encode_rejects_non_objects() -> None:
    with pytest.raises(ProtocolError):
        encode_frame([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="serialisable"):
        encode_frame({"x": object()})


def test_message_round_trips() -> None:
    req = Request(7, "mount_scsi", {"controller": 0, "lun": 3})
    assert req.to_json()["v"] == PROTOCOL_VERSION
    assert parse_message(req.to_json()) == req
    ok = Response(7, True, {"device": "/dev/sdb"})
    assert parse_message(ok.to_json()) == ok
    bad = Response(8, False, error="mount /dev/sdb on /m: Invalid argument")
    assert parse_message(bad.to_json()) == bad
    ev = Event("output", {"id": 7, "stream": "stdout", "data": "aGk="})
    assert parse_message(ev.to_json()) == ev


def test_version_is_carried() -> None:
    req = parse_message({"v": 99, "id": 1, "op": "ping", "args": {}})
    assert isinstance(req, Request) and req.version == 99


@pytest.mark.parametrize("obj", [
    [], {"id": 1}, {"op": "ping", "id": "1", "v": 1}, {"op": "ping", "id": 1},
    {"op": "ping", "id": True, "v": 1}, {"op": 3, "id": 1, "v": 1},
    {"op": "x", "id": 1, "v": 1, "args": []}, {"id": 1, "ok": "yes"}, {"id": 1, "ok": False},
    {"event": 5},
])
def test_malformed_messages(obj: object) -> None:
    with pytest.raises(ProtocolError):
        parse_message(obj)


def test_layout_conventions() -> None:
    assert SCSI_CONTROLLER_PCI_SLOTS == (5, 6, 7, 8)
    assert scsi_controller_pci_address(0) == "0000:00:05.0"
    assert scsi_controller_pci_address(3) == "0000:00:08.0"
    with pytest.raises(ValueError):
        scsi_controller_pci_address(4)
    assert [scsi_linux_lun(n) for n in (0, 63, 255, 256, 16383)] == [0, 63, 255, 16640, 32767]
    assert vpmem_root_port_pci_address(0) == "0000:00:10.0"
    assert vpmem_root_port_pci_address(3) == "0000:00:13.0"
    assert plan9_share_host_path("/run/u/export", "3") == "/run/u/export/3"
    assert plan9_share_guest_path("3") == "/run/uvmshim/share0/3"
    for bad in ("", ".", "..", "a/b", "x\0"):
        with pytest.raises(ValueError):
            check_share_name(bad)


def test_sync_socketpair_round_trip() -> None:
    """The guest's style: blocking fd reads fed to a FrameDecoder, byte by byte."""
    a, b = socket.socketpair()
    frames = [encode_frame({"n": i, "pad": "x" * i * 1000}) for i in range(5)]

    def writer() -> None:
        for f in frames:
            for i in range(0, len(f), 7):
                a.sendall(f[i : i + 7])
        a.close()

    t = threading.Thread(target=writer)
    t.start()
    dec, got = FrameDecoder(), []
    while chunk := b.recv(100):
        got += dec.feed(chunk)
    t.join()
    b.close()
    assert [g["n"] for g in got] == [0, 1, 2, 3, 4]


def test_async_read_write_frames() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        _ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        await write_frame(wa, {"hello": 1})
        await write_frame(wa, {"big": "y" * 200_000})
        assert await read_frame(rb) == {"hello": 1}
        assert (await read_frame(rb) or {})["big"] == "y" * 200_000
        # A partial frame followed by EOF is an error; EOF between frames is a clean end.
        wa.write(encode_frame({"x": 1})[:5])
        await wa.drain()
        wa.close()
        with pytest.raises(ProtocolError, match="inside a frame"):
            await read_frame(rb)
        wb.close()

        c, d = socket.socketpair()
        _rc, wc = await asyncio.open_connection(sock=c)
        rd, wd = await asyncio.open_connection(sock=d)
        wc.close()
        assert await read_frame(rd) is None
        wd.close()

        e, f = socket.socketpair()
        _re, we = await asyncio.open_connection(sock=e)
        rf, wf = await asyncio.open_connection(sock=f)
        we.write(struct.pack(">I", 100))
        await we.drain()
        with pytest.raises(ProtocolError, match="exceeds"):
            await read_frame(rf, max_size=10)
        we.close()
        wf.close()

    asyncio.run(main())
