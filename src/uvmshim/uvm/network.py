"""Network namespaces and their endpoints in a UVM (hcsshim's ``AddNetNS`` /
``AddEndpointToNSWithID``), refcounted per host network namespace.

A container whose spec names a host network namespace (``linux.namespaces[type=network]
.path``) gets a guest network namespace holding one NIC per interface of the host one: for
each interface the host backend hot-adds a ``virtio-net-pci`` connected to it (a tap and tc
redirects, :mod:`uvmshim.uvm.hostnet`) and the guest backend configures the NIC in the guest
namespace (hcsshim's order: host, then guest; undone in reverse). A second container naming the
same host namespace (a pod's workload container naming its sandbox's) shares the guest
namespace and its NICs; they are removed when the last container lets go.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uvmshim.errors import ReleaseError, UvmError, UvmshimError
from uvmshim.protocol.constants import guest_netns_path
from uvmshim.uvm.backend import GuestBackend, HostBackend, host_then_guest
from uvmshim.uvm.hostnet import Endpoint, NetworkError, read_endpoints

log = logging.getLogger(__name__)

#: The most interfaces one network namespace may bring into a UVM.
MAX_INTERFACES = 8


@dataclass(eq=False)
class _Namespace:
    key: str
    ns_id: str
    host_path: str  # "" for user-mode networking
    nics: list[tuple[str, Endpoint]] = field(default_factory=list)
    refcount: int = 1
    created: bool = False  # the guest namespace exists


class NetworkNamespace:
    """A handle on one reference to a guest network namespace (a container resource)."""

    kind = "network"

    def __init__(self, manager: NetworkManager, ns: _Namespace) -> None:
        self._manager = manager
        self._ns = ns
        self._released = False

    @property
    def ns_id(self) -> str:
        return self._ns.ns_id

    @property
    def guest_path(self) -> str:
        """Where the guest keeps the namespace (what the container's spec names)."""
        return guest_netns_path(self._ns.ns_id)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [ep for _, ep in self._ns.nics]

    async def release(self) -> None:
        if self._released:
            return
        try:
            await self._manager.remove(self._ns)
        except UvmshimError as err:
            err.wrap(f"failed to remove network namespace {self._ns.ns_id}")
            raise
        self._released = True

    def describe(self) -> dict[str, Any]:
        ns = self._ns
        return {"kind": "network", "ns_id": ns.ns_id, "host_path": ns.host_path,
                "guest_path": self.guest_path, "read_only": False,
                "nics": [{"nic_id": n, **ep.describe()} for n, ep in ns.nics]}


class NetworkManager:
    """The UVM's guest network namespaces, keyed by the host namespace they mirror."""

    def __init__(self, host: HostBackend, guest: GuestBackend, vm_id: str) -> None:
        self._host = host
        self._guest = guest
        self._vm_id = vm_id
        self._namespaces: dict[str, _Namespace] = {}
        self._ns_counter = itertools.count()
        self._nic_counter = itertools.count()

    def namespaces(self) -> list[dict[str, Any]]:
        return [{"ns_id": ns.ns_id, "host_path": ns.host_path, "refcount": ns.refcount,
                 "nics": [n for n, _ in ns.nics]} for ns in self._namespaces.values()]

    def find(self, key: str) -> NetworkNamespace | None:
        """Another reference to the namespace for ``key``, if the UVM has it."""
        ns = self._namespaces.get(key)
        if ns is None:
            return None
        ns.refcount += 1
        return NetworkNamespace(self, ns)

    async def add(self, key: str, endpoints: Sequence[Endpoint], *, host_path: str = "",
                  host_forwards: Sequence[str] | None = None) -> NetworkNamespace:
        """The guest namespace mirroring ``key`` (a host namespace, or ``user``): created
        with a NIC per endpoint, or shared if it exists.

        :raises UvmshimError: nothing of it is left then.
        """
        found = self.find(key)
        if found is not None:
            return found
        if len(endpoints) > MAX_INTERFACES:
            raise NetworkError(
                f"network namespace {host_path or key} has {len(endpoints)} interfaces besides "
                f"lo; a UVM takes at most {MAX_INTERFACES}")
        ns = _Namespace(key, f"ns{next(self._ns_counter)}", host_path)
        self._namespaces[key] = ns
        try:
            await self._guest.add_netns(ns.ns_id)
            ns.created = True
            for ep in endpoints:
                await self._add_nic(ns, ep, host_forwards)
        except BaseException as err:
            try:
                await self._teardown(ns)
            except UvmshimError as undo_err:
                log.warning("undoing a failed network set-up: %s", undo_err)
                err.add_note(f"undoing it also failed: {undo_err}")
            del self._namespaces[key]
            raise
        return NetworkNamespace(self, ns)

    async def _add_nic(self, ns: _Namespace, ep: Endpoint,
                       host_forwards: Sequence[str] | None) -> None:
        nic_id = f"nic{next(self._nic_counter)}"
        host, guest = self._host, self._guest
        try:
            await host_then_guest(
                lambda: host.nic_add(nic_id, ep, netns=ns.host_path,
                                     host_forwards=host_forwards),
                lambda: guest.add_nic(ns.ns_id, nic_id, ep),
                lambda: host.nic_remove(nic_id),
            )
        except UvmshimError as err:
            err.wrap(f"connecting interface {ep.ifname} ({ep.mac}) of "
                     f"{ns.host_path or 'the user-mode network'} to UVM {self._vm_id}")
            raise
        ns.nics.append((nic_id, ep))

    async def _teardown(self, ns: _Namespace) -> None:
        """Remove ``ns``'s NICs (newest first: guest, then host) and the guest namespace.
        What was removed is forgotten, so a retry does only what is left."""
        errors: list[BaseException] = []
        for nic_id, ep in reversed(list(ns.nics)):
            try:
                await self._guest.remove_nic(ns.ns_id, nic_id)
            except UvmshimError as err:  # the host removal takes it away all the same
                log.warning("taking NIC %s (%s) down in the guest: %s", nic_id, ep.ifname, err)
            try:
                await self._host.nic_remove(nic_id)
            except UvmshimError as err:
                errors.append(err)
                continue
            ns.nics.remove((nic_id, ep))
        if ns.created and not errors:
            try:
                await self._guest.remove_netns(ns.ns_id)
                ns.created = False
            except UvmshimError as err:
                errors.append(err)
        if errors:
            raise ReleaseError("removing its NICs and the guest namespace", errors)

    async def remove(self, ns: _Namespace) -> None:
        if self._namespaces.get(ns.key) is not ns:
            raise UvmError(f"no network namespace {ns.ns_id} on the uvm {self._vm_id}")
        if ns.refcount > 1:
            ns.refcount -= 1
            return
        await self._teardown(ns)
        del self._namespaces[ns.key]


# Section: the container's spec


def spec_netns_path(linux: dict[str, Any] | None) -> str:
    """The path of the spec's network namespace entry ("" if none, or no path).

    :raises NetworkError: the entry's path is not a string.
    """
    for i, ns in enumerate((linux or {}).get("namespaces") or []):
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path", "")
            if not isinstance(path, str):
                raise NetworkError("expected a string", where=f"linux.namespaces[{i}].path")
            return path
    return ""


def host_netns_key(path: str) -> str:
    """What identifies a host network namespace file (its device and inode).

    :raises NetworkError: the file does not exist.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise NetworkError(f"network namespace {path}: {e.strerror}",
                           where="linux.namespaces[type=network].path",
                           hint="the container engine must create the namespace before the "
                                "container (or leave out the path)") from None
    return f"netns:{st.st_dev}:{st.st_ino}"


async def connect_network(manager: NetworkManager, linux: dict[str, Any] | None
                          ) -> NetworkNamespace | None:
    """The guest network namespace for a container whose spec's ``linux`` section is
    ``linux``: None if it names no host namespace; else the UVM's namespace for it, made
    (and its endpoints connected) on first use."""
    path = spec_netns_path(linux)
    if not path:
        return None
    key = host_netns_key(path)
    found = manager.find(key)
    if found is not None:
        return found
    endpoints = await read_endpoints(path)
    return await manager.add(key, endpoints, host_path=path)


def rewrite_netns(oci: dict[str, Any], guest_path: str) -> None:
    """Point the network namespace entry of the guest spec ``oci`` at ``guest_path``."""
    linux = oci.get("linux")
    if not isinstance(linux, dict):
        return
    for ns in linux.get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            ns["path"] = guest_path
