"""Network namespaces and NICs in the guest (hcsshim's GCS ``AddNetNS`` / ``AddNIC``). STDLIB ONLY.

The host gives the UVM one ``virtio-net-pci`` per endpoint of the container's host network
namespace (the first, in a UVM started for that namespace, is the *ready NIC*; the others are
hot-added with the endpoint's MAC) and then asks for it here:

* ``add_netns``: a network namespace of our own, kept by a bind mount at
  ``GUEST_NETNS_DIR/<ns_id>`` (busybox ``unshare --net=FILE``), with ``lo`` up. The host
  rewrites the container's ``linux.namespaces`` network entry to that path, so crun joins it;
  the containers of a pod name the same one. The process ``unshare`` starts is a busybox
  ``sh`` that stays, reading commands from the agent (:class:`_NsShell`): configuring a
  namespace needs a process inside it (a netlink socket must be created *in* the namespace,
  and Python 3.11 has no ``setns`` while the initrd has no ctypes), and keeping one spares an
  ``nsenter`` and a shell per NIC. Its first commands set the namespace's IPv6 defaults (no
  duplicate address detection, no router advertisements: every interface moved in later
  gets them) and bring ``lo`` up. The request also loads ``virtio_net``, so that a NIC
  hot-added meanwhile is probed at once.
* ``add_nic``: wait for the interface with the given MAC (the kernel probes the hot-added
  device) and, if an ``add_netns`` for it is still under way (the host sends both at once),
  for the namespace; then one ``RTM_NEWLINK`` from the UVM's own namespace moves it into the
  namespace (``IFLA_NET_NS_FD``) under the host interface's name (``IFLA_IFNAME``: the name
  never clashes in the UVM's own namespace), sets its MTU and brings it up; then its addresses
  and routes: over the namespace's netlink socket if the agent has one there (the prepared
  namespace's, below), else one busybox ``ip`` each, run by the namespace's shell.
* The **ready NIC** (``add_nic`` with ``ready``) is a ``virtio-net-pci`` present from boot at
  a fixed PCI address. Binding its driver negotiates the device's features with the tap it has
  then, so its driver is kept unbound (:meth:`Network.park_ready_nic`, right after
  ``virtio_net`` is loaded) until it can be bound with the tap the container's traffic will
  use: in a *network template*, whose ready NIC got a tap when it was built, the template's
  guest binds it and parks its interface, down, in the prepared namespace
  (:meth:`Network.park_bound`), and a clone's ``add_nic`` only gives it its name, MAC and
  MTU and brings it up, in one ``RTM_NEWLINK``; a cold-booted UVM binds it when
  ``add_netns`` asks (``bind_ready``) and moves it like a hot-added NIC. It serves one
  endpoint per UVM.
* :meth:`Network.prepare` (a template's guest, before it is saved) makes the namespace
  ``READY_NETNS_ID`` in advance, with its shell and a netlink socket made inside it (a
  short-lived Python there sends it over): a clone's first ``add_netns`` finds it made. A new
  namespace with its shell costs ~150 ms of a fresh clone's CPU under TCG, and each ``ip``
  15-40 ms: code that runs for the first time in a clone is translated first.
* ``remove_nic`` only forgets it: the hot-unplug that follows takes the device, its addresses
  and routes away (no process); the ready NIC's driver is unbound instead (the interface goes
  with its addresses and routes). ``remove_netns`` ends the shell and unmounts the namespace
  (a NIC still in it goes back to the UVM's namespace, where its hot-unplug removes it).

IPv6 addresses are added without duplicate address detection (the host's endpoint owns them)
and router advertisements are ignored: the interface has exactly what the host read.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from uvmshim.agent.kmods import ModuleLoader
from uvmshim.agent.util import AgentError, makedirs, run
from uvmshim.protocol.constants import (
    GUEST_NETNS_DIR,
    READY_NETNS_ID,
    READY_NIC_IFNAME,
    READY_NIC_MAC,
    guest_netns_path,
    ready_nic_pci_address,
)
from uvmshim.protocol.messages import ErrorKind, ProtocolError
from uvmshim.protocol.requests import (
    AddNetNS,
    AddNic,
    ParkReadyNic,
    RemoveNetNS,
    RemoveNic,
    parse_route,
)

#: How long a hot-added NIC may take to show up in the guest.
NIC_TIMEOUT = 30.0
#: How long the commands of one request may take in a namespace's shell.
SHELL_TIMEOUT = 60.0

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h
_RTM_NEWLINK = 16
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2
_IFLA_ADDRESS = 1
_IFLA_IFNAME = 3
_IFLA_MTU = 4
_IFLA_NET_NS_FD = 28
_IFF_UP = 1
_RTMGRP_LINK = 1
_NLM_F_EXCL = 0x200
_NLM_F_CREATE = 0x400
_RTM_GETLINK = 18
_RTM_NEWADDR = 20
_RTM_NEWROUTE = 24
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFA_F_NODAD = 0x02
_RTA_DST = 1
_RTA_OIF = 4
_RTA_GATEWAY = 5
_RTA_PRIORITY = 6
_RT_TABLE_MAIN = 254
_RTPROT_BOOT = 3
_RT_SCOPE_UNIVERSE = 0
_RT_SCOPE_LINK = 253
_RTN_UNICAST = 1


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.match(value) or value in (".", ".."):
        raise AgentError(f"bad {what} {value!r}", ErrorKind.INVALID)
    return value


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def move_link(index: int, ns_id: str, name: str, *, mtu: int = 0, up: bool = False,
              mac: str = "") -> None:
    """Move link ``index`` of the UVM's own namespace into the guest namespace ``ns_id`` and
    name it ``name`` there; set its MTU (unless 0), its MAC (unless "") and bring it up
    (``up``) there, in the same request.

    :raises AgentError: the kernel's refusal.
    """
    with _netlink() as sock, _netns_fd(ns_id) as fd:
        set_link(sock, index, netns_fd=fd, name=name, mtu=mtu, up=up, mac=mac)


@contextlib.contextmanager
def _netns_fd(ns_id: str) -> Iterator[int]:
    """An open descriptor of the guest namespace ``ns_id``."""
    fd = os.open(guest_netns_path(ns_id), os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def set_link(sock: socket.socket, index: int, *, netns_fd: int = -1, name: str = "",
             mtu: int = 0, up: bool = False, mac: str = "") -> None:
    """One ``RTM_NEWLINK`` over ``sock`` for link ``index`` of its namespace: into the
    namespace of ``netns_fd`` (unless -1), named ``name``, with ``mtu`` and ``mac`` (each
    unless empty), up (``up``)."""
    flags = _IFF_UP if up else 0
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, flags)
    if netns_fd >= 0:
        body += _attr(_IFLA_NET_NS_FD, struct.pack("=I", netns_fd))
    if name:
        body += _attr(_IFLA_IFNAME, name.encode() + b"\0")
    if mac:
        body += _attr(_IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
    if mtu:
        body += _attr(_IFLA_MTU, struct.pack("=I", mtu))
    what = "moving the NIC into its namespace" if netns_fd >= 0 else "setting up the NIC"
    _nl_call(sock, _RTM_NEWLINK, 0, body, f"{what} as {name}" if name else what)


def _netlink(fileno: int | None = None, groups: int = 0) -> socket.socket:
    """A route netlink socket, bound (to the multicast ``groups``): a new one (in the calling
    process's network namespace), or the one ``fileno`` (made elsewhere)."""
    if fileno is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
    else:
        sock = socket.socket(fileno=fileno)
    sock.settimeout(10)
    sock.bind((0, groups))
    return sock


_seq = 0
#: One request at a time: requests run in threads of their own, and a namespace's socket is
#: shared (each request is a few kernel calls).
_nl_lock = threading.Lock()


def _nl_call(sock: socket.socket, kind: int, flags: int, body: bytes, what: str) -> bytes:
    """Send one request (``NLM_F_REQUEST | NLM_F_ACK | flags``) and wait for its answer.

    :returns: the body of the first message answering it (b"" if only the acknowledgement).
    :raises AgentError: ``what`` and the kernel's refusal.
    """
    with _nl_lock:
        return _nl_call_locked(sock, kind, flags, body, what)


def _nl_call_locked(sock: socket.socket, kind: int, flags: int, body: bytes, what: str
                    ) -> bytes:
    global _seq
    _seq += 1
    seq = _seq
    sock.send(struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK | flags,
                          seq, 0) + body)
    reply = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError as err:
            raise AgentError(f"{what}: no answer from the kernel ({err})") from None
        offset = 0
        while offset + 16 <= len(data):
            length, msg_kind, _, msg_seq = struct.unpack_from("=IHHI", data, offset)
            if msg_seq == seq:
                if msg_kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    if code:
                        raise AgentError(f"{what}: {os.strerror(-code)}")
                    return reply
                if not reply:
                    reply = data[offset + 16:offset + length]
            offset += max((length + 3) & ~3, 16)


