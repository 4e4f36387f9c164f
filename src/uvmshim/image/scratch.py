"""A container's scratch disk: ``<scratch folder>/sandbox.vhdx``, an empty ext4 filesystem.

The format is a **real, dynamic VHDX**, as containerd creates for LCOW, because it is cheap:
``mkfs.ext4`` formats a sparse raw file (a few MB actually written), and ``qemu-img convert``
copies only the non-zero clusters into a dynamic VHDX: 10 GiB take ~0.15 s and 5.5 MB of disk
(260 MB apparent size: QEMU's default 16 MiB VHDX blocks, themselves sparse). QEMU's block-size
default is kept on purpose: smaller blocks would shrink the apparent size but make the guest's
first writes update the BAT (through the VHDX log) 16 times as often. The guest's overlay
upper/work directories live on it (trusted.* xattrs for whiteouts: ext4 has them).

Why these mkfs options: ``lazy_itable_init=0`` marks the inode tables as zeroed at mkfs time
(free on a sparse file, which reads as zeros), so the guest kernel does not spend its first
minutes zeroing them through the VHDX, growing it by ~16 MB per GiB. ``lazy_journal_init=1``
skips writing the journal's zeros for the same reason. The journal stays: this disk is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from uvmshim.image.layout import ImageError
from uvmshim.image.tar2ext4 import run_tool

SCRATCH_FILE = "sandbox.vhdx"
#: The default scratch size: hcsshim's LCOW default is 20 GB; 10 GiB is plenty for most
#: containers, and the disk is sparse, so unused space costs nothing.
DEFAULT_SCRATCH_BYTES = 10 << 30
#: The smallest useful ext4 with a journal.
MIN_SCRATCH_BYTES = 64 << 20


async def create_scratch(folder: str | os.PathLike[str], size_bytes: int = DEFAULT_SCRATCH_BYTES,
                         *, overwrite: bool = False) -> Path:
    """Create ``folder/sandbox.vhdx``: a dynamic VHDX holding an empty ext4 of ``size_bytes``.

    ``folder`` is created if missing. The file appears atomically (written to a temporary name,
    then renamed), so a failure leaves nothing behind.

    :param size_bytes: the virtual disk size, rounded up to a whole MiB.
    :param overwrite: replace an existing ``sandbox.vhdx`` (default: refuse).
    :raises ImageError: bad size, an existing disk, or no space.
    :raises ToolError: ``mkfs.ext4`` or ``qemu-img`` failed.
    """
    if size_bytes < MIN_SCRATCH_BYTES:
        raise ImageError(f"scratch size {size_bytes} is below the minimum of "
                         f"{MIN_SCRATCH_BYTES >> 20} MiB", where="scratch")
    size = -(-size_bytes // (1 << 20)) * (1 << 20)
    dest_dir = Path(folder)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / SCRATCH_FILE
    if dest.exists() and not overwrite:
        raise ImageError("scratch disk already exists", where=str(dest),
                         hint="remove it, or pass overwrite=True")
    tmp = Path(tempfile.mkdtemp(prefix=".scratch-", dir=dest_dir))
    try:
        raw = tmp / "scratch.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        await run_tool(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "scratch",
                        "-E", "lazy_itable_init=0,lazy_journal_init=1", raw])
        vhdx = tmp / SCRATCH_FILE
        await run_tool(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vhdx",
                        "-o", "subformat=dynamic", raw, vhdx])
        os.replace(vhdx, dest)
    except OSError as e:
        raise ImageError(f"cannot create the scratch disk: {e.strerror}", where=str(dest)) from e
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return dest
