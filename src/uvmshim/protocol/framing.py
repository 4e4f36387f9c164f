"""Length-prefixed JSON frames: a 4-byte big-endian payload length, then UTF-8 JSON.

STDLIB ONLY (runs in the guest too). The guest reads a blocking file descriptor and feeds a
:class:`FrameDecoder`; the host uses the asyncio helpers :func:`read_frame` and
:func:`write_frame`. A length prefix (rather than newline-delimited JSON) lets a frame carry
any payload and lets the reader allocate once per frame.
"""

from __future__ import annotations

import json
import struct

from uvmshim.protocol.messages import ProtocolError

# Not ``from typing import TYPE_CHECKING``: that imports typing (tens of ms of guest boot under
# TCG). Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    # Only the host uses the asyncio helpers, and typing only the type checker: importing
    # them in the guest would cost boot time under TCG for nothing.
    import asyncio
    from typing import Any

HEADER = struct.Struct(">I")

#: Largest payload accepted in either direction. Exec output is sent in chunks far below this;
#: the limit stops a corrupt length prefix from making the reader allocate gigabytes.
MAX_FRAME_SIZE = 8 * 1024 * 1024


def encode_frame(obj: dict[str, Any], *, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """Return the frame (header + payload) for the JSON object ``obj``.

    :raises ProtocolError: if ``obj`` is not a dict, not JSON-serialisable, or too large.
    """
    if not isinstance(obj, dict):
        raise ProtocolError("a frame must hold a JSON object")
    try:
        payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"message is not JSON-serialisable: {err}") from err
    if len(payload) > max_size:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the limit of {max_size}")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Decode one frame payload into a JSON object.

    :raises ProtocolError: for invalid UTF-8/JSON or a non-object value.
    """
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"invalid frame payload: {err}") from err
    if not isinstance(obj, dict):
        raise ProtocolError("a frame must hold a JSON object")
    return obj


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    :param max_size: largest payload accepted.
    """

    def __init__(self, *, max_size: int = MAX_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data`` and return every frame it completed, in order.

        :raises ProtocolError: on an oversize length prefix or an undecodable payload. The
            decoder is unusable afterwards (the stream is out of sync); call :meth:`reset`.
        """
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit of {self._max}")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            out.append(decode_payload(payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop any partial frame (the peer went away mid-frame)."""
        self._buf.clear()


async def read_frame(
    reader: asyncio.StreamReader, *, max_size: int = MAX_FRAME_SIZE
) -> dict[str, Any] | None:
    """Read one frame; return ``None`` on a clean EOF between frames.

    :raises ProtocolError: on EOF inside a frame, an oversize frame or a bad payload.
    """
    import asyncio  # lazily: see the TYPE_CHECKING import above

    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from err
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise ProtocolError(f"frame of {size} bytes exceeds the limit of {max_size}")
    try:
        payload = await reader.readexactly(size)
    except asyncio.IncompleteReadError as err:
        raise ProtocolError("connection closed inside a frame") from err
    return decode_payload(payload)


async def write_frame(
    writer: asyncio.StreamWriter, obj: dict[str, Any], *, max_size: int = MAX_FRAME_SIZE
) -> None:
    """Write one frame and wait until the transport buffer drains.

    :raises ProtocolError: if ``obj`` cannot be framed.
    """
    writer.write(encode_frame(obj, max_size=max_size))
    await writer.drain()
