"""One container in a utility VM: hcsshim's ``CreateContainer`` flow on our UVM.

``create`` allocates the container's resources (the allocator, against the UVM's device
managers), builds the guest document and asks the guest agent to create the container with
crun from the rewritten spec; ``start`` starts it; its output arrives as it comes; ``wait``
returns the exit status; ``kill`` signals it; ``exec`` runs another process in it; ``delete``
removes it in the guest and releases every resource, newest first.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from uvmshim.allocator import Allocation, create_container_resources
from uvmshim.errors import (
    AllocationError,
    GuestError,
    LayerIntegrityError,
    ReleaseError,
    UvmshimError,
)
from uvmshim.layers import LayersHandle
from uvmshim.protocol.messages import ErrorKind
from uvmshim.protocol.requests import VerityStatus
from uvmshim.runtime.seccomp_bpf import precompile as precompile_seccomp
from uvmshim.spec import Spec
from uvmshim.uvm.qemu.agent_client import AgentClient, ContainerProcess
from uvmshim.uvm.utilityvm import UtilityVM

log = logging.getLogger(__name__)


class ContainerState(enum.Enum):
    NEW = "new"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


class Container:
    """A container in a running UVM.

    :param vm: the UVM's device managers (the allocator allocates on them).
    :param agent: the UVM's guest agent.
    :param container_id: the container id (also its directory ``/run/gcs/c/<id>``).
    :param spec: the container's OCI spec (host paths); never changed.
    """

    def __init__(self, vm: UtilityVM, agent: AgentClient, container_id: str, spec: Spec) -> None:
        self.vm = vm
        self.agent = agent
        self.id = container_id
        self.spec = spec
        self.state = ContainerState.NEW
        self.allocation: Allocation | None = None
        self.init: ContainerProcess | None = None
        self.exit_code: int | None = None
        #: Set by :meth:`wait` if dm-verity refused blocks of the container's layers.
        self.integrity_error: LayerIntegrityError | None = None
        self._execs = 0

    @property
    def sandbox_id(self) -> str:
        """The pod sandbox whose ``sandbox://`` and ``hugepages://`` directories this uses."""
        if self.allocation is not None and self.allocation.sandbox.sandbox_id:
            return self.allocation.sandbox.sandbox_id
        return self.id

    async def create(self, *, stdin: bool = False) -> None:
        """Allocate the resources and create the container in the guest (not started yet).

        :raises UvmshimError: allocation or the guest's create failed; nothing is left behind.
        """
        self.allocation = await create_container_resources(self.spec, self.vm, self.id)
        try:
            doc = self.allocation.guest_document
            if doc is None:  # only an allocation made without a UVM has none
                raise AllocationError(f"container {self.id}: no guest document to send")
            await precompile_seccomp(doc["OciSpecification"])
            self.init = await self.agent.container_create(
                self.id, doc["OciBundlePath"], doc["OciSpecification"],
                sandbox_id=self.sandbox_id, scratch_dir=doc["ScratchDirPath"], stdin=stdin)
        except BaseException:
            await self._release()
            raise
        self.state = ContainerState.CREATED

    async def start(self) -> None:
        """Start the container's init process."""
        if self.state is not ContainerState.CREATED:
            raise UvmshimError(f"container {self.id} is {self.state.value}, not created")
        await self.agent.container_start(self.id)
        self.state = ContainerState.RUNNING

    def _init_process(self) -> ContainerProcess:
        """The init process. :raise UvmshimError: the container was never created."""
        if self.init is None:
            raise UvmshimError(f"container {self.id} is {self.state.value}, not created")
        return self.init

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """The init process's ``(stream, data)`` chunks as they come, until it exits."""
        async for item in self._init_process().output():
            yield item

    async def write_stdin(self, data: bytes) -> None:
        await self._init_process().write_stdin(data)

    async def close_stdin(self) -> None:
        await self._init_process().close_stdin()

    @property
    def terminal(self) -> bool:
        """Whether the init runs on a pty (``process.terminal``): its output is one stream."""
        process = self.spec.raw.get("process")
        return isinstance(process, dict) and bool(process.get("terminal"))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the init's terminal (see :attr:`terminal`)."""
        await self._init_process().resize(rows, cols)

    @property
    def runtime_error(self) -> GuestError | None:
        """crun's own failure to run the init (labelled ``crun: ...``), once :meth:`wait`
        returned; None when the exit status is the container's own."""
        if self.init is None or not self.init.error:
            return None
        return GuestError("container_start", ErrorKind.CRUN, f"crun: {self.init.error}")

    async def wait(self) -> int:
        """Wait for the init process; return its exit status (128+N if killed by signal N).

        If crun itself failed, the status is crun's: see :attr:`runtime_error`.
        """
        code = await self._init_process().wait()
        self.exit_code = code if code >= 0 else 128 - code
        self.state = ContainerState.STOPPED
        try:
            self.integrity_error = await self.check_layers()
        except UvmshimError as err:  # the exit status stands; the check is best effort
            log.warning("container %s: cannot ask the guest about its layers: %s", self.id, err)
        return self.exit_code

    async def check_layers(self) -> LayerIntegrityError | None:
        """Ask the guest whether dm-verity refused a block of this container's layers.

        :return: an error naming each corrupt layer (its blocks read as I/O errors in the
            container), or None.
        """
        layers = self.allocation.resources.layers if self.allocation is not None else None
        verified = layers.verified_layers() if isinstance(layers, LayersHandle) else {}
        if not verified:
            return None
        found = await self.agent.request(VerityStatus(guest_paths=tuple(verified)))
        bad = [(verified[p], str(s.get("detail", ""))) for p, s in sorted(found.items())
               if p in verified and isinstance(s, dict) and s.get("corrupted")]
        if not bad:
            return None
        what = "; ".join(f"{host} ({detail})" if detail else host for host, detail in bad)
        return LayerIntegrityError(
            f"container {self.id}: dm-verity refused data of {len(bad)} layer"
            f"{'s' if len(bad) != 1 else ''}, which no longer match their root hash (reads "
            f"failed with I/O errors): {what}",
            hint="a layer disk was changed after import: remove the image and import or pull "
                 "it again")

    async def kill(self, signal: int, *, all_processes: bool = False) -> None:
        """Send ``signal`` to the init process (or every process of the container)."""
        await self.agent.container_signal(self.id, signal, all_processes=all_processes)

    async def update(self, resources: Mapping[str, Any]) -> None:
        """New cgroup limits (OCI ``linux.resources``) for the container, in the guest."""
        await self.agent.container_update(self.id, resources)

    async def stats(self) -> dict[str, str]:
        """The container's cgroup files in the guest (``cpu.stat``, ``memory.current`` ...)."""
        return await self.agent.container_stats(self.id)

    async def exec(self, process: Mapping[str, Any], *, stdin: bool = False) -> ContainerProcess:
        """Run another process (an OCI ``process`` object) in the running container."""
        if self.state is not ContainerState.RUNNING:
            raise UvmshimError(f"container {self.id} is {self.state.value}, not running")
        self._execs += 1
        return await self.agent.container_exec(self.id, f"exec{self._execs}", dict(process),
                                               stdin=stdin)

    async def delete(self, *, uvm_discarded: bool = False) -> None:
        """Remove the container in the guest (killing it if needed) and release everything.

        :param uvm_discarded: the UVM is stopped right after (``uvmshim run``): a container
            that has stopped and had a PID namespace of its own (so no process of it is left)
            is not deleted in the guest (crun's record of it and its cgroup go with the UVM);
            its resources are released all the same.
        :raises ReleaseError: some resources could not be released (they stay tracked; calling
            again retries them).
        """
        errors: list[BaseException] = []
        in_guest = self.state in (ContainerState.CREATED, ContainerState.RUNNING,
                                  ContainerState.STOPPED)
        if uvm_discarded and self.state is ContainerState.STOPPED and self._own_pid_namespace():
            in_guest = False
        if in_guest:
            try:
                await self.agent.container_delete(self.id)
            except UvmshimError as err:
                errors.append(err)
        self.state = ContainerState.DELETED
        try:
            await self._release()
        except ReleaseError as err:
            errors.extend(err.errors)
        if errors:
            raise ReleaseError(f"failed to delete container {self.id}", errors)

    def _own_pid_namespace(self) -> bool:
        namespaces = (self.spec.linux or {}).get("namespaces")
        return isinstance(namespaces, list) and any(
            isinstance(ns, dict) and ns.get("type") == "pid" and not ns.get("path")
            for ns in namespaces)

    async def _release(self) -> None:
        if self.allocation is not None:
            await self.allocation.resources.release()
