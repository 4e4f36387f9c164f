"""Device-mapper through its ioctls on /dev/mapper/control: dm-verity devices. STDLIB ONLY.

The initrd has no ``dmsetup`` or ``veritysetup``, and needs none: a device is created, given
its table and activated with three ioctls, each a ``struct dm_ioctl`` header (``dm-ioctl.h``,
interface version 4) followed, for a table load, by one ``struct dm_target_spec`` and the
target's parameter string::

    struct dm_ioctl (312 bytes)      version[3], data_size, data_start, target_count,
                                     open_count, flags, event_nr, padding, dev,
                                     name[128], uuid[129], data[7]
    struct dm_target_spec (40 bytes) sector_start, length, status, next, target_type[16]
    "params\\0"                       padded to 8 bytes

``DM_DEV_CREATE`` makes an empty device, ``DM_TABLE_LOAD`` loads the (read-only) table into its
inactive slot, ``DM_DEV_SUSPEND`` without the suspend flag swaps it in and resumes the device,
``DM_TABLE_STATUS`` returns each target's status line (dm-verity's: ``V``, or ``C`` once a
block failed its hash), and ``DM_DEV_REMOVE`` removes the device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time

from uvmshim.agent.util import AgentError
from uvmshim.protocol.messages import ErrorKind

CONTROL = "/dev/mapper/control"
_HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
_SPEC = struct.Struct("=QQiI16s")
_VERSION = (4, 0, 0)
_DM_IOCTL = 0xFD
_IOC_READ_WRITE = 3

# ioctl command numbers (dm-ioctl.h's enum).
_DEV_CREATE = 3
_DEV_REMOVE = 4
_DEV_SUSPEND = 6
_TABLE_LOAD = 9
_TABLE_STATUS = 12

READONLY_FLAG = 1 << 0
_BUFFER_FULL_FLAG = 1 << 8

#: Room for the answer to a status request.
_STATUS_BUFFER = 16384
#: How long a remove retries while the device is still busy (a just-unmounted file system).
REMOVE_TIMEOUT = 5.0


def _ioc(nr: int) -> int:
    """``_IOWR(DM_IOCTL, nr, struct dm_ioctl)``."""
    return (_IOC_READ_WRITE << 30) | (_HEADER.size << 16) | (_DM_IOCTL << 8) | nr


def _header(name: str, *, data_size: int, flags: int = 0, target_count: int = 0) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= 128 or "/" in name:
        raise AgentError(f"bad device-mapper name {name!r}", ErrorKind.INVALID)
    return _HEADER.pack(*_VERSION, data_size, _HEADER.size, target_count, 0, flags, 0, 0, 0,
                        raw, b"", b"")


def _call(nr: int, buf: bytearray, what: str) -> bytearray:
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise AgentError(f"open {CONTROL}: {err.strerror} (is dm_mod loaded?)") from None
    try:
        fcntl.ioctl(fd, _ioc(nr), buf, True)
    except OSError as err:
        kind = ErrorKind.BUSY if err.errno == errno.EBUSY else (
            ErrorKind.NOT_FOUND if err.errno == errno.ENXIO else ErrorKind.FAILED)
        raise AgentError(f"device-mapper {what}: {err.strerror}", kind) from None
    finally:
        os.close(fd)
    return buf


def _simple(nr: int, name: str, what: str, flags: int = 0) -> tuple[int, ...]:
    buf = bytearray(_header(name, data_size=_HEADER.size, flags=flags))
    return _HEADER.unpack(_call(nr, buf, f"{what} {name}"))


def create(name: str, target: str, params: str, sectors: int, *,
           read_only: bool = True) -> int:
    """Create device ``name`` with one ``target`` over ``sectors`` 512-byte sectors, and
    activate it.

    :return: its device number (``st_rdev`` form).
    :raises AgentError: any step failed (the device is removed again).
    """
    fields = _simple(_DEV_CREATE, name, "create")
    dev = fields[10]
    try:
        body = _SPEC.pack(0, sectors, 0, 0, target.encode()) + params.encode() + b"\0"
        body += bytes(-len(body) % 8)
        # ``next`` is the offset of the following spec (there is none): the end of this one.
        body = body[:20] + struct.pack("=I", len(body)) + body[24:]
        flags = READONLY_FLAG if read_only else 0
        buf = bytearray(_header(name, data_size=_HEADER.size + len(body), flags=flags,
                                target_count=1) + body)
        _call(_TABLE_LOAD, buf, f"load {target} table of {name}")
        _simple(_DEV_SUSPEND, name, "resume")
    except BaseException:
        with contextlib.suppress(AgentError):
            remove(name)
        raise
    return os.makedev((dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def remove(name: str, *, timeout: float = REMOVE_TIMEOUT) -> None:
    """Remove device ``name``; retry while it is busy (for up to ``timeout`` s).

    :raises AgentError: still busy, or another failure. A device that does not exist is not
        an error.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            _simple(_DEV_REMOVE, name, "remove")
            return
        except AgentError as err:
            if err.kind is ErrorKind.NOT_FOUND:
                return
            if err.kind is not ErrorKind.BUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def status(name: str) -> list[tuple[str, str]]:
    """The ``(target type, status line)`` of each target of device ``name``.

    :raises AgentError: no such device (kind ``not_found``), or another failure.
    """
    buf = bytearray(_STATUS_BUFFER)
    buf[:_HEADER.size] = _header(name, data_size=_STATUS_BUFFER)
    _call(_TABLE_STATUS, buf, f"status of {name}")
    fields = _HEADER.unpack_from(buf)
    data_start, count, flags = fields[4], fields[5], fields[7]
    if flags & _BUFFER_FULL_FLAG:
        raise AgentError(f"device-mapper status of {name}: answer too large")
    out: list[tuple[str, str]] = []
    pos = data_start
    for _ in range(count):
        _start, _length, _st, nxt, ttype = _SPEC.unpack_from(buf, pos)
        text_start = pos + _SPEC.size
        end = buf.index(0, text_start)
        out.append((ttype.rstrip(b"\0").decode(), buf[text_start:end].decode()))
        pos = data_start + nxt
    return out


def device_node(rdev: int, *, dev: str = "/dev", sysfs: str = "/sys") -> str:
    """The /dev path of block device ``rdev`` (devtmpfs names it, ``dm-0`` for dm devices)."""
    major, minor = os.major(rdev), os.minor(rdev)
    name = f"dm-{minor}"
    try:
        with open(f"{sysfs}/dev/block/{major}:{minor}/uevent", encoding="ascii") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    name = line.strip().split("=", 1)[1]
    except OSError:
        pass
    return f"{dev}/{name}"


def kernel_messages(needle: str, *, path: str = "/dev/kmsg", limit: int = 3) -> list[str]:
    """The last ``limit`` different kernel log messages containing ``needle`` (empty if the
    log is unreadable)."""
    found: list[str] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.EPIPE:  # overwritten while reading: go on
                    continue
                break
            if not rec:
                break
            msg = rec.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0]
            if needle in msg:
                if msg in found:
                    found.remove(msg)
                found.append(msg)
    finally:
        os.close(fd)
    return found[-limit:]
