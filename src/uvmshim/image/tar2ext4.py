"""A layer tar → ``layer.vhd``: an ext4 filesystem image with a fixed VHD footer.

The steps, and why each is done this way:

1. **Unpack** the tar into a staging directory (:mod:`uvmshim.image.unpack`, in a worker thread,
   verifying the blob digest and diff id while streaming).
2. **Measure** the staged tree and size the filesystem from it (data blocks, directory blocks,
   inode tables, plus headroom), rounded up to an exact CHS size (:mod:`uvmshim.image.vhd`).
3. **``mkfs.ext4 -d``** copies the tree into a sparse image file. e2fsprogs 1.47 preserves
   regular files, directories, symlinks (incl. their mtimes), hard links, device nodes, fifos,
   modes incl. setuid/setgid/sticky, uid/gid, xattrs (``trusted.*``, ``security.*``, ``user.*``,
   also on the root) and whole-second mtimes. It does **not** copy the root directory's own
   mode, owner and mtime (set with ``-E root_owner`` and a ``debugfs -w`` fix-up below), it
   adds a ``/lost+found`` the layer does not have (removed by the same fix-up, or every
   container would show it), and it drops sub-second timestamps (a known gap). No journal
   (the layer is mounted read-only with ``noload``), no reserved blocks and no resize inode:
   all of it would be wasted space.
4. **Footer**: append the 512-byte fixed-VHD footer; QEMU's ``vpc`` driver then reads the file
   as a disk of exactly the ext4 image's size.

If ``mkfs.ext4`` runs out of room (the estimate is a heuristic), it is retried with more space.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from uvmshim.errors import ToolError
from uvmshim.image import vhd
from uvmshim.image.layout import ImageError
from uvmshim.image.unpack import RootAttrs, Stopped, UnpackResult, unpack_layer
from uvmshim.run import run_tool as _run_tool

log = logging.getLogger(__name__)

LAYER_FILE = "layer.vhd"
BLOCK = 4096
INODE_SIZE = 256
#: Smallest layer filesystem; ext4 needs a few groups' worth of metadata to be useful.
MIN_FS_BYTES = 2 << 20
_MKFS_ATTEMPTS = 3


@dataclass(frozen=True)
class LayerResult:
    """What converting one layer produced."""

    path: Path
    diff_id: str
    tar_bytes: int
    disk_bytes: int
    entries: int


# External programs --------------------------------------------------------------------------


async def run_tool(argv: Sequence[str | os.PathLike[str]], *, stdin: bytes | None = None,
                   env: dict[str, str] | None = None) -> str:
    """Run a program; return its stdout (see :func:`uvmshim.run.run_tool`).

    :raises ToolError: a missing program or a non-zero exit status.
    """
    return await _run_tool(argv, stdin=stdin, env=env,
                           missing_hint="install e2fsprogs and qemu-utils")


# Sizing ---------------------------------------------------------------------------------------


@dataclass
class TreeSize:
    inodes: int = 0
    blocks: int = 0


def measure(root: Path) -> TreeSize:
    """Blocks and inodes ``mkfs.ext4 -d`` will need for the tree at ``root`` (an estimate)."""
    size = TreeSize(inodes=1, blocks=1)
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        names = dirnames + filenames
        # Directory entries: 8 bytes + name, 4-aligned; plus "." and "..".
        dirent = 24 + sum(8 + (len(n.encode("utf-8", "surrogateescape")) + 3) // 4 * 4
                          for n in names)
        size.blocks += -(-dirent // (BLOCK - 64))
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            size.inodes += 1
            if stat.S_ISREG(st.st_mode):
                blocks = -(-st.st_size // BLOCK)
                # Extent tree blocks for files with many extents; mkfs allocates contiguously.
                size.blocks += blocks + blocks // 2048
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                size.blocks += 1  # a "slow" symlink: the target does not fit in the inode
            with contextlib.suppress(OSError):
                xattrs = os.listxattr(os.path.join(dirpath, n), follow_symlinks=False)
                if xattrs:
                    size.blocks += 1  # at worst, one external xattr block per inode
    return size


def fs_bytes(tree: TreeSize, attempt: int = 0) -> tuple[int, int]:
    """Filesystem size (bytes, CHS-exact) and inode count for ``tree``, growing by attempt."""
    inodes = tree.inodes + tree.inodes // 8 + 64
    blocks = tree.blocks + tree.blocks // 16
    itable = -(-inodes * INODE_SIZE // BLOCK)
    groups = -(-(blocks + itable) // 32768)
    # Per group: bitmaps, descriptors, superblock backups; plus lost+found and the root.
    total = blocks + itable + groups * 8 + 64
    total = int(total * (1.5 ** attempt))
    return vhd.round_to_geometry(max(total * BLOCK, MIN_FS_BYTES)), int(inodes * 1.5 ** attempt)


def _uuid_for(diff_id: str) -> uuid.UUID:
    """A filesystem UUID derived from the diff id: the same layer gives the same image."""
    return uuid.UUID(bytes=bytes.fromhex(diff_id.split(":", 1)[1][:32]), version=4)


async def make_ext4(stage: Path, image: Path, *, diff_id: str, root: RootAttrs,
                    where: str) -> int:
    """``mkfs.ext4 -d stage`` into ``image`` (a new file), sized from the tree; fix the root.

    :return: the filesystem size in bytes.
    """
    tree = await asyncio.to_thread(measure, stage)
    fs_uuid = str(_uuid_for(diff_id))
    for attempt in range(_MKFS_ATTEMPTS):
        size, inodes = fs_bytes(tree, attempt)
        with open(image, "wb") as f:
            f.truncate(size)  # sparse: only what mkfs writes takes disk space
        try:
            await run_tool([
                "mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE),
                "-N", str(inodes), "-m", "0", "-O", "^has_journal,^resize_inode",
                "-U", fs_uuid, "-E", f"root_owner={root.uid}:{root.gid},hash_seed={fs_uuid},"
                "lazy_itable_init=0", "-d", stage, image])
            break
        except ToolError as e:
            if not any(w in e.stderr.lower() for w in ("allocate", "space", "inode", "full")):
                raise
            if shutil.disk_usage(image.parent).free < size:
                # The host is full, not our filesystem estimate: a bigger one won't help.
                raise ImageError("no space left on device for the layer disk", where=where,
                                 hint=f"free disk space under {image.parent}") from e
            if attempt == _MKFS_ATTEMPTS - 1:
                e.wrap(f"{where}: the layer does not fit the estimated filesystem size")
                raise
            log.debug("%s: mkfs.ext4 needs more than %d bytes; retrying", where, size)
    cmds = []
    if not (stage / "lost+found").exists():
        # mkfs made it, the layer did not have it: the container must not see /lost+found.
        # A read-only layer never needs one (e2fsck -fn agrees).
        cmds.append("rmdir /lost+found")
    if root.mode != 0o755:
        cmds.append(f"sif / mode 0{stat.S_IFDIR | root.mode:o}")
    if root.mtime is not None:
        cmds.append(f"sif / mtime @{root.mtime}")
    if cmds:
        await run_tool(["debugfs", "-w", "-f", "-", image],
                       stdin=("\n".join(cmds) + "\n").encode())
    return size


def append_footer(image: Path, size: int, diff_id: str) -> None:
    """Append the fixed-VHD footer to the raw disk image ``image`` of ``size`` bytes."""
    with open(image, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end != size:
            raise ImageError(f"disk image is {end} bytes, expected {size}", where=str(image))
        f.write(vhd.footer(size, unique_id=_uuid_for(diff_id).bytes))
        f.flush()
        os.fsync(f.fileno())


# The whole conversion -------------------------------------------------------------------------


async def convert_layer(open_blob: Callable[[], IO[bytes]], dest_dir: Path, *, diff_id: str,
                        digest: str | None = None, size: int | None = None,
                        where: str = "layer",
                        on_bytes: Callable[[int], None] | None = None) -> LayerResult:
    """Convert one layer blob into ``dest_dir/layer.vhd``.

    ``dest_dir`` must be an empty directory on the filesystem that will hold the layer; the
    staging tree is made (and removed) inside it. On any error the caller removes ``dest_dir``.

    :param open_blob: opens the (gzip-compressed or plain) layer tar for reading.
    :param on_bytes: called on the event loop with the number of blob bytes read, as they are.
    :raises ImageError: a bad layer (corrupt, unsafe entry, digest mismatch, no space).
    :raises ToolError: ``mkfs.ext4`` or ``debugfs`` failed.
    """
    stage = dest_dir / "stage"
    stage.mkdir()
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def report(n: int) -> None:
        if on_bytes is not None:
            loop.call_soon_threadsafe(on_bytes, n)

    def work() -> UnpackResult:
        with open_blob() as blob:
            return unpack_layer(blob, stage, where=where, diff_id=diff_id, digest=digest,
                                size=size, stop=stop, on_bytes=report)

    fut = loop.run_in_executor(None, work)
    try:
        res = await asyncio.shield(fut)
    except asyncio.CancelledError:
        # The thread cannot be cancelled: ask it to stop, and wait, so that nobody removes the
        # stage under its feet.
        stop.set()
        with contextlib.suppress(Stopped, Exception):
            await fut
        raise
    image = dest_dir / LAYER_FILE
    try:
        fs_size = await make_ext4(stage, image, diff_id=diff_id, root=res.root, where=where)
    finally:
        await asyncio.to_thread(shutil.rmtree, stage, True)
    await asyncio.to_thread(append_footer, image, fs_size, diff_id)
    disk = os.stat(image).st_blocks * 512
    return LayerResult(path=image, diff_id=diff_id, tar_bytes=res.tar_bytes, disk_bytes=disk,
                       entries=res.entries)
