"""Pods: several containers in one utility VM, as hcsshim runs hypervisor-isolated pods.

The pod's *sandbox* container (CRI type ``sandbox``) comes first and runs a pause process;
*workload* containers (type ``container`` with the sandbox's id) join its UVM. They share the
pod's ``sandbox://`` and ``hugepages://`` directories, a disk two of them mount is attached
once, and the sandbox's layers belong to the UVM and go away with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace

from uvmshim.allocator import ANNOTATION_CONTAINER_TYPE, ANNOTATION_SANDBOX_ID
from uvmshim.errors import ReleaseError, UvmshimError
from uvmshim.runtime.container import Container
from uvmshim.runtime.specgen import RunOptions, build_spec
from uvmshim.runtime.vm import QemuUvm, start_uvm
from uvmshim.spec import Spec
from uvmshim.uvm.network import ANNOTATION_NETWORK, ANNOTATION_PUBLISH, ready_nic_netns
from uvmshim.uvm.options import UvmOptions

log = logging.getLogger(__name__)

#: The pause process: sleeps until told to stop.
PAUSE_ARGS = ("sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done")


def pause_spec(rootfs: str, *, network: str = "none", publish: Sequence[str] = ()) -> Spec:
    """A sandbox spec that runs :data:`PAUSE_ARGS` from a rootfs directory holding a shell,
    on ``network`` (``none`` or ``nat``) with the ports ``publish`` (``-p`` values)."""
    return build_spec(RunOptions(args=PAUSE_ARGS, rootfs=rootfs, hostname="pod",
                                 network=network, publish=publish))


def _annotate(spec: Spec, kind: str, sandbox_id: str,
              sandbox: Mapping[str, str] | None = None) -> Spec:
    """``spec`` as a CRI ``kind`` of pod ``sandbox_id``; a workload is on the sandbox's
    user-mode network (its annotations ``sandbox``: one network namespace per pod, whose
    ports the sandbox published) and on no other."""
    annotations = dict(spec.annotations)
    if sandbox is not None:
        annotations.pop(ANNOTATION_NETWORK, None)
        annotations.pop(ANNOTATION_PUBLISH, None)
        if ANNOTATION_NETWORK in sandbox:
            annotations[ANNOTATION_NETWORK] = sandbox[ANNOTATION_NETWORK]
    annotations.update({ANNOTATION_CONTAINER_TYPE: kind, ANNOTATION_SANDBOX_ID: sandbox_id})
    return replace(spec, annotations=annotations)


class Pod:
    """A pod in a running UVM. Use :func:`run_pod`, which boots the UVM and cleans up."""

    def __init__(self, uvm: QemuUvm, pod_id: str) -> None:
        self.uvm = uvm
        self.id = pod_id
        self.sandbox: Container | None = None
        self.containers: dict[str, Container] = {}
        #: Removals in progress: a second ``remove_container`` (the client went away while the
        #: pod stops) waits for the first instead of releasing the same resources again.
        self._removing: dict[str, asyncio.Future[None]] = {}

    async def start_sandbox(self, spec: Spec) -> Container:
        """Create and start the sandbox container (its id is the pod's id)."""
        if self.sandbox is not None:
            raise UvmshimError(f"pod {self.id} already has its sandbox")
        sandbox = Container(self.uvm.vm, self.uvm.agent, self.id,
                            _annotate(spec, "sandbox", self.id))
        await sandbox.create()
        try:
            await sandbox.start()
        except BaseException:
            await sandbox.delete()
            raise
        self.sandbox = sandbox
        return sandbox

    async def add_container(self, container_id: str, spec: Spec, *,
                            stdin: bool = False) -> Container:
        """Create a workload container in the pod (not started yet)."""
        if self.sandbox is None:
            raise UvmshimError(f"pod {self.id} has no sandbox yet")
        if container_id in self.containers or container_id == self.id:
            raise UvmshimError(f"pod {self.id} already has a container {container_id}")
        container = Container(self.uvm.vm, self.uvm.agent, container_id,
                              _annotate(spec, "container", self.id,
                                        self.sandbox.spec.annotations))
        await container.create(stdin=stdin)
        self.containers[container_id] = container
        return container

    async def remove_container(self, container_id: str) -> None:
        """Delete a workload container (killing it if it runs) and release its resources.

        One removal at a time per container: a call while another is under way waits for it
        (and shares its outcome). The removal goes on if the caller is cancelled.
        """
        removal = self._removing.get(container_id)
        if removal is None:
            container = self.containers.get(container_id)
            if container is None:
                raise UvmshimError(f"pod {self.id} has no container {container_id}")
            removal = asyncio.ensure_future(self._remove(container_id, container))
            self._removing[container_id] = removal
            removal.add_done_callback(lambda _f: self._removing.pop(container_id, None))
        await asyncio.shield(removal)

    async def _remove(self, container_id: str, container: Container) -> None:
        await container.delete()  # a ReleaseError keeps it listed: a retry releases the rest
        self.containers.pop(container_id, None)

    async def stop(self) -> None:
        """Remove every workload container (newest first), then the sandbox and its layers."""
        errors: list[BaseException] = []
        for cid in reversed(list(self.containers)):
            if cid not in self.containers and cid not in self._removing:
                continue  # removed meanwhile (its client went away)
            try:
                await self.remove_container(cid)
            except ReleaseError as err:
                errors.extend(err.errors)
        if self.sandbox is not None:
            try:
                await self.sandbox.delete()
                self.sandbox = None
            except ReleaseError as err:
                errors.extend(err.errors)
        try:
            await self.uvm.vm.release_owned()
        except ReleaseError as err:
            errors.extend(err.errors)
        if errors:
            raise ReleaseError(f"failed to stop pod {self.id}", errors)


@contextlib.asynccontextmanager
async def run_pod(pod_id: str, sandbox_spec: Spec, *, memory_mb: int = 512,
                  cpus: int | None = None, options: UvmOptions | None = None,
                  progress: Callable[[str], None] | None = None) -> AsyncIterator[Pod]:
    """Boot a UVM with the pod's sandbox running; stop the pod and the UVM on the way out."""
    async with start_uvm(options or UvmOptions.from_annotations(sandbox_spec.annotations),
                         memory_mb=memory_mb, cpus=cpus, progress=progress,
                         netns=ready_nic_netns(sandbox_spec.linux)) as uvm:
        pod = Pod(uvm, pod_id)
        try:
            await pod.start_sandbox(sandbox_spec)
            yield pod
        finally:
            try:
                await pod.stop()
            except ReleaseError as err:
                log.warning("%s", err)
