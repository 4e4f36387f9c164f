"""The allocator: hcsshim's ``CreateContainer`` resource steps and ``allocateLinuxResources``.

Given a container's OCI spec and a UVM, this mounts the layers and scratch (or shares a host
directory as the root), turns bind mounts into Plan9 shares, attaches ``virtual-disk`` and
``physical-disk`` mounts over SCSI, passes ``sandbox://`` and ``hugepages://`` through, assigns
devices, and returns a *new* spec with the paths the guest sees, plus the resources to release.

It keeps hcsshim's branch order, paths, rewrites and error texts, and does better where
``docs/design.md`` (section 6) says so: the allocation is transactional (on failure everything
allocated by the call is released and the caller's spec is untouched), the container root uses
the effective id, and without a UVM the mounts are validated and left as they are instead of
crashing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from uvmshim import guestpath
from uvmshim.devices import add_spec_guest_drivers, handle_assigned_devices
from uvmshim.errors import (
    AllocationError,
    BatchError,
    ReleaseError,
    UvmshimError,
    error_context,
    os_error_text,
)
from uvmshim.layers import mount_lcow_layers
from uvmshim.resources import ContainerResources
from uvmshim.spec import Mount, Root, Spec
from uvmshim.uvm.network import connect_network, rewrite_netns
from uvmshim.uvm.plan9 import Plan9Request
from uvmshim.uvm.utilityvm import UtilityVM

log = logging.getLogger(__name__)

MOUNT_TYPE_BIND = "bind"
MOUNT_TYPE_PHYSICAL_DISK = "physical-disk"
MOUNT_TYPE_VIRTUAL_DISK = "virtual-disk"

ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANNOTATION_PRIVILEGED = "io.microsoft.virtualmachine.lcow.privileged"


@dataclass(frozen=True)
class SandboxInfo:
    """The CRI container type and sandbox id from the annotations."""

    type: str  # "", "sandbox" or "container"
    sandbox_id: str

    @property
    def is_sandbox(self) -> bool:
        return self.type == "sandbox"


def sandbox_type_and_id(annotations: dict[str, str] | Any) -> SandboxInfo:
    """hcsshim's ``oci.GetSandboxTypeAndID``."""
    kind = annotations.get(ANNOTATION_CONTAINER_TYPE)
    sandbox_id = annotations.get(ANNOTATION_SANDBOX_ID)
    if kind is not None and kind not in ("sandbox", "container"):
        raise AllocationError(f"invalid '{ANNOTATION_CONTAINER_TYPE}': '{kind}'",
                              where=f"annotations[{ANNOTATION_CONTAINER_TYPE!r}]",
                              hint="use \"sandbox\" or \"container\"")
    if kind is not None and sandbox_id is None:
        raise AllocationError(
            f"cannot specify '{ANNOTATION_CONTAINER_TYPE}' without '{ANNOTATION_SANDBOX_ID}'",
            where="annotations")
    if sandbox_id is not None and kind is None:
        raise AllocationError(
            f"cannot specify '{ANNOTATION_SANDBOX_ID}' without '{ANNOTATION_CONTAINER_TYPE}'",
            where="annotations")
    return SandboxInfo(kind or "", sandbox_id or "")


@dataclass
class Allocation:
    """The result of :func:`create_container_resources`."""

    container_id: str
    spec: Spec  # the rewritten spec (a new object)
    resources: ContainerResources
    sandbox: SandboxInfo
    in_uvm: bool

    @functools.cached_property
    def guest_document(self) -> dict[str, Any] | None:
        """The guest's document (:func:`linux_container_document`), or None without a UVM.

        Built on first use: it is a deep copy of the whole spec, which the caller needs once
        (to send it), and building it eagerly doubles the objects a large allocation makes.
        """
        if not self.in_uvm:
            return None
        doc = linux_container_document(self.spec, self.resources.container_root_in_uvm,
                                       self.resources.lcow_scratch_path)
        if self.resources.guest_network_namespace:
            rewrite_netns(doc["OciSpecification"], self.resources.guest_network_namespace)
        return doc

    @property
    def hcsshim_document(self) -> dict[str, Any] | None:
        """The guest document as hcsshim's ``createLCOWSpec`` makes it (``uvmshim plan`` shows
        it next to :attr:`guest_document`, which this runtime sends)."""
        if not self.in_uvm:
            return None
        doc = linux_container_document(self.spec, self.resources.container_root_in_uvm,
                                       self.resources.lcow_scratch_path, hcsshim=True)
        if self.resources.guest_network_namespace:
            rewrite_netns(doc["OciSpecification"], self.resources.guest_network_namespace)
        return doc

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the result of a task in some paths, and the full
        # dataclass repr of a 10,000-mount spec costs more than allocating it.
        return f"Allocation(container_id={self.container_id!r}, resources={len(self.resources)})"


