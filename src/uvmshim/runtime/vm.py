"""A running QEMU utility VM, put together: boot files, QEMU, QMP, the agent, device managers.

This is the runtime layer's job (it uses :mod:`uvmshim.uvm` and never the other way round): the
machine and its host backend (:mod:`uvmshim.uvm.qemu.machine`, :mod:`uvmshim.uvm.qemu.host`),
the agent and its guest backend (:mod:`uvmshim.uvm.qemu.agent_client`,
:mod:`uvmshim.uvm.qemu.guest`) and the device managers (:class:`UtilityVM`) are assembled here.

:func:`start_uvm` is the one way to get a real UVM. It is an async context manager: whatever
happens inside (success, an error, Ctrl-C or cancellation), on the way out the UVM's own
resources are released, the guest is asked to power off, QEMU is stopped (forced after a
timeout) and the VM's sockets, host bind mounts and state directory are removed.

By default the UVM is a **clone** of the template for its machine configuration
(:mod:`uvmshim.uvm.qemu.template`), built on first use: its agent answers a fraction of a second
after QEMU started, instead of after a boot of several seconds. When there is no usable template
(templates disabled with ``template=False`` or ``$UVMSHIM_NO_TEMPLATE``, the template can't be
built, is damaged, or the clone does not come up), the UVM boots cold, with a one-line warning
if a template should have been used. Either way the agent then gets a
:class:`~uvmshim.protocol.requests.FreshStart`: fresh entropy, the host's clock, a host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from uvmshim.asyncutil import finish_despite_cancel
from uvmshim.errors import AgentConnectionError, BackendError, ReleaseError, UvmshimError
from uvmshim.protocol.requests import FreshStart
from uvmshim.uvm import hostnet
from uvmshim.uvm.bootfiles import BootFiles, ensure_boot_files
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.qemu.agent_client import AgentClient
from uvmshim.uvm.qemu.config import QemuConfig
from uvmshim.uvm.qemu.guest import AgentGuestBackend
from uvmshim.uvm.qemu.host import QemuHostBackend
from uvmshim.uvm.qemu.machine import QemuMachine
from uvmshim.uvm.qemu.snapshot import load_state
from uvmshim.uvm.qemu.template import (
    TemplateError,
    discard,
    ensure_template,
    resolve_key,
    templates_disabled,
)
from uvmshim.uvm.sizing import default_cpus
from uvmshim.uvm.utilityvm import UtilityVM

log = logging.getLogger(__name__)

#: How long the guest agent may take to answer after QEMU started (TCG boots in 2–3 s).
AGENT_TIMEOUT = 60.0
#: How long a graceful shutdown may take before QEMU is killed.
SHUTDOWN_TIMEOUT = 10.0
#: How long a clone's agent may take to answer (it answers in ~0.2 s; a slow host, more).
CLONE_AGENT_TIMEOUT = 20.0
#: Bytes of host entropy each VM gets at its fresh start.
FRESH_ENTROPY_BYTES = 64


@dataclass
class QemuUvm:
    """A running utility VM: ``vm`` is what the allocator uses, ``agent`` talks to the guest."""

    machine: QemuMachine
    agent: AgentClient
    guest: AgentGuestBackend
    host: QemuHostBackend
    vm: UtilityVM
    boot: BootFiles
    #: The key of the template this VM was cloned from; None for a cold boot.
    template: str | None = None

    @property
    def id(self) -> str:
        return self.vm.id


def machine_config(boot: BootFiles, options: UvmOptions, *, memory_mb: int = 512,
                   cpus: int | None = None, ready_nic: bool = False) -> QemuConfig:
    """The QEMU machine :func:`start_uvm` runs for ``options`` (``cpus`` None:
    :func:`~uvmshim.uvm.sizing.default_cpus`); ``ready_nic`` for a VM started with the tap of
    its ready NIC (its template is another: one whose ready NIC is bound and parked)."""
    return QemuConfig(
        kernel=boot.kernel, initrd=boot.initrd, memory_mb=memory_mb,
        cpus=default_cpus() if cpus is None else cpus,
        scsi_controllers=options.scsi_controller_count,
        vpmem_slots=options.effective_vpmem_count,
        hotplug_ports=max(4, options.effective_vpmem_count),
        ready_nic=ready_nic,
    )


async def build_template(options: UvmOptions | None = None, *, memory_mb: int = 512,
                         cpus: int | None = None, rebuild: bool = False,
                         progress: Callable[[str], None] | None = None,
                         ready_nic: bool = False) -> str:
    """Build (or find) the template :func:`start_uvm` clones for these settings (``ready_nic``:
    when started with a network namespace); return its key.

    :raises TemplateError: it could not be built.
    """
    boot = await ensure_boot_files(progress=progress)
    config = machine_config(boot, options or UvmOptions(), memory_mb=memory_mb, cpus=cpus,
                            ready_nic=ready_nic)
    key = await resolve_key(config, boot)
    files = await ensure_template(key, boot, progress=progress, rebuild=rebuild)
    files.close()
    return key.key


@contextlib.asynccontextmanager
async def start_uvm(
    options: UvmOptions | None = None,
    *,
    memory_mb: int = 512,
    cpus: int | None = None,
    vm_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    template: bool | None = None,
    netns: str = "",
) -> AsyncIterator[QemuUvm]:
    """Start a utility VM (a clone of its template, or a cold boot) and yield it; tear
    everything down on the way out.

    :param options: device limits (SCSI controllers, vPMEM); default: 4 SCSI controllers.
    :param cpus: vCPUs; default: :func:`~uvmshim.uvm.sizing.default_cpus`.
    :param progress: called with a short message at each step (boot files, template, booting,
        ready).
    :param template: clone from a template (building it on first use); ``False`` boots cold;
        ``None`` (default): clone unless ``$UVMSHIM_NO_TEMPLATE`` is set.
    :param netns: the host network namespace the VM's containers will be connected to (the
        spec's): its first interface gets the ready NIC, whose tap is made in it now, before
        QEMU starts (a driver bind in the guest instead of a PCI hot-plug). If that fails, the
        VM starts without it, and connecting reports the namespace's problem.
    :raises UvmshimError: the boot files could not be built or the VM did not come up;
        nothing is left running.
    """
    say = progress or (lambda _m: None)
    opts = options or UvmOptions()
    boot = await ensure_boot_files(progress=say)
    tap = await _ready_tap(netns) if netns else None
    config = machine_config(boot, opts, memory_mb=memory_mb, cpus=cpus,
                            ready_nic=tap is not None)
    agent: AgentClient | None = None

    async def power_off() -> None:
        if agent is None or agent.closed:
            # Nobody in the guest to ask (still booting): no graceful way; QEMU is killed
            # at once rather than after the shutdown timeout (Ctrl-C during boot).
            raise BackendError("no guest agent connection to power off with")
        await AgentGuestBackend(agent).shutdown()

    machine: QemuMachine | None = None
    key: str | None = None
    if template is None:
        template = not templates_disabled()
    try:
        if template:
            started = await _start_clone(config, boot, vm_id, power_off, say, tap)
            if started is not None:
                machine, agent, key = started
        if machine is None:
            machine = QemuMachine(config, vm_id=vm_id, on_shutdown=power_off,
                                  nic_fd=None if tap is None else tap.fd)
            say("booting the utility VM")
            await machine.launch()
    except BaseException:
        if tap is not None:
            await finish_despite_cancel(_drop_ready_tap(tap))
        raise
    if tap is not None:
        tap.close_fd()  # QEMU has it
    uvm: QemuUvm | None = None
    try:
        if agent is None:
            agent = await AgentClient.connect(machine.agent_socket_path, timeout=AGENT_TIMEOUT)
            await fresh_start(agent, machine.vm_id)
        host = QemuHostBackend(machine, ready_tap=tap)
        guest = AgentGuestBackend(agent)
        vm = UtilityVM(machine.vm_id, host, guest, opts)
        uvm = QemuUvm(machine, agent, guest, host, vm, boot, key)
        say("utility VM ready")
        yield uvm
    finally:
        try:
            await _stop(machine, agent, uvm)
        finally:
            if tap is not None:
                # Gone with QEMU's descriptor; its redirects, if a release left them, now.
                await finish_despite_cancel(_drop_ready_tap(tap))


async def _ready_tap(netns: str) -> hostnet.Plumbing | None:
    """The ready NIC's tap in ``netns``, or None (with a debug line) if it can't be made."""
    try:
        tap = await hostnet.make_tap(netns, hostnet.READY_TAP)
    except UvmshimError as err:
        log.debug("no ready NIC for %s: %s", netns, err)
        return None
    hostnet.preload_netlink()  # while QEMU starts: connecting the tap needs it
    return tap


async def _drop_ready_tap(tap: hostnet.Plumbing) -> None:
    try:
        await hostnet.unplumb(tap)
    except UvmshimError as err:
        log.warning("removing the ready NIC's tap: %s", err)


async def fresh_start(agent: AgentClient, vm_id: str) -> None:
    """Give the guest fresh entropy, the host's wall clock and its host name (the VM id)."""
    await agent.request(FreshStart(entropy=os.urandom(FRESH_ENTROPY_BYTES),
                                   time_ns=time.time_ns(), hostname=vm_id[:63]))


