"""Network namespaces and NICs in the guest (hcsshim's GCS ``AddNetNS`` / ``AddNIC``). STDLIB ONLY.

The host hot-adds one ``virtio-net-pci`` per endpoint of the container's host network
namespace, with that endpoint's MAC, and then asks for it here:

* ``add_netns``: a network namespace of our own, kept by a bind mount at
  ``GUEST_NETNS_DIR/<ns_id>`` (busybox ``unshare --net=FILE``), with ``lo`` up. The host
  rewrites the container's ``linux.namespaces`` network entry to that path, so crun joins it;
  the containers of a pod name the same one.
* ``add_nic``: wait for the interface with the given MAC (the kernel probes the hot-added
  device), then one ``RTM_NEWLINK`` from the UVM's own namespace moves it into the namespace
  (``IFLA_NET_NS_FD``) under the host interface's name (``IFLA_IFNAME``: the name never
  clashes in the UVM's own namespace), sets its MTU and, without IPv6, brings it up; then its
  addresses and routes (busybox ``ip`` through ``nsenter``, the one process per NIC: a netlink
  socket must be created *in* the namespace, and Python 3.11 has no ``setns`` while the
  initrd has no ctypes). With IPv6, the link comes up in that process, after DAD and router
  advertisements are turned off.
* ``remove_nic`` only forgets it: the hot-unplug that follows takes the device, its addresses
  and routes away (no process); ``remove_netns`` unmounts the namespace (a NIC still in it
  goes back to the UVM's namespace, where its hot-unplug removes it).

IPv6 addresses are added without duplicate address detection (the host's endpoint owns them)
and router advertisements are ignored: the interface has exactly what the host read.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import threading

from uvmshim.agent.kmods import ModuleLoader
from uvmshim.agent.util import AgentError, makedirs, run, wait_for
from uvmshim.protocol.constants import GUEST_NETNS_DIR, guest_netns_path
from uvmshim.protocol.messages import ErrorKind, ProtocolError
from uvmshim.protocol.requests import AddNetNS, AddNic, RemoveNetNS, RemoveNic, parse_route

#: How long a hot-added NIC may take to show up in the guest.
NIC_TIMEOUT = 30.0

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h
_RTM_NEWLINK = 16
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2
_IFLA_IFNAME = 3
_IFLA_MTU = 4
_IFLA_NET_NS_FD = 28
_IFF_UP = 1


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.match(value) or value in (".", ".."):
        raise AgentError(f"bad {what} {value!r}", ErrorKind.INVALID)
    return value


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def move_link(index: int, netns_fd: int, name: str, *, mtu: int = 0, up: bool = False) -> None:
    """Move link ``index`` into the namespace of ``netns_fd`` and name it ``name`` there; set
    its MTU (unless 0) and bring it up (``up``) there, in the same request.

    :raises AgentError: the kernel's refusal.
    """
    flags = _IFF_UP if up else 0
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, flags)
    body += _attr(_IFLA_NET_NS_FD, struct.pack("=I", netns_fd))
    body += _attr(_IFLA_IFNAME, name.encode() + b"\0")
    if mtu:
        body += _attr(_IFLA_MTU, struct.pack("=I", mtu))
    msg = struct.pack("=IHHII", 16 + len(body), _RTM_NEWLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1,
                      0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.settimeout(10)
        sock.bind((0, 0))
        sock.send(msg)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    if code:
                        raise AgentError(f"moving the NIC into its namespace as {name}: "
                                         f"{os.strerror(-code)}")
                    return
                offset += max((length + 3) & ~3, 16)


def _link_by_mac(mac: str) -> tuple[str, int] | None:
    """``(name, index)`` of the interface in the UVM's own namespace whose MAC is ``mac``."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/sys/class/net/{name}/address", encoding="ascii") as f:
                if f.read().strip() != mac:
                    continue
            with open(f"/sys/class/net/{name}/ifindex", encoding="ascii") as f:
                return name, int(f.read())
        except (OSError, ValueError):
            continue
    return None


def _address(text: str) -> tuple[str, int]:
    """``ADDR/PREFIX`` → (normalised text, IP version)."""
    import ipaddress

    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise AgentError(f"bad address {text!r}", ErrorKind.INVALID) from None
    if "/" not in text:
        raise AgentError(f"address {text!r} has no prefix length", ErrorKind.INVALID)
    return iface.with_prefixlen, iface.version


def _route(text: str) -> tuple[list[str], int]:
    """A wire route → (``ip route add`` arguments, IP version)."""
    import ipaddress

    try:
        dest, gateway, metric = parse_route(text)
        net = ipaddress.ip_network(dest, strict=False)
        args = [net.with_prefixlen]
        if gateway:
            gw = ipaddress.ip_address(gateway)
            if gw.version != net.version:
                raise ValueError("mixed IP versions")
            args += ["via", str(gw)]
    except (ProtocolError, ValueError) as err:
        raise AgentError(f"bad route {text!r}: {err}", ErrorKind.INVALID) from None
    if metric:
        args += ["metric", str(metric)]
    return args, net.version