def _bind_split(source: str) -> tuple[str, str]:
    """Split a file path into (directory with its trailing separator kept, file name)."""
    cut = source.rfind("/") + 1
    return source[:cut], source[cut:]


async def allocate_linux_resources(
    spec: Spec,
    vm: UtilityVM | None,
    r: ContainerResources,
    *,
    container_id: str,
) -> Spec:
    """Allocate what ``spec`` needs in ``vm``; return the rewritten spec.

    Resources are added to ``r`` as they are allocated; the caller releases ``r`` on failure
    (:func:`create_container_resources` does). Errors keep hcsshim's wording, prefixed with
    the field they are about.
    """
    root = spec.root or Root()
    container_root = r.container_root_in_uvm
    windows = spec.windows
    if vm is not None:
        check_host_inputs(spec)
    if windows is not None and windows.layer_folders:
        if vm is not None:
            log.debug("allocateLinuxResources mounting storage")
            with error_context("failed to mount container storage",
                               where="windows.layerFolders"):
                rootfs, scratch_path, layers = await mount_lcow_layers(
                    vm, container_id, windows.layer_folders, container_root)
            root = replace(root, path=rootfs)
            # A pod sandbox's layers live as long as the UVM (hcsshim drops the closer). They
            # stay in ``r`` until the whole allocation succeeded, so that a failure releases
            # them; create_container_resources then hands them to the UVM.
            r.set_layers(layers)
            r.lcow_scratch_path = scratch_path
    elif root.path:
        if vm is not None:
            guest_rootfs = guestpath.rootfs_path(container_root)
            with error_context("adding plan9 root", where="root.path"):
                share = await vm.add_plan9(root.path, guest_rootfs, read_only=root.readonly)
            root = replace(root, path=guest_rootfs)
            r.add(share)
    else:
        raise AllocationError("must provide either Windows.LayerFolders or Root.Path",
                              where="root.path",
                              hint="set root.path to a rootfs directory, or "
                                   "windows.layerFolders to layers plus a scratch folder")

    mounts = list(spec.mounts)
    # A run of bind mounts becomes one batch of Plan9 shares (one host round, one guest
    # request); it is added before anything else is, so resources keep the spec's order.
    binds: list[tuple[int, Mount, Plan9Request]] = []
    for i, mount in enumerate(spec.mounts):
        if mount.type not in (MOUNT_TYPE_BIND, MOUNT_TYPE_PHYSICAL_DISK, MOUNT_TYPE_VIRTUAL_DISK):
            continue  # other types (tmpfs, proc, ...) pass through untouched
        if not mount.destination or not mount.source:
            field_name = "destination" if not mount.destination else "source"
            raise AllocationError(
                "invalid OCI spec - a mount must have both source and a destination: "
                + mount.go_repr(),
                where=f"mounts[{i}].{field_name}",
                hint=f"give mounts[{i}] a source and a destination",
            )
        if vm is None:
            continue
        share_path = guestpath.share_path(container_root, i)
        file_path = share_path
        read_only = mount.read_only
        try:
            if mount.type in (MOUNT_TYPE_PHYSICAL_DISK, MOUNT_TYPE_VIRTUAL_DISK):
                await _add_binds(vm, r, binds)
                physical = mount.type == MOUNT_TYPE_PHYSICAL_DISK
                # The counter is used up even when the disk turns out to be attached already.
                disk_path = guestpath.global_mount_path(vm.mount_counter())
                add = vm.add_scsi_physical_disk if physical else vm.add_scsi
                kind = "physical" if physical else "virtual"
                with error_context(f"adding SCSI {kind} disk mount {mount.go_repr()}"):
                    sm = await add(mount.source, disk_path, read_only=read_only,
                                   options=mount.options)
                r.add(sm)
                mounts[i] = replace(mount, source=sm.guest_path, type="none")
                continue
            if mount.source.startswith(guestpath.SANDBOX_MOUNT_PREFIX):
                continue  # a UVM path shared by the pod; the guest resolves it
            if mount.source.startswith(guestpath.HUGEPAGES_MOUNT_PREFIX):
                _check_hugepages(mount.source)
                continue
            host_path = mount.source
            try:
                st = os.stat(host_path)
            except OSError as err:
                raise AllocationError(
                    f"could not open bind mount target: {os_error_text('stat', err)}",
                    hint="the source of a bind mount must exist on the host",
                ) from err
            allowed: list[str] = []
            restrict = False
            if not stat.S_ISDIR(st.st_mode):
                # Share the containing directory, restricted to this one file.
                host_path, file_name = _bind_split(host_path)
                allowed.append(file_name)
                restrict = True
                file_path = guestpath.join(share_path, file_name)
            binds.append((i, mount, Plan9Request(host_path, share_path, read_only, restrict,
                                                 tuple(allowed))))
            mounts[i] = replace(mount, source=file_path)
        except UvmshimError as err:
            err.where = err.where or f"mounts[{i}]"
            raise
    if vm is not None:
        await _add_binds(vm, r, binds)

    if vm is None:
        return spec  # process isolation: validated, and left exactly as given
    new_spec = replace(spec, root=root, mounts=tuple(mounts))
    if spec.has_assigned_devices and spec.windows is not None and spec.windows.devices:
        devices, closers = await handle_assigned_devices(vm, spec.annotations,
                                                         spec.windows.devices)
        r.add(*closers)
        new_spec = replace(new_spec, windows=replace(spec.windows, devices=devices))
    return new_spec


