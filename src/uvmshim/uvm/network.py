"""Network namespaces and their endpoints in a UVM (hcsshim's ``AddNetNS`` /
``AddEndpointToNSWithID``), refcounted per host network namespace.

A container whose spec names a host network namespace (``linux.namespaces[type=network]
.path``) gets a guest network namespace holding one NIC per interface of the host one: for
each interface the host backend connects a ``virtio-net-pci`` to it (a tap and tc redirects,
:mod:`uvmshim.uvm.hostnet`): the UVM's ready NIC for the first interface of the namespace the
UVM was started for, a hot-added one otherwise; and the guest backend configures the NIC in
the guest namespace (hcsshim's order: host, then guest; undone in reverse). The guest
namespace itself is made concurrently with the host's work for the first NIC (they are
independent). A second
container naming the same host namespace (a pod's workload container naming its sandbox's)
shares the guest namespace and its NICs; they are removed when the last container lets go.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from uvmshim.asyncutil import finish_despite_cancel
from uvmshim.errors import ReleaseError, UvmError, UvmshimError
from uvmshim.protocol.constants import CONTAINER_NS_PREFIX, guest_netns_path
from uvmshim.protocol.requests import format_route
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

    async def add(self, key: str,
                  endpoints: Sequence[Endpoint] | Callable[[], Awaitable[Sequence[Endpoint]]],
                  *, host_path: str = "",
                  host_forwards: Sequence[str] | None = None) -> NetworkNamespace:
        """The guest namespace mirroring ``key`` (a host namespace, or ``user``): created
        with a NIC per endpoint, or shared if it exists.

        ``endpoints`` may be a function that reads them (:func:`read_endpoints`): the guest
        creates its namespace meanwhile (one agent request, concurrent with the host's netlink
        read, tap, redirects and hot-add of the first NIC, and with the first NIC's guest
        request, which the agent holds until the namespace is there).

        :raises UvmshimError: nothing of it is left then.
        """
        found = self.find(key)
        if found is not None:
            return found
        if not callable(endpoints):
            self._check_count(endpoints, host_path or key)
        # The first is READY_NETNS_ID, which a template's guest has made already.
        ns = _Namespace(key, f"ns{next(self._ns_counter)}", host_path)
        self._namespaces[key] = ns
        netns = asyncio.ensure_future(self._create_netns(ns))
        try:
            await asyncio.sleep(0)  # the guest's request goes out first
            if callable(endpoints):
                endpoints = await endpoints()
                self._check_count(endpoints, host_path or key)
            for ep in endpoints:
                await self._add_nic(ns, ep, host_forwards, netns)
            await netns
        except BaseException as err:
            await finish_despite_cancel(_settle(netns))
            try:
                await self._teardown(ns)
            except UvmshimError as undo_err:
                log.warning("undoing a failed network set-up: %s", undo_err)
                err.add_note(f"undoing it also failed: {undo_err}")
            del self._namespaces[key]
            raise
        return NetworkNamespace(self, ns)

    @staticmethod
    def _check_count(endpoints: Sequence[Endpoint], where: str) -> None:
        if len(endpoints) > MAX_INTERFACES:
            raise NetworkError(
                f"network namespace {where} has {len(endpoints)} interfaces besides "
                f"lo; a UVM takes at most {MAX_INTERFACES}")

    async def _create_netns(self, ns: _Namespace) -> None:
        await self._guest.add_netns(ns.ns_id,
                                    bind_ready=self._host.has_ready_nic(ns.host_path))
        ns.created = True

    async def _add_nic(self, ns: _Namespace, ep: Endpoint,
                       host_forwards: Sequence[str] | None, netns: asyncio.Future[None]) -> None:
        nic_id = f"nic{next(self._nic_counter)}"
        host, guest = self._host, self._guest
        ready = False

        async def host_add() -> None:
            nonlocal ready
            ready = await host.nic_add(nic_id, ep, netns=ns.host_path,
                                       host_forwards=host_forwards)

        async def guest_add() -> None:
            # Sent while the guest may still be making the namespace (``netns``): the agent
            # waits for it; if making it failed, that is the error to report.
            try:
                await guest.add_nic(ns.ns_id, nic_id, ep, ready=ready)
            except Exception:
                await _settle(netns)
                if not netns.cancelled() and netns.exception() is not None:
                    await netns  # raises it
                raise

        try:
            await host_then_guest(
                host_add,
                guest_add,
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


async def _settle(task: asyncio.Future[None]) -> None:
    """Wait for ``task`` to end, whatever the outcome (its error is the caller's to see)."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: no "never retrieved" warning


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


def ready_nic_netns(linux: dict[str, Any] | None) -> str:
    """The host network namespace whose first interface a UVM started for a spec with this
    ``linux`` section should take on its ready NIC (``start_uvm(netns=...)``); "" if none (or
    the entry is bad: connecting reports that)."""
    try:
        path = spec_netns_path(linux)
    except NetworkError:
        return ""
    return "" if path.startswith(CONTAINER_NS_PREFIX) else path


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


async def connect_network(manager: NetworkManager, linux: dict[str, Any] | None,
                          annotations: Mapping[str, str] | None = None
                          ) -> NetworkNamespace | None:
    """The guest network namespace for a container whose spec's ``linux`` section is
    ``linux``: the UVM's namespace for the host namespace it names, or the user-mode network
    its ``annotations`` ask for (:data:`ANNOTATION_NETWORK`), made (and its endpoints
    connected) on first use; None if neither.

    :raises NetworkError: both, or a user-mode network without a network namespace entry.
    """
    path = spec_netns_path(linux)
    forwards = user_network_forwards(annotations or {})
    if forwards is not None:
        if path:
            raise NetworkError(
                f"the spec names the network namespace {path} and asks for uvmshim's "
                f"user-mode network ({ANNOTATION_NETWORK}={NETWORK_NAT})",
                where=f"annotations[{ANNOTATION_NETWORK!r}]", hint="choose one")
        if not _has_netns_entry(linux):
            raise NetworkError(
                "a user-mode network needs a network namespace of the container's own",
                where="linux.namespaces", hint='add {"type": "network"}')
        found = manager.find(USER_NETWORK_KEY)
        if found is not None:  # a pod's workload joins its sandbox's
            return found
        return await manager.add(USER_NETWORK_KEY, [user_endpoint()], host_forwards=forwards)
    if not path or path.startswith(CONTAINER_NS_PREFIX):
        # none, or another container's namespace in the same UVM: the agent joins that
        # one (uvmshim.runc.namespaces); its NIC, if any, was connected for that container
        return None
    key = host_netns_key(path)
    found = manager.find(key)
    if found is not None:
        return found
    return await manager.add(key, functools.partial(read_endpoints, path), host_path=path)


def _has_netns_entry(linux: dict[str, Any] | None) -> bool:
    return any(isinstance(ns, dict) and ns.get("type") == "network"
               for ns in (linux or {}).get("namespaces") or [])


# Section: uvmshim's own user-mode network (``uvmshim run --network=nat -p ...``)

#: The network a spec asks for besides a host namespace: :data:`NETWORK_NAT` (QEMU's
#: user-mode network, libslirp) or ``none`` (the default: no NIC).
ANNOTATION_NETWORK = "io.uvmshim.network"
#: The ports published from the host into the user-mode network: QEMU ``hostfwd`` rules
#: (:func:`publish_rule`), separated by commas. Only with :data:`ANNOTATION_NETWORK`.
ANNOTATION_PUBLISH = "io.uvmshim.network.publish"
NETWORK_NAT = "nat"
NETWORK_MODES = ("none", NETWORK_NAT)
#: The manager's key of the user-mode network (one per UVM; a pod's containers share it).
USER_NETWORK_KEY = "user"
#: libslirp's defaults: the guest's address, the gateway (which is also the host's
#: loopback: a connection to it reaches the host's 127.0.0.1) and the DNS forwarder.
USER_NET = "10.0.2.0/24"
USER_ADDRESS = "10.0.2.15/24"
USER_GATEWAY = "10.0.2.2"
USER_DNS = "10.0.2.3"
USER_MAC = "52:54:00:75:76:01"
USER_MTU = 1500

_PROTOCOLS = ("tcp", "udp")


def user_endpoint() -> Endpoint:
    """The guest's NIC on the user-mode network (configured statically: there is no DHCP
    client in the UVM, and none is needed)."""
    return Endpoint("eth0", 0, USER_MAC, USER_MTU, (USER_ADDRESS,),
                    (format_route("0.0.0.0/0", USER_GATEWAY),))


def _port(text: str, what: str, value: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise NetworkError(f"{what} must be a number from 1 to 65535, got {text!r} in "
                           f"{value!r}", where="-p")
    return int(text)


def publish_rule(value: str) -> str:
    """``[IP:]HOST:CTR[/tcp|udp]`` (``-p``, as podman's) → a QEMU ``hostfwd`` rule.

    As with podman, without ``IP`` the port is published on every address of the host
    (``0.0.0.0``); ``127.0.0.1:`` publishes it on loopback only. IPv4 only.

    :raises NetworkError: anything else.
    """
    spec, _, proto = value.partition("/")
    proto = proto or "tcp"
    if proto not in _PROTOCOLS:
        raise NetworkError(f"unknown protocol {proto!r} in {value!r}", where="-p",
                           hint="use /tcp or /udp")
    parts = spec.split(":")
    if len(parts) == 2:
        parts.insert(0, "0.0.0.0")
    if len(parts) != 3:
        raise NetworkError(f"expected [IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp], got {value!r}",
                           where="-p", hint="e.g. -p 127.0.0.1:8080:80")
    try:
        address = ipaddress.IPv4Address(parts[0])
    except ValueError:
        raise NetworkError(f"{parts[0]!r} is not an IPv4 address of this host (in {value!r})",
                           where="-p", hint="the user-mode network publishes on IPv4 "
                                            "only; e.g. 127.0.0.1 or 0.0.0.0") from None
    host = _port(parts[1], "the host port", value)
    ctr = _port(parts[2], "the container port", value)
    return f"{proto}:{address}:{host}-:{ctr}"


def network_annotations(mode: str, publish: Sequence[str]) -> dict[str, str]:
    """The annotations that ask for ``mode`` (``none`` or ``nat``) with ``publish`` (``-p``
    values) on a spec.

    :raises NetworkError: an unknown mode, ``-p`` without ``nat``, a bad or twice-published
    port.
    """
    if mode not in NETWORK_MODES:
        raise NetworkError(f"unknown network {mode!r}", where="--network",
                           hint=f"use one of {', '.join(NETWORK_MODES)}")
    if mode != NETWORK_NAT:
        if publish:
            raise NetworkError("publishing a port needs a network", where="-p",
                               hint=f"add --network={NETWORK_NAT}")
        return {}
    rules = [publish_rule(p) for p in publish]
    seen: set[str] = set()
    for rule, value in zip(rules, publish, strict=True):
        proto, _, rest = rule.partition(":")
        host_port = f"{proto}:{rest.split('-')[0].rsplit(':', 1)[1]}"
        if host_port in seen:
            raise NetworkError(f"host port {host_port} is published twice ({value!r})",
                               where="-p")
        seen.add(host_port)
    out = {ANNOTATION_NETWORK: NETWORK_NAT}
    if rules:
        out[ANNOTATION_PUBLISH] = ",".join(rules)
    return out


def user_network_forwards(annotations: Mapping[str, str]) -> list[str] | None:
    """The ``hostfwd`` rules of a spec asking for the user-mode network; None if it does not.

    :raises NetworkError: a bad annotation (they are checked again: a spec may come from
        anywhere).
    """
    mode = annotations.get(ANNOTATION_NETWORK, "none")
    publish = annotations.get(ANNOTATION_PUBLISH, "")
    if mode not in NETWORK_MODES:
        raise NetworkError(f"unknown network {mode!r}",
                           where=f"annotations[{ANNOTATION_NETWORK!r}]",
                           hint=f"use one of {', '.join(NETWORK_MODES)}")
    if mode != NETWORK_NAT:
        if publish:
            raise NetworkError(f"{ANNOTATION_PUBLISH} needs {ANNOTATION_NETWORK}={NETWORK_NAT}",
                               where=f"annotations[{ANNOTATION_PUBLISH!r}]")
        return None
    rules = [r for r in publish.split(",") if r]
    for rule in rules:
        proto, _, rest = rule.partition(":")
        addr, _, ports = rest.partition(":")
        host, _, guest = ports.partition("-:")
        try:
            ok = (proto in _PROTOCOLS and ipaddress.IPv4Address(addr) is not None
                  and host.isdigit() and guest.isdigit()
                  and 0 < int(host) < 65536 and 0 < int(guest) < 65536)
        except ValueError:
            ok = False
        if not ok:
            raise NetworkError(f"bad published port {rule!r}: expected PROTO:IP:HOST-:CTR",
                               where=f"annotations[{ANNOTATION_PUBLISH!r}]")
    return rules


def rewrite_netns(oci: dict[str, Any], guest_path: str) -> None:
    """Point the network namespace entry of the guest spec ``oci`` at ``guest_path``."""
    linux = oci.get("linux")
    if not isinstance(linux, dict):
        return
    for ns in linux.get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            ns["path"] = guest_path