def link_index(sock: socket.socket, name: str) -> int:
    """The index of link ``name`` in the namespace of ``sock``."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
    body += _attr(_IFLA_IFNAME, name.encode() + b"\0")
    reply = _nl_call(sock, _RTM_GETLINK, 0, body, f"looking up {name}")
    if len(reply) < 16:
        raise AgentError(f"looking up {name}: no answer")
    (index,) = struct.unpack_from("=i", reply, 4)
    return int(index)


def add_address(sock: socket.socket, index: int, family: int, packed: bytes,
                prefix: int) -> None:
    """``ip addr add`` over ``sock`` (in the namespace of link ``index``); IPv6 without
    duplicate address detection."""
    flags = _IFA_F_NODAD if family == socket.AF_INET6 else 0
    body = struct.pack("=BBBBI", family, prefix, flags, 0, index)
    body += _attr(_IFA_LOCAL, packed) + _attr(_IFA_ADDRESS, packed)
    text = f"{socket.inet_ntop(family, packed)}/{prefix}"
    _nl_call(sock, _RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, body, f"adding {text}")


def add_route(sock: socket.socket, index: int, family: int, net: bytes, prefix: int,
              gateway: bytes | None, metric: int) -> None:
    """``ip route add NET/PREFIX [via GATEWAY] [metric METRIC] dev <index>`` over ``sock``."""
    scope = _RT_SCOPE_UNIVERSE if gateway else _RT_SCOPE_LINK
    body = struct.pack("=BBBBBBBBI", family, prefix, 0, 0, _RT_TABLE_MAIN, _RTPROT_BOOT, scope,
                       _RTN_UNICAST, 0)
    if prefix:
        body += _attr(_RTA_DST, net)
    body += _attr(_RTA_OIF, struct.pack("=I", index))
    if gateway:
        body += _attr(_RTA_GATEWAY, gateway)
    if metric:
        body += _attr(_RTA_PRIORITY, struct.pack("=I", metric))
    text = f"{socket.inet_ntop(family, net)}/{prefix}"
    _nl_call(sock, _RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_EXCL, body, f"adding the route {text}")


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


def wait_link(mac: str, timeout: float) -> tuple[str, int] | None:
    """``(name, index)`` of the interface whose MAC is ``mac`` once the kernel has it (a
    hot-added NIC being probed), or None after ``timeout`` seconds.

    Event-driven: it sleeps on a netlink socket subscribed to link events (``RTMGRP_LINK``)
    and looks again at each (the kernel makes the sysfs entry before it announces the link),
    instead of polling sysfs, which under TCG costs the CPU the probe needs.
    """
    deadline = time.monotonic() + timeout
    with _netlink(groups=_RTMGRP_LINK) as sock:
        found = _link_by_mac(mac)  # subscribed first: no announcement is missed
        while found is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(min(left, 0.5))  # and a look now and then, whatever happens
            with contextlib.suppress(OSError):  # a timeout, or ENOBUFS: look anyway
                sock.recv(65536)
            found = _link_by_mac(mac)
    return found


_VIRTIO_DEVICES = "/sys/bus/virtio/devices"
_VIRTIO_NET_DRIVER = "/sys/bus/virtio/drivers/virtio_net"


def _ready_nic_device() -> str | None:
    """The virtio device (``virtioN``) of the ready NIC; None if the UVM has none."""
    try:
        names = os.listdir(f"/sys/bus/pci/devices/{ready_nic_pci_address()}")
    except OSError:
        return None
    found = [n for n in names if n.startswith("virtio")]
    return found[0] if found else None


def _bound(device: str) -> bool:
    return os.path.exists(f"{_VIRTIO_DEVICES}/{device}/driver")


def _driver(action: str, device: str) -> None:
    """``bind`` or ``unbind`` virtio device ``device`` and ``virtio_net``.

    :raises AgentError: the kernel's refusal.
    """
    try:
        with open(f"{_VIRTIO_NET_DRIVER}/{action}", "w", encoding="ascii") as f:
            f.write(device)
    except OSError as err:
        raise AgentError(f"{action} of the ready NIC ({device}): {err.strerror}") from None


def _unbind_ready() -> None:
    """Unbind the ready NIC's driver if it is bound (its interface goes)."""
    device = _ready_nic_device()
    if device is not None and _bound(device):
        _driver("unbind", device)