async def _add_binds(vm: UtilityVM, r: ContainerResources,
                     binds: list[tuple[int, Mount, Plan9Request]]) -> None:
    """Add the pending bind mounts as one batch of Plan9 shares (and empty ``binds``)."""
    if not binds:
        return
    batch = list(binds)
    binds.clear()
    try:
        shares = await vm.add_plan9_batch([req for _, _, req in batch])
    except UvmshimError as err:
        # The host names the bind that failed; a guest failure is about the batch.
        k = err.index if isinstance(err, BatchError) and 0 <= err.index < len(batch) else 0
        i, mount, _ = batch[k]
        what = (f"adding plan9 mount {mount.go_repr()}" if isinstance(err, BatchError)
                or len(batch) == 1 else
                f"adding {len(batch)} plan9 mounts from {mount.go_repr()}")
        err.wrap(what)
        if err.where is None:
            err.where = f"mounts[{i}]"
            err.args = (str(err),)
        raise
    r.add(*shares)


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _check_guest_name(source: str, prefix: str) -> None:
    """A ``sandbox://`` or ``hugepages://`` path names a directory below the sandbox's: no
    ``.``/``..`` component may lead it elsewhere (the guest refuses it too, but only then)."""
    rest = source[len(prefix):]
    if any(part in (".", "..") for part in rest.split("/")):
        raise AllocationError(f"{source}: '.' and '..' are not allowed in the path",
                              hint=f"name a directory below {prefix}")


def check_host_inputs(spec: Spec) -> None:
    """Check every host path the spec names before anything is allocated, so that
    ``uvmshim plan`` (a simulated UVM) and ``uvmshim run`` (a real one) refuse the same specs
    with the same message: the root directory, bind sources (a directory or a regular file:
    not a FIFO, socket or device), ``virtual-disk`` images (a non-empty regular file), and
    ``sandbox://``/``hugepages://`` paths (no ``..``).

    :raises AllocationError: naming the field.
    """
    windows = spec.windows
    root = spec.root
    if not (windows is not None and windows.layer_folders) and root is not None and root.path:
        try:
            st = os.stat(root.path)
        except OSError as err:
            raise AllocationError(f"rootfs ({root.path}) does not exist: "
                                  f"{os_error_text('stat', err)}", where="root.path",
                                  hint="root.path must name a directory") from None
        if not stat.S_ISDIR(st.st_mode):
            raise AllocationError(f"rootfs ({root.path}) is not a directory", where="root.path",
                                  hint="root.path must name a directory")
    for i, mount in enumerate(spec.mounts):
        where = f"mounts[{i}].source"
        source = mount.source
        if not source or mount.type not in (MOUNT_TYPE_BIND, MOUNT_TYPE_VIRTUAL_DISK):
            continue
        if mount.type == MOUNT_TYPE_BIND:
            prefix = next((p for p in (guestpath.SANDBOX_MOUNT_PREFIX,
                                       guestpath.HUGEPAGES_MOUNT_PREFIX)
                           if source.startswith(p)), None)
            if prefix is not None:
                with error_context(f"mount {mount.destination}", where=where):
                    _check_guest_name(source, prefix)
                continue
            try:
                st = os.stat(source)
            except OSError:
                continue  # the allocator's own message (hcsshim's) says why
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise AllocationError(
                    f"bind mount source {source} is {_kind(st.st_mode)}: only directories and "
                    "regular files can be shared with the utility VM", where=where)
        else:
            if "://" in source:
                continue  # the allocator's own message (hcsshim's) says why
            try:
                st = os.stat(source)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise AllocationError(f"disk image {source} is {_kind(st.st_mode)}, not a "
                                      "regular file", where=where,
                                      hint="a virtual-disk source is a raw, qcow2, VHD or "
                                           "VHDX image file")
            if st.st_size == 0:
                raise AllocationError(f"disk image {source} is empty", where=where,
                                      hint="a virtual-disk source is a raw, qcow2, VHD or "
                                           "VHDX image file")