async def _start_clone(
    config: QemuConfig, boot: BootFiles, vm_id: str | None,
    power_off: Callable[[], Awaitable[None]], say: Callable[[str], None],
    tap: hostnet.Plumbing | None = None,
) -> tuple[QemuMachine, AgentClient, str] | None:
    """A running clone of the template for ``config`` with its agent ready and fresh-started,
    or None (after a one-line warning) if there is no usable template: the caller boots cold."""
    try:
        key = await resolve_key(config, boot)
        files = await ensure_template(key, boot, progress=say, retry_failed=False)
    except (TemplateError, OSError) as err:
        log.warning("no UVM template, booting cold: %s", err)
        return None
    machine: QemuMachine | None = None
    agent: AgentClient | None = None
    try:
        machine = QemuMachine(
            dataclasses.replace(key.config, kernel=boot.kernel, initrd=boot.initrd, ram="clone"),
            vm_id=vm_id, on_shutdown=power_off, ram_fd=files.ram_fd,
            nic_fd=None if tap is None else tap.fd)
        say("starting the utility VM from its template")
        await machine.launch()
        # Connect and send hello while the state loads: the request is waiting when the guest
        # runs (QEMU tells the guest that the port's host side is open once the state is in).
        connecting = asyncio.create_task(
            AgentClient.connect(machine.agent_socket_path, timeout=CLONE_AGENT_TIMEOUT))
        try:
            await load_state(machine, files.state_fd)
        except BaseException:
            connecting.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await connecting
            raise
        agent = await connecting
        await fresh_start(agent, machine.vm_id)
        return machine, agent, key.key
    except BackendError as err:
        log.warning("the clone of UVM template %s did not come up, booting cold: %s",
                    key.key, err)
        await _stop_failed_clone(machine, agent)
        if not isinstance(err, AgentConnectionError):
            # QEMU refused the template's state: never use that template again.
            discard(files.path)
        return None
    except BaseException:
        await _stop_failed_clone(machine, agent)
        raise
    finally:
        files.close()


