"""Every value the host and the guest agent must agree on, defined once. STDLIB ONLY.

The host builds the virtual machine from these (:mod:`uvmshim.uvm.qemu.cmdline`: PCI slots, the
9p mount tag, the agent port name) and names guest paths with them (:mod:`uvmshim.guestpath`);
the agent (:mod:`uvmshim.agent`) finds devices and resolves paths with the same values. Neither
side keeps a copy: both import this module, and ``tests/test_protocol.py`` checks the QEMU
command line and the agent against it.

Also here: the small pure functions derived from the values (PCI addresses, share paths).
"""

from __future__ import annotations

import posixpath

# Section: virtual hardware ----------------------------------------------------------------------

#: ``name=`` of the ``virtserialport`` the agent listens on (``/sys/class/virtio-ports/*/name``).
AGENT_PORT_NAME = "agent"

#: PCI slots (bus 0, function 0) of the boot-time ``virtio-scsi-pci`` controllers: controller
#: ``i`` is at ``0000:00:<slot>.0``. The host must create them there; the guest finds disks
#: through these addresses because the guest-side SCSI host number is not predictable.
SCSI_CONTROLLER_PCI_SLOTS: tuple[int, ...] = (5, 6, 7, 8)

#: How many SCSI controllers a utility VM can have: one per slot above.
MAX_SCSI_CONTROLLERS = len(SCSI_CONTROLLER_PCI_SLOTS)

#: SCSI target (QMP ``scsi-id``) every disk uses; the LUN is the hcsshim LUN, channel is 0.
SCSI_TARGET = 0

#: PCI slot of the first hot-plug ``pcie-root-port`` (``rp<n>`` is at slot ``base + n``). vPMEM
#: device ``n`` sits behind ``rp<n>`` (the ``virtio-pmem-pci`` device is the port's only child);
#: /dev/pmemX numbering follows probe order, not the device number, so the guest resolves the
#: device through this address.
VPMEM_ROOT_PORT_PCI_SLOT_BASE = 0x10

#: The PCI slot of the *ready NIC*: a ``virtio-net-pci`` present from boot in a UVM started for
#: a container's network namespace (and in its template, which bound it and parked its
#: interface), which that namespace's first interface takes (``AddNic.ready``) instead of a PCI
#: hot-plug.
READY_NIC_PCI_SLOT = 0x9
#: Its MAC from boot (the guest gives it the endpoint's when it claims it).
READY_NIC_MAC = "52:54:00:75:76:ff"
#: The guest network namespace a template's guest makes before it is saved (with its shell
#: and ``lo`` up): the first a UVM asks for (the host numbers them ``ns0``, ``ns1``...), so a
#: clone's first network namespace is there already.
READY_NETNS_ID = "ns0"
#: The ready NIC's interface while it is parked in that namespace (``ParkReadyNic``).
READY_NIC_IFNAME = "ready0"


def ready_nic_pci_address() -> str:
    """The guest's PCI address of the ready NIC."""
    return f"0000:00:{READY_NIC_PCI_SLOT:02x}.0"

#: How many root ports fit from the base up to the last slot of bus 0 (0x1f).
MAX_ROOT_PORTS = 0x20 - VPMEM_ROOT_PORT_PCI_SLOT_BASE

# Section: the 9p export -------------------------------------------------------------------------

#: ``mount_tag`` of the one virtio-9p export of a utility VM.
PLAN9_MOUNT_TAG = "share0"

#: Where the agent mounts the 9p export (once, lazily).
PLAN9_GUEST_ROOT = "/run/uvmshim/share0"

#: 9p mount options: ``msize=512000`` doubles throughput; ``cache=none`` so that host-side bind
#: mounts made after the guest mounted the export are seen at once.
PLAN9_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=none"

# Section: guest paths ---------------------------------------------------------------------------

#: Parent of each container's bundle directory in the UVM (hcsshim's ``/run/gcs/c``); a
#: sandbox's ``sandbox://`` and ``hugepages://`` directories live below ``<prefix>/<sandbox id>``.
CONTAINER_ROOT_PREFIX = "/run/gcs/c"
#: A mount source naming a UVM directory shared by the whole pod.
SANDBOX_MOUNT_PREFIX = "sandbox://"
#: A mount source backed by a hugetlbfs mount in the UVM.
HUGEPAGES_MOUNT_PREFIX = "hugepages://"
#: Below ``<CONTAINER_ROOT_PREFIX>/<sandbox id>``: the pod's ``sandbox://`` directories.
SANDBOX_MOUNTS_DIR = "sandboxMounts"
#: Below ``<CONTAINER_ROOT_PREFIX>/<sandbox id>``: the pod's ``hugepages://`` directories.
HUGEPAGES_DIR = "hugepages"