def _check_hugepages(source: str) -> None:
    prefix = guestpath.HUGEPAGES_MOUNT_PREFIX
    parts = source[len(prefix):].split("/")
    if len(parts) < 2:
        raise AllocationError(
            f"{source} mount path is invalid, expected format: "
            f"{prefix}<hugepage-size>/<hugepage-src-location>",
            hint=f"write it as {prefix}2M/<name>",
        )
    if parts[0] != "2M":
        raise AllocationError(f"only 2M (megabytes) pagesize is supported, got {parts[0]}",
                              hint=f"write it as {prefix}2M/<name>")


#: Hooks the guest's crun runs, in the container's namespaces (the host runs the others:
#: :mod:`uvmshim.runtime.hooks`).
GUEST_HOOKS = ("createContainer", "startContainer")
#: ``linux.resources`` keys that createLCOWSpec drops (its GCS owns the guest's cgroups).
HCSSHIM_DROPPED_RESOURCES = ("devices", "pids", "blockIO", "hugepageLimits", "network")
#: ``linux.resources`` keys that are not applied in the guest: ``network`` (``classID`` and
#: ``priorities`` are cgroup v1's net_cls/net_prio; the guest has cgroup v2 only).
GUEST_IGNORED_RESOURCES = ("network",)


def guest_hooks(hooks: Any, guest_root: str) -> dict[str, Any] | None:
    """The hooks the guest's crun runs: ``createContainer``, its path made to resolve in the
    container's root ``guest_root`` (crun runs it before ``pivot_root``, where the host's path
    would name the UVM's own file), and ``startContainer`` (runs after ``pivot_root``: its path
    already resolves in the container's root); None if there are none."""
    out: dict[str, Any] = {}
    for name in GUEST_HOOKS:
        entries = hooks.get(name) if isinstance(hooks, dict) else None
        if not isinstance(entries, list) or not entries:
            continue
        if name == "createContainer" and guest_root:
            entries = [{**h, "path": guest_root.rstrip("/") + "/" + h["path"].lstrip("/")}
                       if isinstance(h, dict) and isinstance(h.get("path"), str) else h
                       for h in entries]
        out[name] = entries
    return out or None


def linux_container_document(spec: Spec, container_root: str, scratch_path: str, *,
                             hcsshim: bool = False) -> dict[str, Any]:
    """The guest's document for a Linux container (hcsshim's ``createLinuxContainerDocument``).

    :param hcsshim: exactly as hcsshim's ``createLCOWSpec`` makes it (no hooks; no device,
        pids, blkio, hugepage or network resources): what ``uvmshim plan`` shows next to the
        document this runtime sends. By default the guest's crun also gets the hooks that run in
        the container's namespaces and every resource it can apply in the guest's cgroup v2
        hierarchy (only ``network`` is dropped: :data:`GUEST_IGNORED_RESOURCES`).
    """
    oci = spec.to_json()  # a fresh copy: ours to change
    oci.pop("windows", None)
    add_dev_mount(oci)
    if spec.windows is not None:
        windows: dict[str, Any] = {}
        if spec.windows.network_namespace:
            windows["network"] = {"networkNamespace": spec.windows.network_namespace}
        if spec.windows.devices is not None:
            windows["devices"] = [d.to_json() for d in spec.windows.devices]
        if windows:
            oci["windows"] = windows
    hooks = oci.pop("hooks", None)
    if not hcsshim:
        root = oci.get("root")
        kept = guest_hooks(hooks, str(root.get("path") or "") if isinstance(root, dict) else "")
        if kept:
            oci["hooks"] = kept
    linux = oci.get("linux")
    if isinstance(linux, dict):
        if "cgroupsPath" in linux:
            # A cgroup of the *host*; crun uses its default one in the guest.
            linux["cgroupsPath"] = ""
        resources = linux.get("resources")
        if isinstance(resources, dict):
            # The device rules stay even for the guest's crun: they are the container's device
            # cgroup in the guest, to which the agent appends the rules that deny the UVM's own
            # block devices (agent/confine.py).
            for key in HCSSHIM_DROPPED_RESOURCES if hcsshim else GUEST_IGNORED_RESOURCES:
                resources.pop(key, None)
        if spec.annotations.get(ANNOTATION_PRIVILEGED, "").strip().lower() in ("true", "1", "t"):
            linux.pop("seccomp", None)
    return {
        "SchemaVersion": {"Major": 2, "Minor": 1},
        "OciBundlePath": container_root,
        "OciSpecification": oci,
        "ScratchDirPath": scratch_path,
    }