def _ready_link(device: str) -> tuple[str, int]:
    """``(name, index)`` of the bound ready NIC's interface."""
    try:
        (name,) = os.listdir(f"{_VIRTIO_DEVICES}/{device}/net")
        with open(f"/sys/class/net/{name}/ifindex", encoding="ascii") as f:
            return name, int(f.read())
    except (OSError, ValueError) as err:
        raise AgentError(f"the ready NIC ({device}) has no interface: {err}") from None


# Addresses are checked and normalised with inet_pton/inet_ntop: importing ipaddress costs
# 100-300 ms under TCG, paid by the first NIC of every UVM.
_FAMILIES = ((socket.AF_INET, 32), (socket.AF_INET6, 128))  # (family, bits)


def _prefixed(text: str) -> tuple[int, bytes, int]:
    """``ADDR/PREFIX`` → (family, packed address, prefix length).

    :raises ValueError: anything else.
    """
    addr, slash, prefix = text.partition("/")
    if not slash:
        raise ValueError("no prefix length")
    family, packed, bits = _ip(addr)
    if not (prefix.isascii() and prefix.isdigit()) or int(prefix) > bits:
        raise ValueError(f"bad prefix length {prefix!r}")
    return family, packed, int(prefix)


def _ip(text: str) -> tuple[int, bytes, int]:
    """An IPv4 or IPv6 address → (family, packed, bits). :raises ValueError: not one."""
    for family, bits in _FAMILIES:
        try:
            return family, socket.inet_pton(family, text), bits
        except (OSError, ValueError):
            continue
    raise ValueError(f"{text!r} is not an IP address")


