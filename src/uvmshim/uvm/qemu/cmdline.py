"""The QEMU command line of a utility VM, as a pure function of the config (no I/O).

Device map of the q35 machine (fixed, so the guest can rely on it)::

    00:03.0  virtio-serial-pci   vs0, port "agent" (chardev on a listening fd we pass)
    00:04.0  virtio-9p-pci       mount_tag share0, export root <state>/share
    00:05.0  virtio-scsi-pci     scsi0   (the guest finds disks below 0000:00:05.0)
    00:06.0  virtio-scsi-pci     scsi1
    00:07.0  virtio-scsi-pci     scsi2
    00:08.0  virtio-scsi-pci     scsi3
    00:09.0  virtio-net-pci      nic-ready (with ``ready_nic``; its tap, if any, a passed fd)
    00:10.0+ pcie-root-port      rp0, rp1, ... spare hot-plug slots (vPMEM, VFIO)

The port name, the mount tag and the SCSI and root-port slots are the guest's contract
(:mod:`uvmshim.protocol.constants`); the agent relies on them.

There is no network device (but the ready NIC, whose only possible peer is a tap passed
in), no default device (``-nodefaults``), no config file
(``-no-user-config``) and no host file other than the boot files on the command line.
"""

from __future__ import annotations

from uvmshim.protocol.constants import (
    AGENT_PORT_NAME,
    PLAN9_MOUNT_TAG,
    READY_NIC_MAC,
    READY_NIC_PCI_SLOT,
    SCSI_CONTROLLER_PCI_SLOTS,
    root_port_pci_slot,
)

from .config import (
    DEFAULT_KERNEL_ARGS,
    P9_PCI_SLOT,
    SERIAL_PCI_SLOT,
    Accel,
    MachinePaths,
    QemuConfig,
)

#: QEMU's own seccomp policy: no obsolete syscalls, no setuid/setgid, no fork/exec, no
#: scheduler/affinity changes. Defence in depth on top of the unprivileged user.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def scsi_controller_id(index: int) -> str:
    """QOM id of SCSI controller ``index`` (its bus is ``<id>.0``)."""
    return f"scsi{index}"


def root_port_id(index: int) -> str:
    """QOM id of hot-plug root port ``index``."""
    return f"rp{index}"


def kernel_cmdline(config: QemuConfig) -> str:
    """The guest kernel command line: the measured fast defaults plus ``config.kernel_args``."""
    return " ".join((*DEFAULT_KERNEL_ARGS, *config.kernel_args))


def build_argv(
    config: QemuConfig,
    paths: MachinePaths,
    *,
    accel: Accel,
    qmp_fd: int,
    agent_fd: int,
    ram_fd: int | None = None,
    nic_fd: int | None = None,
) -> list[str]:
    """Build the QEMU argv for ``config``.

    :param config: the VM description.
    :param paths: where the VM's files are (only used to name them; nothing is touched).
    :param accel: the resolved accelerator (``auto`` must be resolved first, see :mod:`.kvm`).
    :param qmp_fd: an fd QEMU inherits: our end of a connected socketpair for QMP.
    :param agent_fd: an fd QEMU inherits: a bound, listening unix socket for the agent port.
    :param ram_fd: an fd QEMU inherits: the RAM file of a template or clone (``config.ram``);
        QEMU opens it as ``/proc/self/fd/<n>`` (``memory-backend-file`` takes only a path).
    :param nic_fd: an fd QEMU inherits: the tap of the ready NIC (``config.ready_nic``). The
        device is the same without it (a template's is), so a clone with a tap runs its
        template's machine; only the peer differs, and QEMU does not migrate peers.
    :return: the argv, starting with ``config.qemu_binary``.
    """
    cpu = config.cpu_model or ("host" if accel == "kvm" else "max")
    memory = f"{config.memory_mb}M"
    if config.vpmem_slots:
        # virtio-pmem is a memory device: it needs hot-plug slots and address space beyond RAM.
        maxmem = config.memory_mb + config.vpmem_max_mb
        memory += f",slots={config.vpmem_slots},maxmem={maxmem}M"
    # fmt: off
    argv = [
        config.qemu_binary,
        "-name", "uvmshim,debug-threads=on",
        "-machine", "q35" if config.ram == "anonymous" else "q35,memory-backend=ram0",
        "-accel", accel,
        "-cpu", cpu,
        "-m", memory,
        "-smp", str(config.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", kernel_cmdline(config),
        "-chardev", f"file,id=con0,path={paths.console_log}",
        "-serial", "chardev:con0",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
        "-device", f"virtio-serial-pci,id=vs0,addr={SERIAL_PCI_SLOT:#x}",
        "-chardev", f"socket,id=agent,fd={agent_fd},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},bus=vs0.0",
        "-fsdev", (
            f"local,id=fs0,path={paths.share_dir},"
            f"security_model={config.p9_security_model},multidevs=remap"
        ),
        "-device", f"virtio-9p-pci,id=p9{PLAN9_MOUNT_TAG},fsdev=fs0,mount_tag={PLAN9_MOUNT_TAG},"
                   f"addr={P9_PCI_SLOT:#x}",
    ]
    # fmt: on
    for i in range(config.scsi_controllers):
        slot = SCSI_CONTROLLER_PCI_SLOTS[i]
        argv += ["-device", f"virtio-scsi-pci,id={scsi_controller_id(i)},addr={slot:#x}"]
    if config.ready_nic:
        nic = f"virtio-net-pci,id=nic-ready,addr={READY_NIC_PCI_SLOT:#x},mac={READY_NIC_MAC}"
        if nic_fd is not None:
            argv += ["-netdev", f"tap,id=net-ready,fd={nic_fd},vhost=off"]
            nic += ",netdev=net-ready"
        argv += ["-device", nic]
    elif nic_fd is not None:
        raise ValueError("a tap for the ready NIC, but the machine has none")
    for i in range(config.hotplug_ports):
        # One root port per slot; chassis/slot numbers must be unique on the machine.
        argv += [
            "-device",
            f"pcie-root-port,id={root_port_id(i)},bus=pcie.0,chassis={i + 1},slot={i + 1},"
            f"addr={root_port_pci_slot(i):#x}",
        ]
    if config.ram != "anonymous":
        if ram_fd is None:
            raise ValueError(f"ram={config.ram} needs the RAM file's descriptor")
        share = "on" if config.ram == "template" else "off"
        argv += [
            "-object",
            f"memory-backend-file,id=ram0,size={config.memory_mb}M,"
            f"mem-path=/proc/self/fd/{ram_fd},share={share}",
        ]
    if config.ram == "clone":
        argv += ["-incoming", "defer"]
    if config.qemu_sandbox:
        argv += ["-sandbox", QEMU_SANDBOX]
    argv += list(config.extra_args)
    return argv
