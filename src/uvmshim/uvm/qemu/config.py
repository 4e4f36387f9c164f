"""The QEMU utility VM's description (:class:`QemuConfig`) and file layout (:class:`MachinePaths`).

Both are frozen; the argv builder (:mod:`uvmshim.uvm.qemu.cmdline`) turns them into a command line
without touching the file system.

State directory layout (one private directory per VM, mode 0700, below ``base_dir``, by
default :func:`uvmshim.hostpath.vm_dir`)::

    <base>/<id>/
        console.log     the guest serial console (ttyS0)
        qemu.log        QEMU's own stderr (launch errors)
        agent.sock      virtio-serial port "agent" (created by us, listening fd passed to QEMU)
        qemu.pid        "<pid> <start time>" of the QEMU process (for leak checks)
        exports/        the real directory behind the 9p export; share mount points are made here
        share/          read-only bind mount of exports/: the 9p export root (mount_tag share0),
                        a shared mount (QEMU's namespace holds a slave copy).
                        Shares are bind mounts at share/<name> (directory) or
                        share/<name>/<file> (single-file share).
        root/           empty; QEMU's root is built on it inside QEMU's mount namespace

QMP goes over a socketpair (no socket file). QEMU runs in a mount namespace of its own
(:mod:`.mountns`) in which nothing of the host exists but ``/usr``, the boot files, ``console.log``,
``share/`` and a few device nodes; disks and vPMEM files come as descriptors over QMP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from uvmshim.protocol.constants import MAX_ROOT_PORTS, MAX_SCSI_CONTROLLERS

#: ``auto`` means: use KVM only if a short probe shows it really runs a guest, else TCG.
Accel = Literal["kvm", "tcg"]
AccelChoice = Literal["kvm", "tcg", "auto"]
SecurityModel = Literal["none", "mapped-xattr"]
#: How guest RAM is backed: QEMU's own anonymous memory (a cold boot); a file QEMU writes through
#: (``share=on``: a VM being saved as a template); or a private copy-on-write mapping of a
#: template's RAM file (``share=off``: a clone, started with ``-incoming defer``). See
#: :mod:`uvmshim.uvm.qemu.template`.
RamMode = Literal["anonymous", "template", "clone"]

#: Fixed PCI slots of the boot-time devices the guest finds by name, not by address (the agent
#: port by its name, the 9p export by its tag). The slots, the tag and the port name the guest
#: relies on are in :mod:`uvmshim.protocol.constants`.
SERIAL_PCI_SLOT = 0x3
P9_PCI_SLOT = 0x4

#: Kernel arguments measured to boot fastest under TCG (``docs/design.md``, section 4); ``panic=-1``
#: makes a guest panic end the QEMU process (``-no-reboot``) instead of hanging.
DEFAULT_KERNEL_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    "quiet",
    "cryptomgr.notests",
    "tsc=reliable",
    "no_timer_check",
    "panic=-1",
)

#: ``nobody:nogroup`` on Debian.
NOBODY = (65534, 65534)


@dataclass(frozen=True)
class QemuConfig:
    """Everything that decides the QEMU command line of one utility VM.

    :param kernel: the guest kernel (an uncompressed PVH ``vmlinux`` boots ~3 s faster under TCG).
    :param initrd: the guest initrd.
    :param memory_mb: guest RAM.
    :param cpus: guest vCPUs.
    :param accel: ``kvm``, ``tcg`` or ``auto`` (probe KVM once per host boot, see :mod:`.kvm`).
    :param scsi_controllers: number of ``virtio-scsi-pci`` controllers ``scsi0..`` (at most 4).
    :param hotplug_ports: spare ``pcie-root-port`` slots for vPMEM / VFIO hot-plug. The first
        ``vpmem_slots`` of them are reserved: vPMEM device ``n`` always sits behind ``rp<n>``.
    :param vpmem_slots: vPMEM devices (and memory hot-plug slots); 0 disables vPMEM.
    :param vpmem_max_mb: total size of all vPMEM devices together (``maxmem`` headroom).
    :param kernel_args: extra guest kernel arguments, appended to :data:`DEFAULT_KERNEL_ARGS`.
    :param run_as: ``(uid, gid)`` QEMU runs as; ``None`` keeps root (not recommended: a guest
        could then create root-owned files through a writable 9p share).
    :param p9_security_model: the 9p ``security_model``; ``none`` keeps host symlinks working.
    :param cpu_model: ``-cpu`` value; default ``max`` under TCG and ``host`` under KVM.
    :param qemu_binary: the QEMU executable.
    :param base_dir: where state directories are created; default
        :func:`uvmshim.hostpath.vm_dir`.
    :param qemu_sandbox: pass QEMU's own ``-sandbox on,...`` seccomp policy.
    :param die_with_parent: QEMU gets SIGKILL when the thread that launched it exits (so a
        crashed host process leaves no VM behind); turn off for VMs that must outlive it.
    :param private_root: run QEMU in its own mount namespace whose root holds only what it needs
        (:mod:`.mountns`); turn off only to debug (e.g. ``extra_args`` that name host files).
    :param extra_args: appended verbatim to the argv (debugging).
    :param ram: how guest RAM is backed (:data:`RamMode`); ``template`` and ``clone`` need the
        RAM file's descriptor (``QemuMachine(ram_fd=...)``), and a clone starts paused, waiting
        for its device state (``-incoming defer``).
    :param ready_nic: a ``virtio-net-pci`` present from boot at
        :data:`~uvmshim.protocol.constants.READY_NIC_PCI_SLOT` (the *ready NIC*); its tap, if
        the VM gets one, is passed at launch (``QemuMachine(nic_fd=...)``).
    """

    kernel: Path
    initrd: Path
    memory_mb: int = 512
    cpus: int = 2
    accel: AccelChoice = "auto"
    scsi_controllers: int = MAX_SCSI_CONTROLLERS
    hotplug_ports: int = 4
    vpmem_slots: int = 0
    vpmem_max_mb: int = 4096
    kernel_args: tuple[str, ...] = ()
    run_as: tuple[int, int] | None = NOBODY
    p9_security_model: SecurityModel = "none"
    cpu_model: str | None = None
    qemu_binary: str = "qemu-system-x86_64"
    base_dir: Path | None = None
    qemu_sandbox: bool = True
    die_with_parent: bool = True
    private_root: bool = True
    extra_args: tuple[str, ...] = ()
    ram: RamMode = "anonymous"
    ready_nic: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.scsi_controllers <= MAX_SCSI_CONTROLLERS:
            raise ValueError(f"scsi_controllers must be 0..{MAX_SCSI_CONTROLLERS}")
        if self.memory_mb < 64 or self.cpus < 1:
            raise ValueError("memory_mb must be >= 64 and cpus >= 1")
        if not 0 <= self.hotplug_ports <= MAX_ROOT_PORTS:
            raise ValueError(f"hotplug_ports must be 0..{MAX_ROOT_PORTS}")
        if self.vpmem_slots < 0 or (self.vpmem_slots and self.vpmem_max_mb < 2):
            raise ValueError("vpmem_slots must be >= 0 and vpmem_max_mb >= 2")
        if self.vpmem_slots > self.hotplug_ports:
            raise ValueError("vpmem_slots must not exceed hotplug_ports (one root port each)")


@dataclass(frozen=True)
class MachinePaths:
    """The files of one VM inside its private state directory (see the module docstring)."""

    state_dir: Path

    @property
    def console_log(self) -> Path:
        """The guest serial console."""
        return self.state_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's stderr."""
        return self.state_dir / "qemu.log"

    @property
    def agent_socket(self) -> Path:
        """The host end of the guest agent's virtio-serial port."""
        return self.state_dir / "agent.sock"

    @property
    def pid_file(self) -> Path:
        """``<pid> <start time>`` of QEMU, for leak checks."""
        return self.state_dir / "qemu.pid"

    @property
    def exports_dir(self) -> Path:
        """The writable directory behind the read-only export root."""
        return self.state_dir / "exports"

    @property
    def share_dir(self) -> Path:
        """The 9p export root (a read-only bind mount of :attr:`exports_dir`)."""
        return self.state_dir / "share"
