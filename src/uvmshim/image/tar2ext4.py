"""A layer tar → ``layer.vhd``: an ext4 filesystem image with a fixed VHD footer, in one pass.

The steps, and why each is done this way:

1. **Stream** the blob through its digest checks and decompression into a tar reader
   (:mod:`uvmshim.image.unpack`, in a worker thread). File data goes straight from the tar
   into the image file, in large blocks, at the place the filesystem will keep it; the tree
   and every inode's attributes stay in memory (:mod:`uvmshim.image.ext4`). No staging
   directory: the only disk space used is the layer disk itself, and sub-second mtimes,
   owners, modes, xattrs and device numbers are written as the tar has them, not as a host
   filesystem would round or refuse them.
2. **Finish** the filesystem: directories, inode tables, bitmaps and the superblock are laid
   out after the data, and the size is rounded up to an exact CHS geometry
   (:mod:`uvmshim.image.vhd`).
3. **Verity** (unless turned off): hash the image (file data in a child process while it is
   written, the rest once the filesystem is finished), append the dm-verity superblock and hash
   tree after it (:mod:`uvmshim.image.verity`), and round *that* up to a CHS geometry. The
   root hash goes into the layer folder's ``verity.json``; the guest then mounts the layer
   through a dm-verity device, so a disk changed on the host fails to read in the guest.
4. **Footer**: append the 512-byte fixed-VHD footer; QEMU's ``vpc`` driver then reads the file
   as a disk of exactly the image's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from uvmshim.image import vhd
from uvmshim.image.blockhash import VerityStopped
from uvmshim.image.ext4 import BLOCK, Ext4Error, Ext4Writer
from uvmshim.image.layout import ImageError
from uvmshim.image.unpack import Stopped, UnpackResult, unpack_layer
from uvmshim.image.verity import DataHasher, append_hash_tree, salt_for
from uvmshim.protocol.verity import VERITY_FILE, Verity
from uvmshim.tools import run_tool as _run_tool

LAYER_FILE = "layer.vhd"
#: Smallest layer filesystem.
MIN_FS_BYTES = 1 << 20


@dataclass(frozen=True)
class LayerResult:
    """What converting one layer produced."""

    path: Path
    diff_id: str
    tar_bytes: int
    disk_bytes: int
    entries: int
    fs_bytes: int = 0
    #: The dm-verity parameters, if the disk has a hash tree.
    verity: Verity | None = None


async def run_tool(argv: Sequence[str | os.PathLike[str]], *, stdin: bytes | None = None,
                   env: dict[str, str] | None = None) -> str:
    """Run a program; return its stdout (see :func:`uvmshim.tools.run_tool`).

    :raises ToolError: a missing program or a non-zero exit status.
    """
    return await _run_tool(argv, stdin=stdin, env=env,
                           missing_hint="install e2fsprogs and qemu-utils")


def _uuid_for(diff_id: str) -> uuid.UUID:
    """A filesystem UUID derived from the diff id: the same layer gives the same image."""
    return uuid.UUID(bytes=bytes.fromhex(diff_id.split(":", 1)[1][:32]), version=4)


#: The GIL switch interval while a layer is written (the default is 5 ms).
SWITCH_INTERVAL = 0.0005
#: glibc's malloc thresholds while a layer is written: blocks below this many bytes come from
#: the heap, and up to this many free bytes stay there (glibc's defaults are 128 KiB for both).
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_GLIBC_DEFAULT_THRESHOLD = 128 << 10
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters
_tuning_lock = threading.Lock()
_tuning_users = 0
_switch_saved = 0.0


def _set_malloc(mmap_threshold: int, trim_threshold: int, *, trim: bool = False) -> None:
    """Set glibc's malloc thresholds (nothing on another C library); with ``trim``, give the
    free heap memory back to the system."""
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    if trim and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@contextlib.contextmanager
def _tuned_for_writing() -> Iterator[None]:
    """Tune the interpreter while layers are written (process-wide, restored when the last
    one is done).

    * **The GIL switch interval** goes down to 0.5 ms. The thread parsing the tar holds the
      GIL most of the time; the threads that read, decompress, hash and write need it back
      briefly after each large GIL-free call, and with the default 5 ms interval they wait up
      to that long each time: the decompression alone was measured 2-4 times slower next to a
      busy Python thread. At 0.5 ms the import of the Debian test layer is 10-40 % faster; the
      cost is more frequent switches for any other thread.
    * **malloc keeps and reuses the chunks' memory.** Decompression makes a new buffer of up
      to 8 MiB for each chunk, and glibc would map each one afresh (zeroing every page in a
      page fault) and unmap it when freed: 150 MB of page faults for the Debian layer. Served
      from the heap, and kept there, the same memory is used again: its import takes 8 % less
      time and CPU (measured alternately, 10 rounds). Afterwards the thresholds go back to
      glibc's default values (fixed, no longer adjusted by glibc as it goes) and the free heap
      memory is given back.
    """
    global _tuning_users, _switch_saved
    with _tuning_lock:
        if _tuning_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, SWITCH_INTERVAL))
            _set_malloc(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD)
        _tuning_users += 1
    try:
        yield
    finally:
        with _tuning_lock:
            _tuning_users -= 1
            if _tuning_users == 0:
                sys.setswitchinterval(_switch_saved)
                _set_malloc(_GLIBC_DEFAULT_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD, trim=True)


def write_layer(blob: IO[bytes], image: Path, *, diff_id: str, digest: str | None,
                size: int | None, where: str, stop: threading.Event,
                on_bytes: Callable[[int], None] | None = None,
                verity: bool = True) -> tuple[UnpackResult, int, Verity | None]:
    """Write the disk image of the layer tar ``blob`` to the new file ``image`` (no footer):
    the ext4 image, and its dm-verity superblock and hash tree if ``verity``.

    :return: what was read, the disk size in bytes (CHS-exact) and the verity parameters.
    """
    with _tuned_for_writing():
        return _write_layer(blob, image, diff_id=diff_id, digest=digest, size=size,
                            where=where, stop=stop, on_bytes=on_bytes, verity=verity)


def _write_layer(blob: IO[bytes], image: Path, *, diff_id: str, digest: str | None,
                size: int | None, where: str, stop: threading.Event,
                on_bytes: Callable[[int], None] | None = None,
                verity: bool = True) -> tuple[UnpackResult, int, Verity | None]:
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    writer: Ext4Writer | None = None
    hasher: DataHasher | None = None
    try:
        if verity:
            # File data is hashed by a child process as it is written (see .verity).
            hasher = DataHasher(fd, salt_for(diff_id))
        writer = Ext4Writer(fd, fs_uuid=_uuid_for(diff_id),
                            on_written=hasher.add if hasher is not None else None)
        res = unpack_layer(blob, writer, where=where, diff_id=diff_id, digest=digest,
                           size=size, stop=stop, on_bytes=on_bytes)
        info: Verity | None = None
        try:
            if not verity:
                disk = writer.finish(lambda n: vhd.round_to_geometry(max(n, MIN_FS_BYTES)))
                return res, disk, None
            # The filesystem takes whole blocks; the hash area starts right after them.
            fs_bytes = writer.finish(lambda n: -(-max(n, MIN_FS_BYTES) // BLOCK) * BLOCK)
            info, end = append_hash_tree(fd, fs_bytes, salt=salt_for(diff_id),
                                         uuid=_uuid_for(diff_id).bytes, stop=stop,
                                         known=hasher.digests() if hasher is not None else None,
                                         stale=writer.freed)
            disk = vhd.round_to_geometry(end)
            os.ftruncate(fd, disk)
            return res, disk, info
        except VerityStopped:
            raise Stopped from None
        except Ext4Error as e:
            raise ImageError(str(e), where=where) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ImageError("no space left on device for the layer disk", where=where,
                                 hint=f"free disk space under {image.parent}") from None
            raise
    finally:
        if writer is not None:
            with contextlib.suppress(OSError):  # an error is already on its way
                writer.close()
        if hasher is not None:
            hasher.close()
        os.close(fd)


def append_footer(image: Path, size: int, diff_id: str) -> None:
    """Append the fixed-VHD footer to the raw disk image ``image`` of ``size`` bytes."""
    with open(image, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end != size:
            raise ImageError(f"disk image is {end} bytes, expected {size}", where=str(image))
        f.write(vhd.footer(size, unique_id=_uuid_for(diff_id).bytes))
        f.flush()
        os.fsync(f.fileno())


async def convert_layer(open_blob: Callable[[], IO[bytes]], dest_dir: Path, *, diff_id: str,
                        digest: str | None = None, size: int | None = None,
                        where: str = "layer",
                        on_bytes: Callable[[int], None] | None = None,
                        verity: bool = True) -> LayerResult:
    """Convert one layer blob into ``dest_dir/layer.vhd`` (and, with ``verity``, its
    dm-verity parameters into ``dest_dir/verity.json``).

    ``dest_dir`` must be an empty directory on the filesystem that will hold the layer. On any
    error the caller removes ``dest_dir``.

    :param open_blob: opens the (gzip/zstd-compressed or plain) layer tar for reading.
    :param on_bytes: called on the event loop with the number of blob bytes read, as they are.
    :raises ImageError: a bad layer (corrupt, unsafe entry, digest mismatch, no space).
    """
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    image = dest_dir / LAYER_FILE

    def report(n: int) -> None:
        if on_bytes is not None:
            loop.call_soon_threadsafe(on_bytes, n)

    def work() -> tuple[UnpackResult, int, Verity | None]:
        with open_blob() as blob:
            return write_layer(blob, image, diff_id=diff_id, digest=digest, size=size,
                               where=where, stop=stop, on_bytes=report, verity=verity)

    fut = loop.run_in_executor(None, work)
    try:
        res, disk_size, info = await asyncio.shield(fut)
    except asyncio.CancelledError:
        # The thread cannot be cancelled: ask it to stop, and wait, so that nobody removes the
        # image under its feet.
        stop.set()
        with contextlib.suppress(Stopped, Exception):
            await fut
        raise
    await asyncio.to_thread(append_footer, image, disk_size, diff_id)
    if info is not None:
        write_verity_file(dest_dir, info)
    disk = os.stat(image).st_blocks * 512
    return LayerResult(path=image, diff_id=diff_id, tar_bytes=res.tar_bytes, disk_bytes=disk,
                       entries=res.entries,
                       fs_bytes=info.data_bytes if info is not None else disk_size,
                       verity=info)


def write_verity_file(folder: Path, info: Verity) -> None:
    """Write ``folder/verity.json`` (the layer's dm-verity parameters), atomically."""
    tmp = folder / f".{VERITY_FILE}.tmp"
    tmp.write_text(json.dumps(info.to_json(), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / VERITY_FILE)