#: Written by the guest's /init once its early set-up (modules, entropy, loopback) is done; a
#: template VM is saved only after it exists, so that no clone repeats that work.
BOOT_DONE_MARKER = "/run/uvmshim/boot-done"

#: crun's state directory in the guest (on the /run tmpfs). The agent runs crun with it, and the
#: host passes it when it runs crun in the guest itself (``uvmshim runc`` state, benchmarks).
CRUN_ROOT = "/run/crun"

#: Where the agent keeps the network namespaces it creates (one bind-mounted file each).
GUEST_NETNS_DIR = "/run/uvmshim/netns"

#: The guest's PID 1 (``uvmshim.agent.reaper``) reaps every orphan; for a pid that has a file
#: ``<EXIT_WATCH_DIR>/<pid>`` it writes the exit status (``os.waitstatus_to_exitcode``) to
#: ``<EXIT_STATUS_DIR>/<pid>``. The agent watches the containers' init processes this way:
#: after ``crun create`` they are re-parented to PID 1, not to the agent.
EXIT_WATCH_DIR = "/run/uvmshim/watch"
EXIT_STATUS_DIR = "/run/uvmshim/exits"

#: A ``linux.namespaces[].path`` of the guest spec naming the same namespace of another
#: container's init in this UVM (``container://<id>``: a pod member joins its sandbox's);
#: the agent resolves it to ``/proc/<that init's pid>/ns/<type>``.
CONTAINER_NS_PREFIX = "container://"


# Section: derived values ------------------------------------------------------------------------


def scsi_controller_pci_address(controller: int) -> str:
    """Return the PCI address (``0000:00:05.0``) of SCSI controller ``controller``.

    :raises ValueError: if there is no such controller.
    """
    if not 0 <= controller < len(SCSI_CONTROLLER_PCI_SLOTS):
        raise ValueError(f"SCSI controller {controller} out of range")
    return f"0000:00:{SCSI_CONTROLLER_PCI_SLOTS[controller]:02x}.0"


def root_port_pci_slot(port: int) -> int:
    """Return the PCI slot of hot-plug root port ``port`` (also vPMEM device ``port``'s port).

    :raises ValueError: if there is no such port.
    """
    if not 0 <= port < MAX_ROOT_PORTS:
        raise ValueError(f"root port {port} out of range")
    return VPMEM_ROOT_PORT_PCI_SLOT_BASE + port


def vpmem_root_port_pci_address(device: int) -> str:
    """Return the PCI address of the root port that holds vPMEM device ``device``.

    :raises ValueError: if there is no such device.
    """
    if not 0 <= device < MAX_ROOT_PORTS:
        raise ValueError(f"vPMEM device {device} out of range")
    return f"0000:00:{root_port_pci_slot(device):02x}.0"


def scsi_linux_lun(lun: int) -> int:
    """Return the LUN number Linux shows for QMP ``lun``.

    Linux presents LUNs >= 256 in SAM flat-space addressing, i.e. ``0x4000 | lun``.
    """
    return lun if lun < 256 else 0x4000 | lun


def check_share_name(name: str) -> str:
    """Return ``name`` if it is a valid 9p share name (one plain path component).

    :raises ValueError: for an empty name, ``.``/``..`` or a name containing ``/`` or NUL.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid share name {name!r}")
    return name


def plan9_share_host_path(export_root: str, name: str) -> str:
    """Return where the host puts share ``name``: ``<export_root>/<name>``.

    The host bind-mounts the shared directory there; a single-file share is a directory
    ``<export_root>/<name>`` that holds just that file (bound in). Never bind over the
    export root itself: QEMU would not see it (it holds an fd to the root).
    """
    return posixpath.join(export_root, check_share_name(name))


def plan9_share_guest_path(name: str) -> str:
    """Return where the guest finds share ``name``: ``PLAN9_GUEST_ROOT/<name>``."""
    return posixpath.join(PLAN9_GUEST_ROOT, check_share_name(name))


def guest_netns_path(ns_id: str) -> str:
    """Return the guest path of network namespace ``ns_id``: ``GUEST_NETNS_DIR/<ns_id>``.

    :raises ValueError: if ``ns_id`` is not one plain path component.
    """
    if not ns_id or ns_id in (".", "..") or "/" in ns_id or "\0" in ns_id or len(ns_id) > 128:
        raise ValueError(f"invalid network namespace name {ns_id!r}")
    return posixpath.join(GUEST_NETNS_DIR, ns_id)