class Network:
    """The guest's network namespaces and NICs.

    :param modules: loads ``virtio_net`` on first use.
    """

    def __init__(self, modules: ModuleLoader) -> None:
        self._modules = modules
        self._lock = threading.Lock()
        self._namespaces: set[str] = set()
        self._nics: dict[str, tuple[str, str]] = {}  # nic id -> (ns id, interface name)

    def _nsenter(self, ns_id: str, script: str) -> None:
        run(["nsenter", f"--net={guest_netns_path(ns_id)}", "sh", "-ec", script])

    def add_netns(self, req: AddNetNS) -> str:
        ns_id = _check(_ID_RE, req.ns_id, "network namespace name")
        path = guest_netns_path(ns_id)
        with self._lock:
            if ns_id in self._namespaces:
                raise AgentError(f"network namespace {ns_id} exists", ErrorKind.CONFLICT)
            makedirs(GUEST_NETNS_DIR)
            try:
                with open(path, "x"):
                    pass
            except FileExistsError:
                raise AgentError(f"network namespace {ns_id} exists", ErrorKind.CONFLICT) \
                    from None
            try:
                run(["unshare", f"--net={path}", "ip", "link", "set", "lo", "up"])
            except AgentError as err:
                self._drop(path)
                raise AgentError(f"creating network namespace {ns_id}: {err}", err.kind) \
                    from None
            self._namespaces.add(ns_id)
        return path

    def _drop(self, path: str) -> None:
        with contextlib.suppress(AgentError):
            run(["umount", "-l", path])
        with contextlib.suppress(OSError):
            os.unlink(path)

    def remove_netns(self, req: RemoveNetNS) -> None:
        ns_id = _check(_ID_RE, req.ns_id, "network namespace name")
        with self._lock:
            if ns_id not in self._namespaces:
                raise AgentError(f"no network namespace {ns_id}", ErrorKind.NOT_FOUND)
            path = guest_netns_path(ns_id)
            try:
                run(["umount", "-l", path])
            except AgentError as err:
                raise AgentError(f"removing network namespace {ns_id}: {err}", err.kind) \
                    from None
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._namespaces.discard(ns_id)
            for nic, (ns, _name) in list(self._nics.items()):
                if ns == ns_id:
                    del self._nics[nic]

    def add_nic(self, req: AddNic) -> dict[str, str]:
        ns_id = _check(_ID_RE, req.ns_id, "network namespace name")
        nic_id = _check(_ID_RE, req.nic_id, "NIC id")
        mac = _check(_MAC_RE, req.mac.lower(), "MAC address")
        ifname = _check(_IFNAME_RE, req.ifname, "interface name")
        addresses = [_address(a) for a in req.addresses]
        routes = [_route(r) for r in req.routes]
        with self._lock:
            if ns_id not in self._namespaces:
                raise AgentError(f"no network namespace {ns_id}", ErrorKind.NOT_FOUND)
            if nic_id in self._nics:
                raise AgentError(f"NIC {nic_id} exists", ErrorKind.CONFLICT)
            self._nics[nic_id] = (ns_id, ifname)
        try:
            self._modules.ensure_group("net")
            found = wait_for(lambda: (lambda link: f"{link[0]} {link[1]}" if link else None)(
                _link_by_mac(mac)), timeout=NIC_TIMEOUT)
            if found is None:
                raise AgentError(f"NIC {nic_id} ({mac}) did not show up in the guest within "
                                 f"{NIC_TIMEOUT:.0f} s", ErrorKind.TIMEOUT)
            index = int(found.split()[1])
            ipv6 = any(v == 6 for _, v in addresses) or any(v == 6 for _, v in routes)
            fd = os.open(guest_netns_path(ns_id), os.O_RDONLY | os.O_CLOEXEC)
            try:
                move_link(index, fd, ifname, mtu=req.mtu, up=not ipv6)
            finally:
                os.close(fd)
            lines = []
            if ipv6:  # before the link is up: no DAD, no router advertisements
                conf = f"/proc/sys/net/ipv6/conf/{ifname}"
                lines += [f"echo 0 > {conf}/accept_dad", f"echo 0 > {conf}/accept_ra",
                          f"ip link set {ifname} up"]
            # One busybox process per command (each costs 10-40 ms under TCG): as few as can be.
            lines += [f"ip addr add {a} dev {ifname}" for a, _ in addresses]
            lines += [f"ip -{v} route add {' '.join(args)} dev {ifname}" for args, v in routes]
            try:
                if len(lines) == 1:  # no shell
                    run(["nsenter", f"--net={guest_netns_path(ns_id)}", *lines[0].split()])
                elif lines:
                    self._nsenter(ns_id, "\n".join(lines))
            except AgentError as err:
                raise AgentError(f"configuring {ifname} ({mac}): {err}", err.kind) from None
        except BaseException:
            with self._lock:
                self._nics.pop(nic_id, None)
            raise
        return {"ifname": ifname}

    def remove_nic(self, req: RemoveNic) -> None:
        nic_id = _check(_ID_RE, req.nic_id, "NIC id")
        with self._lock:
            entry = self._nics.get(nic_id)
            if entry is None or entry[0] != req.ns_id:
                raise AgentError(f"no NIC {nic_id} in network namespace {req.ns_id}",
                                 ErrorKind.NOT_FOUND)
        # Nothing to do in the namespace: the hot-unplug that follows removes the device with
        # its addresses and routes (a process to flush them first cost 50-300 ms).
        with self._lock:
            self._nics.pop(nic_id, None)