async def _stop_failed_clone(machine: QemuMachine | None, agent: AgentClient | None) -> None:
    async def stop() -> None:
        if agent is not None:
            await agent.close()
        if machine is not None:
            try:
                await machine.shutdown(timeout=0)
            except BackendError as err:
                log.warning("stopping the failed clone: %s", err)

    await finish_despite_cancel(stop())


async def _stop(machine: QemuMachine, agent: AgentClient | None, uvm: QemuUvm | None) -> None:
    # Shielded as a whole: a second Ctrl-C must not leave QEMU, mounts or sockets behind.
    async def stop() -> None:
        clean = False
        if uvm is not None:
            try:
                await uvm.vm.release_owned()
                clean = _holds_nothing_to_write_back(uvm.vm)
            except ReleaseError as err:
                log.warning("releasing the UVM's resources: %s", err)
        try:
            # Nothing of the host's is mounted in the guest any more (every disk and share was
            # unmounted, so written back): QEMU may just quit. Otherwise the guest powers off,
            # syncing what it still holds.
            await machine.shutdown(timeout=SHUTDOWN_TIMEOUT, graceful=not clean)
        finally:
            if agent is not None:
                await agent.close()

    task = asyncio.ensure_future(stop())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _holds_nothing_to_write_back(vm: UtilityVM) -> bool:
    """Whether the guest has no disk, share or NIC of the host left (vPMEM devices are
    read-only layers, which QEMU 7.2 cannot unplug: they do not count)."""
    held = vm.inventory()
    return not any(items for kind, items in held.items() if kind != "vpmem")
