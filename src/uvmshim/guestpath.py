"""Every path and prefix the guest sees, in one place (hcsshim's ``internal/guestpath``).

The values are hcsshim's (d37e4c6f1), so specs and expectations written for LCOW carry over.
"""

from __future__ import annotations

import posixpath

# The values the guest agent uses too are defined once, in the host ↔ guest contract:
# the container root prefix, the ``sandbox://``/``hugepages://`` prefixes and the directories
# the guest resolves them to (``docs/design.md``, section 3), below the sandbox's root.
from uvmshim.protocol.constants import CONTAINER_ROOT_PREFIX as LCOW_ROOT_PREFIX_IN_UVM
from uvmshim.protocol.constants import HUGEPAGES_DIR as HUGEPAGES_DIR
from uvmshim.protocol.constants import HUGEPAGES_MOUNT_PREFIX as HUGEPAGES_MOUNT_PREFIX
from uvmshim.protocol.constants import SANDBOX_MOUNT_PREFIX as SANDBOX_MOUNT_PREFIX
from uvmshim.protocol.constants import SANDBOX_MOUNTS_DIR as SANDBOX_MOUNTS_DIR

#: Per-container Plan9 share path, joined under the container root (``%`` = mount index).
LCOW_MOUNT_PATH_PREFIX_FMT = "/mounts/m%d"
#: UVM-wide SCSI mount path (``%`` = the UVM mount counter).
LCOW_GLOBAL_MOUNT_PREFIX_FMT = "/run/mounts/m%d"
#: Read/write install location of a non-GPU driver disk (``%`` = a GUID).
LCOW_GLOBAL_DRIVER_PREFIX_FMT = "/run/drivers/%s"
#: Read/write install location of the GPU driver disk.
LCOW_NVIDIA_MOUNT_PATH = "/run/nvidia"
#: Guest mount path of a whole-device vPMEM layer (``%`` = device number).
LCOW_VPMEM_LAYER_PATH_FMT = "/run/layers/p%d"
#: Last path element of a container's root filesystem.
ROOTFS_PATH = "rootfs"
#: Directory under the scratch mount that holds each container's upper/work directories.
SCRATCH_DIR = "scratch"


def join(*parts: str) -> str:
    """Go's ``path.Join``: join with ``/`` and clean (``//``, ``.``, ``..``, trailing ``/``)."""
    nonempty = [p for p in parts if p]
    if not nonempty:
        return ""
    return posixpath.normpath("/".join(nonempty)).replace("//", "/")


def container_root(container_id: str) -> str:
    """``/run/gcs/c/<id>``: the container's root, also its OCI bundle path in the UVM."""
    return join(LCOW_ROOT_PREFIX_IN_UVM, container_id)


def share_path(container_root_in_uvm: str, index: int) -> str:
    """``<root>/mounts/m<i>``: where the Plan9 share of mount ``i`` is mounted."""
    return join(container_root_in_uvm, LCOW_MOUNT_PATH_PREFIX_FMT % index)


def global_mount_path(counter: int) -> str:
    """``/run/mounts/m<N>``: a UVM-wide SCSI mount path."""
    return LCOW_GLOBAL_MOUNT_PREFIX_FMT % counter


def rootfs_path(container_root_in_uvm: str) -> str:
    """``<root>/rootfs``: the container's root filesystem (the overlay mount point)."""
    return join(container_root_in_uvm, ROOTFS_PATH)


def scratch_dir(scratch_mount_path: str, container_id: str) -> str:
    """``<scratch mount>/scratch/<id>``: the container's upper/work parent directory."""
    return join(scratch_mount_path, SCRATCH_DIR, container_id)


def vpmem_layer_path(device: int) -> str:
    """``/run/layers/p<n>``: guest mount path of vPMEM device ``n``."""
    return LCOW_VPMEM_LAYER_PATH_FMT % device