def _version(family: int) -> int:
    return 4 if family == socket.AF_INET else 6


def _address(text: str) -> tuple[str, int]:
    """``ADDR/PREFIX`` → (normalised text, IP version)."""
    if "/" not in text:
        raise AgentError(f"address {text!r} has no prefix length", ErrorKind.INVALID)
    try:
        family, packed, prefix = _prefixed(text)
    except ValueError:
        raise AgentError(f"bad address {text!r}", ErrorKind.INVALID) from None
    return f"{socket.inet_ntop(family, packed)}/{prefix}", _version(family)


@dataclass(frozen=True)
class _Route:
    family: int
    net: bytes
    prefix: int
    gateway: bytes | None
    metric: int

    def args(self) -> list[str]:
        """``ip route add`` arguments (before ``dev``)."""
        out = [f"{socket.inet_ntop(self.family, self.net)}/{self.prefix}"]
        if self.gateway:
            out += ["via", socket.inet_ntop(self.family, self.gateway)]
        if self.metric:
            out += ["metric", str(self.metric)]
        return out


def _route(text: str) -> _Route:
    """A wire route, checked."""
    try:
        dest, gateway, metric = parse_route(text)
        family, packed, prefix = _prefixed(dest)
        bits = len(packed) * 8
        host_mask = (1 << (bits - prefix)) - 1
        net = (int.from_bytes(packed, "big") & ~host_mask).to_bytes(len(packed), "big")
        gw: bytes | None = None
        if gateway:
            gw_family, gw, _ = _ip(gateway)
            if gw_family != family:
                raise ValueError("mixed IP versions")
    except (ProtocolError, ValueError) as err:
        raise AgentError(f"bad route {text!r}: {err}", ErrorKind.INVALID) from None
    return _Route(family, net, prefix, gw, metric)