#: The ``/dev`` mount of runc's and crun's spec template (``runc spec``), which
#: container engines always put in a spec.
DEV_MOUNT: dict[str, Any] = {
    "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
}


def add_dev_mount(oci: dict[str, Any]) -> None:
    """Give a spec without a ``/dev`` mount the template's ``/dev`` tmpfs, first.

    runc and crun accept such a spec and make the default device nodes in the root's ``/dev``.
    In the UVM that directory is on a 9p share or an overlay, where the container can't
    ``mknod`` (crun fails: ``mknod /dev/null: Operation not permitted``); on a tmpfs it can.
    """
    mounts = oci.get("mounts")
    if mounts is None:
        mounts = oci["mounts"] = []
    if not isinstance(mounts, list):
        return
    for m in mounts:
        if isinstance(m, dict) and isinstance(m.get("destination"), str) and \
                m["destination"].rstrip("/") == "/dev":
            return
    mounts.insert(0, dict(DEV_MOUNT, options=list(DEV_MOUNT["options"])))


_gc_pauses = 0
_gc_was_enabled = True


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector for the duration of an allocation.

    An allocation of N mounts keeps ~10·N new objects alive; the generational collector keeps
    re-traversing that growing heap, which made a 10,000-mount allocation 13–18× slower than a
    1,000-mount one instead of 10×. The allocation creates no garbage cycles worth collecting
    (reference counting frees what it drops), so the collector is paused meanwhile and turned
    back on — only if it was on, and only by the last of several concurrent allocations.
    """
    global _gc_pauses, _gc_was_enabled
    if _gc_pauses == 0:
        _gc_was_enabled = gc.isenabled()
    _gc_pauses += 1
    gc.disable()
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_was_enabled:
            gc.enable()


async def create_container_resources(
    spec: Spec, vm: UtilityVM | None, container_id: str = ""
) -> Allocation:
    """hcsshim's ``CreateContainer`` up to (not including) the guest's create, transactionally.

    :param container_id: the container id; a random GUID if empty.
    :raises UvmshimError: the spec is wrong or an allocation failed. Everything allocated by
        this call has been released by then, and ``spec`` is unchanged (it is never changed).
    """
    with _cyclic_gc_paused():
        return await _create_container_resources(spec, vm, container_id)


async def _create_container_resources(
    spec: Spec, vm: UtilityVM | None, container_id: str
) -> Allocation:
    effective_id = container_id or str(uuid.uuid4())
    r = ContainerResources(effective_id)
    try:
        if vm is not None:
            if spec.linux is None:
                raise AllocationError(
                    "the spec has no \"linux\" section; uvmshim runs Linux containers only",
                    where="linux", hint="add \"linux\": {} to config.json")
            r.container_root_in_uvm = guestpath.container_root(effective_id)
            r.add(*await add_spec_guest_drivers(vm, spec.annotations))
            network = await connect_network(vm.network, spec.linux, spec.annotations)
            if network is not None:
                r.add(network)
                r.guest_network_namespace = network.guest_path
        sandbox = sandbox_type_and_id(spec.annotations)
        if spec.windows is not None and spec.windows.has_network:
            r.network_namespace = spec.windows.network_namespace
        new_spec = await allocate_linux_resources(
            spec, vm, r, container_id=effective_id)
    except BaseException as err:
        try:
            await r.release()
        except ReleaseError as release_err:
            log.warning("rolling back a failed allocation: %s", release_err)
            err.add_note(f"cleanup after the failure also failed: {release_err}")
        raise
    if vm is not None and sandbox.is_sandbox:
        layers = r.take_layers()
        if layers is not None:
            vm.adopt(layers)
    return Allocation(effective_id, new_spec, r, sandbox, in_uvm=vm is not None)
