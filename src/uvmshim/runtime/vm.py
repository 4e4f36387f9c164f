"""A running QEMU utility VM, put together: boot files, QEMU, QMP, the agent, device managers.

This is the runtime layer's job (it uses :mod:`uvmshim.uvm` and never the other way round): the
machine and its host backend (:mod:`uvmshim.uvm.qemu.machine`, :mod:`uvmshim.uvm.qemu.host`),
the agent and its guest backend (:mod:`uvmshim.uvm.qemu.agent_client`,
:mod:`uvmshim.uvm.qemu.guest`) and the device managers (:class:`UtilityVM`) are assembled here.

:func:`start_uvm` is the one way to get a real UVM. It is an async context manager: whatever
happens inside (success, an error, Ctrl-C or cancellation), on the way out the UVM's own
resources are released, the guest is asked to power off, QEMU is stopped (forced after a
timeout) and the VM's sockets, host bind mounts and state directory are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from uvmshim.errors import ReleaseError
from uvmshim.uvm.bootfiles import BootFiles, ensure_boot_files
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.qemu.agent_client import AgentClient
from uvmshim.uvm.qemu.config import QemuConfig
from uvmshim.uvm.qemu.guest import AgentGuestBackend
from uvmshim.uvm.qemu.host import QemuHostBackend
from uvmshim.uvm.qemu.machine import QemuMachine
from uvmshim.uvm.utilityvm import UtilityVM

log = logging.getLogger(__name__)

#: How long the guest agent may take to answer after QEMU started (TCG boots in 2–3 s).
AGENT_TIMEOUT = 60.0
#: How long a graceful shutdown may take before QEMU is killed.
SHUTDOWN_TIMEOUT = 10.0


@dataclass
class QemuUvm:
    """A running utility VM: ``vm`` is what the allocator uses, ``agent`` talks to the guest."""

    machine: QemuMachine
    agent: AgentClient
    guest: AgentGuestBackend
    host: QemuHostBackend
    vm: UtilityVM
    boot: BootFiles

    @property
    def id(self) -> str:
        return self.vm.id


@contextlib.asynccontextmanager
async def start_uvm(
    options: UvmOptions | None = None,
    *,
    memory_mb: int = 512,
    cpus: int = 2,
    vm_id: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> AsyncIterator[QemuUvm]:
    """Boot a utility VM and yield it; tear everything down on the way out.

    :param options: device limits (SCSI controllers, vPMEM); default: 4 SCSI controllers.
    :param progress: called with a short message at each step (boot files, booting, ready).
    :raises UvmshimError: the boot files could not be built or the VM did not come up;
        nothing is left running.
    """
    say = progress or (lambda _m: None)
    opts = options or UvmOptions()
    boot = await ensure_boot_files(progress=say)
    config = QemuConfig(
        kernel=boot.kernel, initrd=boot.initrd, memory_mb=memory_mb, cpus=cpus,
        scsi_controllers=opts.scsi_controller_count,
        vpmem_slots=opts.effective_vpmem_count,
        hotplug_ports=max(4, opts.effective_vpmem_count),
    )
    agent: AgentClient | None = None

    async def power_off() -> None:
        if agent is not None and not agent.closed:
            await AgentGuestBackend(agent).shutdown()

    machine = QemuMachine(config, vm_id=vm_id, on_shutdown=power_off)
    say("booting the utility VM")
    await machine.launch()
    uvm: QemuUvm | None = None
    try:
        agent = await AgentClient.connect(machine.agent_socket_path, timeout=AGENT_TIMEOUT)
        host = QemuHostBackend(machine)
        guest = AgentGuestBackend(agent)
        vm = UtilityVM(machine.vm_id, host, guest, opts)
        uvm = QemuUvm(machine, agent, guest, host, vm, boot)
        say("utility VM ready")
        yield uvm
    finally:
        await _stop(machine, agent, uvm)


async def _stop(machine: QemuMachine, agent: AgentClient | None, uvm: QemuUvm | None) -> None:
    # Shielded as a whole: a second Ctrl-C must not leave QEMU, mounts or sockets behind.
    async def stop() -> None:
        if uvm is not None:
            try:
                await uvm.vm.release_owned()
            except ReleaseError as err:
                log.warning("releasing the UVM's resources: %s", err)
        try:
            await machine.shutdown(timeout=SHUTDOWN_TIMEOUT)
        finally:
            if agent is not None:
                await agent.close()

    task = asyncio.ensure_future(stop())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