#: Run in a namespace by :func:`_netlink_in`: a netlink socket made there, handed over the
#: unix socket whose descriptor is ``{fd}``.
_SOCKET_SENDER = ("import socket; s = socket.socket(16, 3 | socket.SOCK_CLOEXEC, 0); "
                  "socket.send_fds(socket.socket(fileno={fd}), [b'.'], [s.fileno()])")


def _netlink_in(path: str) -> socket.socket:
    """A route netlink socket inside the network namespace at ``path`` (Python 3.11 has no
    ``setns``, and the initrd no ctypes: a short-lived Python made there sends it over)."""
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            with theirs:
                proc = subprocess.run(
                    ["nsenter", f"--net={path}", sys.executable, "-I", "-S", "-c",
                     _SOCKET_SENDER.format(fd=theirs.fileno())], pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    timeout=SHELL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as err:
            raise AgentError(f"a netlink socket in {path}: {err}") from None
        ours.settimeout(5)
        try:
            _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        except OSError as err:
            fds = []
            proc_err = f"{err}"
        else:
            proc_err = ""
        if not fds:
            out = proc.stdout.decode(errors="replace").strip()
            raise AgentError(f"a netlink socket in {path}: {out or proc_err or 'none sent'}")
    return _netlink(fds[0])


_DONE = b"@@uvmshim-done "
_DONE_RE = re.compile(rb"@@uvmshim-done (\d+)\n")
#: Run in a new namespace first: the defaults every interface moved in later gets (no DAD, no
#: router advertisements: it has exactly the addresses the host read), then ``lo`` up.
_NETNS_SETUP = ("if [ -d /proc/sys/net/ipv6/conf/default ]; then "
                "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad && "
                "echo 0 > /proc/sys/net/ipv6/conf/default/accept_ra; fi",
                "ip link set lo up")


class _NsShell:
    """A busybox ``sh`` in a new network namespace (``unshare --net=FILE sh``), kept for the
    namespace's life to run the agent's commands there: one request's commands are joined
    with ``&&`` and followed by a marker line with their status, so a request costs only its
    ``ip`` processes."""

    def __init__(self, path: str) -> None:
        import subprocess

        self._lock = threading.Lock()
        self._buf = b""
        try:
            self.proc: Any = subprocess.Popen(
                ["unshare", f"--net={path}", "sh"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True)
        except OSError as err:
            raise AgentError(f"unshare: {err.strerror}") from None

    def run(self, lines: list[str] | tuple[str, ...], timeout: float = SHELL_TIMEOUT) -> None:
        """Run ``lines`` (each a shell command) in the namespace, stopping at the first that
        fails.

        :raises AgentError: its output, or the shell is gone or too slow (then it is ended).
        """
        script = " && ".join(lines) + f"\necho \"{_DONE.decode()}$?\"\n"
        with self._lock:
            try:
                self.proc.stdin.write(script.encode())
                self.proc.stdin.flush()
                status, out = self._answer(time.monotonic() + timeout)
            except (OSError, ValueError) as err:
                self.close()
                raise AgentError(f"the namespace's shell is gone: {err}") from None
            except AgentError:
                self.close()
                raise
        if status:
            raise AgentError(out.decode(errors="replace").strip() or f"exit status {status}")

    def _answer(self, deadline: float) -> tuple[int, bytes]:
        fd = self.proc.stdout.fileno()
        while True:
            m = _DONE_RE.search(self._buf)
            if m is not None:
                out, self._buf = self._buf[:m.start()], self._buf[m.end():]
                return int(m.group(1)), out
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError("the namespace's shell did not answer in time",
                                 ErrorKind.TIMEOUT)
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AgentError("the namespace's shell exited: "
                                     + self._buf.decode(errors="replace").strip())
                self._buf += chunk

    def alive(self) -> bool:
        return bool(self.proc.poll() is None)

    def close(self) -> None:
        """End the shell (EOF on its input; killed if it lingers) and reap it."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except Exception:  # subprocess.TimeoutExpired
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdout.close()


class Network:
    """The guest's network namespaces and NICs.

    :param modules: loads ``virtio_net`` on first use.
    """

    def __init__(self, modules: ModuleLoader) -> None:
        self._modules = modules
        self._lock = threading.Lock()
        self._namespaces: set[str] = set()
        self._shells: dict[str, _NsShell] = {}  # ns id -> its shell
        self._pending: dict[str, threading.Event] = {}  # ns id -> set once add_netns ended
        self._nics: dict[str, tuple[str, str]] = {}  # nic id -> (ns id, interface name)
        self._modules_loaded = False
        #: The NIC that claimed the ready NIC ("" while it is free; it serves one).
        self._ready_owner = ""
        self._ready_used = False
        #: Binds the ready NIC (started by add_netns or add_nic; once per UVM), and its
        #: outcome: the interface ``(name, index)`` or the error.
        self._ready_bind: threading.Thread | None = None
        self._ready_link: tuple[str, int] | AgentError | None = None
        #: Whether the bound ready NIC waits in the prepared namespace (:meth:`park_bound`).
        self._ready_parked = False
        #: The namespace made in advance (:meth:`prepare`): its shell and netlink socket.
        self._prepared: tuple[_NsShell, socket.socket] | None = None
        #: Netlink sockets created inside namespaces (ns id -> socket): the prepared one's.
        self._sockets: dict[str, socket.socket] = {}

    def park_ready_nic(self) -> None:
        """Unbind the ready NIC's driver (bound as ``virtio_net`` was loaded) unless it is
        claimed: it binds when claimed, negotiating features with the tap it has then."""
        with self._lock:
            if self._ready_bind is None:
                _unbind_ready()

    def prepare(self) -> None:
        """Make the namespace :data:`READY_NETNS_ID` now, for a template (see the module
        docstring); park the ready NIC."""
        self.park_ready_nic()
        with self._lock:
            if self._prepared is not None or READY_NETNS_ID in self._namespaces:
                return
        path = self.add_netns(AddNetNS(ns_id=READY_NETNS_ID))
        try:
            sock = _netlink_in(path)
        except AgentError:
            self.remove_netns(RemoveNetNS(ns_id=READY_NETNS_ID))
            raise
        with self._lock:
            self._namespaces.discard(READY_NETNS_ID)
            self._prepared = (self._shells.pop(READY_NETNS_ID), sock)

    def _adopt_prepared(self, ns_id: str) -> bool:
        """Under the lock: take the prepared namespace as ``ns_id`` if it is that one."""
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return False
        shell, sock = prepared
        if ns_id == READY_NETNS_ID and shell.alive():
            self._namespaces.add(ns_id)
            self._shells[ns_id] = shell
            self._sockets[ns_id] = sock
            return True
        shell.close()  # not wanted (or gone): the namespace goes
        sock.close()
        self._drop(guest_netns_path(READY_NETNS_ID))
        return False

    def park_bound(self, req: ParkReadyNic) -> None:
        """Bind the ready NIC now and park its interface, down, in the prepared namespace as
        :data:`READY_NIC_IFNAME` (a template whose ready NIC has a tap)."""
        self.prepare()
        with self._lock:
            if self._ready_bind is not None or self._prepared is None:
                raise AgentError("the ready NIC is taken (or there is no prepared namespace)",
                                 ErrorKind.CONFLICT)
            bind = self._start_ready_bind()
        found = self._bound_link(bind)
        if found is None:
            raise AgentError("binding the ready NIC took too long", ErrorKind.TIMEOUT)
        move_link(found[1], READY_NETNS_ID, READY_NIC_IFNAME)
        self._ready_parked = True

    def _claim_parked(self, ns_id: str, ifname: str, mtu: int, mac: str) -> None:
        """Give the parked ready NIC its name, MAC and MTU, up, in namespace ``ns_id``."""
        with self._lock:
            sock = self._sockets.get(READY_NETNS_ID)
            if sock is None and self._prepared is not None:
                sock = self._prepared[1]
        if sock is None:
            # The namespace it waited in is gone: the kernel moved it back to the UVM's.
            link = wait_link(READY_NIC_MAC, NIC_TIMEOUT)
            if link is None:
                raise AgentError("the ready NIC is gone", ErrorKind.NOT_FOUND)
            move_link(link[1], ns_id, ifname, mtu=mtu, up=True, mac=mac)
            return
        index = link_index(sock, READY_NIC_IFNAME)
        if ns_id == READY_NETNS_ID:
            set_link(sock, index, name=ifname, mtu=mtu, up=True, mac=mac)
            return
        with _netns_fd(ns_id) as fd:
            set_link(sock, index, netns_fd=fd, name=ifname, mtu=mtu, up=True, mac=mac)

    def _start_ready_bind(self) -> threading.Thread:
        """Under the lock: the thread binding the ready NIC (started once)."""
        if self._ready_bind is None:
            self._ready_bind = threading.Thread(target=self._bind_ready, daemon=True,
                                                name="ready-nic")
            self._ready_bind.start()
        return self._ready_bind

    def _bound_link(self, bind: threading.Thread) -> tuple[str, int] | None:
        """Wait for ``bind`` (:meth:`_start_ready_bind`); the ready NIC's interface, or None
        if it took too long. :raises AgentError: the bind's error."""
        bind.join(NIC_TIMEOUT)
        found = self._ready_link
        if isinstance(found, AgentError):
            raise found
        return found

    def _bind_ready(self) -> None:
        try:
            self._load_modules()
            device = _ready_nic_device()
            if device is None:
                raise AgentError("this UVM has no ready NIC", ErrorKind.NOT_FOUND)
            if not _bound(device):
                _driver("bind", device)
            self._ready_link = _ready_link(device)
        except AgentError as err:
            self._ready_link = err

    def _load_modules(self, errors: list[AgentError] | None = None) -> None:
        """Load ``virtio_net`` unless done; with ``errors``, a failure goes there."""
        if self._modules_loaded:
            return
        try:
            self._modules.ensure_group("net")
            self.park_ready_nic()
        except AgentError as err:
            if errors is None:
                raise
            errors.append(err)
            return
        self._modules_loaded = True

    def _in_netns(self, ns_id: str, lines: list[str]) -> None:
        """Run ``lines`` in the namespace: by its shell, or (if that is gone) ``nsenter``."""
        if not lines:
            return
        shell = self._shells.get(ns_id)
        if shell is not None and shell.alive():
            shell.run(lines)
        else:
            run(["nsenter", f"--net={guest_netns_path(ns_id)}", "sh", "-ec", "\n".join(lines)])

    def _configure(self, ns_id: str, ifname: str, addresses: tuple[str, ...],
                   routes: list[_Route]) -> None:
        """Add ``addresses`` (checked) and ``routes`` to ``ifname`` in the namespace: over its
        netlink socket if the agent has one there (the prepared namespace's), else by its
        shell's ``ip`` commands."""
        sock = self._sockets.get(ns_id)
        if sock is not None:
            index = link_index(sock, ifname)
            for text in addresses:
                family, packed, prefix = _prefixed(text)
                add_address(sock, index, family, packed, prefix)
            for r in routes:
                add_route(sock, index, r.family, r.net, r.prefix, r.gateway, r.metric)
            return
        lines = [f"ip addr add {_address(a)[0]} dev {ifname}" for a in addresses]
        lines += [f"ip -{_version(r.family)} route add {' '.join(r.args())} dev {ifname}"
                  for r in routes]
        self._in_netns(ns_id, lines)

    def add_netns(self, req: AddNetNS) -> str:
        ns_id = _check(_ID_RE, req.ns_id, "network namespace name")
        path = guest_netns_path(ns_id)
        with self._lock:
            if ns_id in self._namespaces or ns_id in self._pending:
                raise AgentError(f"network namespace {ns_id} exists", ErrorKind.CONFLICT)
            if req.bind_ready and not self._ready_used:
                self._start_ready_bind()
            if self._adopt_prepared(ns_id):
                return path
            makedirs(GUEST_NETNS_DIR)
            try:
                with open(path, "x"):
                    pass
            except FileExistsError:
                raise AgentError(f"network namespace {ns_id} exists", ErrorKind.CONFLICT) \
                    from None
            done = self._pending[ns_id] = threading.Event()
        # Not under the lock: an add_nic for this namespace may arrive meanwhile (the host
        # sends it as soon as its NIC is hot-added); it waits for ``done``.
        # virtio_net meanwhile (a NIC hot-added meanwhile is probed at once; the first insmod
        # costs ~200 ms under TCG, as much as the namespace: the guest has two CPUs).
        load_errors: list[AgentError] = []
        loader = threading.Thread(target=self._load_modules, args=(load_errors,), daemon=True,
                                  name="netns-modules")
        loader.start()
        shell: _NsShell | None = None
        try:
            shell = _NsShell(path)
            shell.run(_NETNS_SETUP)
            loader.join()
            if load_errors:
                raise load_errors[0]
        except AgentError as err:
            loader.join()
            if shell is not None:
                shell.close()
            self._drop(path)
            with self._lock:
                del self._pending[ns_id]
            done.set()
            raise AgentError(f"creating network namespace {ns_id}: {err}", err.kind) \
                from None
        with self._lock:
            self._namespaces.add(ns_id)
            self._shells[ns_id] = shell
            del self._pending[ns_id]
        done.set()
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
            shell = self._shells.pop(ns_id, None)
            if shell is not None:
                shell.close()
            sock = self._sockets.pop(ns_id, None)
            if sock is not None:
                sock.close()
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
        for a in req.addresses:
            _address(a)  # checked before anything is done
        routes = [_route(r) for r in req.routes]
        with self._lock:
            pending = self._pending.get(ns_id)
            if pending is None and ns_id not in self._namespaces:
                raise AgentError(f"no network namespace {ns_id}", ErrorKind.NOT_FOUND)
            if nic_id in self._nics:
                raise AgentError(f"NIC {nic_id} exists", ErrorKind.CONFLICT)
            bind: threading.Thread | None = None
            if req.ready:
                if self._ready_used:
                    raise AgentError("the ready NIC serves another NIC", ErrorKind.CONFLICT)
                self._ready_used = True
                self._ready_owner = nic_id
                bind = self._start_ready_bind()  # unless add_netns did
            self._nics[nic_id] = (ns_id, ifname)
        try:
            link: tuple[str, int] | None
            if bind is not None:
                link = self._bound_link(bind)
            else:
                self._load_modules()
                link = wait_link(mac, NIC_TIMEOUT)
            if link is None:
                raise AgentError(f"NIC {nic_id} ({mac}) did not show up in the guest within "
                                 f"{NIC_TIMEOUT:.0f} s", ErrorKind.TIMEOUT)
            index = link[1]
            if pending is not None:  # the namespace is still being made (add_netns)
                pending.wait(SHELL_TIMEOUT)
                with self._lock:
                    if ns_id not in self._namespaces:
                        raise AgentError(f"no network namespace {ns_id}", ErrorKind.NOT_FOUND)
            # up at once: the namespace's defaults already rule out DAD and RAs
            if req.ready and self._ready_parked:
                self._claim_parked(ns_id, ifname, req.mtu, mac)
            else:
                move_link(index, ns_id, ifname, mtu=req.mtu, up=True,
                          mac=mac if req.ready else "")
            # One busybox process per command (each costs 10-40 ms under TCG): as few as can be.
            try:
                self._configure(ns_id, ifname, req.addresses, routes)
            except AgentError as err:
                raise AgentError(f"configuring {ifname} ({mac}): {err}", err.kind) from None
        except BaseException:
            with self._lock:
                self._nics.pop(nic_id, None)
                if req.ready:
                    self._ready_owner = ""
            if req.ready:
                with contextlib.suppress(AgentError):  # the host takes its tap away anyway
                    _unbind_ready()
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
        # its addresses and routes (a process to flush them first cost 50-300 ms). The ready
        # NIC stays: unbinding its driver removes the interface.
        with self._lock:
            self._nics.pop(nic_id, None)
            ready = self._ready_owner == nic_id
            if ready:
                self._ready_owner = ""
        if ready:
            _unbind_ready()
