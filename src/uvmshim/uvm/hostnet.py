"""The host side of a container's network: its namespace's endpoints, taps and tc redirects.

A container engine (podman's CNI or netavark, containerd's CNI) gives the container a network
namespace on the host with one or more interfaces (a veth ``eth0`` whose peer is on a bridge)
and names it in ``linux.namespaces[type=network].path``. The container itself runs in the UVM,
so its traffic must get from that veth into the VM and back. As Kata Containers does (its
``tcfilter`` model), for each interface but ``lo`` uvmshim:

1. enters the namespace (``setns`` in a thread of its own: a namespace is a property of the
   calling thread) and reads the interface's MAC, MTU, IPv4/IPv6 addresses and routes over
   netlink (pyroute2);
2. creates a tap device ``uvmtap<n>`` there (``/dev/net/tun`` opened *in* the namespace: the
   tap is created in the namespace of the opener), non-persistent, with ``IFF_VNET_HDR`` so
   that QEMU's virtio-net can pass offloaded (large, checksum-less) packets;
3. adds an ``ingress`` qdisc to both and a catch-all ``u32`` filter with a ``mirred egress
   redirect`` action in each direction: whatever arrives on the veth leaves through the tap
   (into QEMU), whatever QEMU writes to the tap leaves through the veth;
4. hands the tap's descriptor to QEMU (which never opens ``/dev/net/tun`` itself).

The *ready NIC* (a ``virtio-net-pci`` present from boot, :mod:`uvmshim.agent.network`) gets its
tap before QEMU starts: :func:`make_tap` creates it (step 2 alone, without netlink, so it costs
about a millisecond before the launch) and QEMU inherits it; :func:`connect_tap` adds the
redirects later, when the container's endpoints are read.

The guest gives its NIC the same MAC, addresses, routes and MTU (:mod:`uvmshim.agent.network`).
Undoing it deletes the veth's ingress qdisc (with its filter) and the tap (whose own qdisc goes
with it); the tap also vanishes by itself once the last descriptor (QEMU's) is closed.

Our filters have the priority :data:`FILTER_PRIO`, which is how :func:`find_leftovers` tells a
redirect left behind by a crashed uvmshim from anyone else's. Before it creates a tap, a
process also records the namespace in its owners journal (:data:`uvmshim.owners.NET`, once
per namespace while it has taps there), so that if it is killed, ``uvmshim leaks`` lists (and
the next command reclaims, :func:`reclaim_namespace_sync`) every tap and redirect of ours in
that namespace, wherever its file is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import importlib
import ipaddress
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from uvmshim import owners
from uvmshim.errors import BackendError
from uvmshim.protocol.requests import format_route

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NSFS_MAGIC = 0x6E736673
# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_LOOPBACK = 0x8
_ETH_P_ALL = 0x0003
_RTPROT_KERNEL = 2
_RTN_UNICAST = 1
_RT_TABLE_MAIN = 254

#: Name prefix of our tap devices (``uvmtap0``, ``uvmtap1``, ...).
TAP_PREFIX = "uvmtap"
#: The ready NIC's tap (:func:`make_tap`).
READY_TAP = f"{TAP_PREFIX}r"
#: The tc priority of every redirect filter uvmshim adds ("uv"); marks them as ours.
FILTER_PRIO = 0x7576
#: Where named network namespaces live (``ip netns``, podman's CNI, containerd).
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))


class NetworkError(BackendError):
    """The container's network namespace could not be read or connected to the UVM."""


@dataclass(frozen=True)
class Endpoint:
    """One interface of a host network namespace, as the guest must reproduce it."""

    ifname: str
    index: int
    mac: str
    mtu: int
    #: ``ADDR/PREFIX``, IPv4 and IPv6 (link-local IPv6 left out: the guest makes its own).
    addresses: tuple[str, ...] = ()
    #: Wire routes (:func:`uvmshim.protocol.requests.format_route`): ``DEST/PREFIX [via GW]
    #: [metric N]``; routes the kernel derives from an address are left out.
    routes: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"ifname": self.ifname, "mac": self.mac, "mtu": self.mtu,
                "addresses": list(self.addresses), "routes": list(self.routes)}


@dataclass
class Plumbing:
    """A tap and the two redirects between it and ``endpoint``'s interface."""

    netns: str
    #: None until the tap is connected to an interface (a ready NIC's, :func:`make_tap`).
    endpoint: Endpoint | None
    tap: str
    tap_index: int = 0
    #: The tap's descriptor (ours until handed to QEMU; -1 after :meth:`close_fd`).
    fd: int = -1
    steps: list[str] = field(default_factory=list)
    #: Whether this plumbing counts in the journal's record of ``netns`` (:func:`_hold`).
    held: bool = False

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Section: entering a namespace


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """Open the network namespace file ``path``; return its descriptor.

    :raises NetworkError: missing, not a namespace file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"network namespace {path}: {e.strerror}",
                           where="linux.namespaces[type=network].path",
                           hint="the container engine must create the namespace before "
                                "the container (or leave out the path)") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) or not _is_nsfs(fd):
            raise NetworkError(f"{path} is not a network namespace",
                               where="linux.namespaces[type=network].path")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_nsfs(fd: int) -> bool:
    """Whether ``fd`` is a namespace file (``nsfs``): setns tells without side effects only
    for the right type, so look at the file system's magic (``fstatfs``)."""
    buf = ctypes.create_string_buffer(120)
    if _libc().fstatfs(fd, buf) != 0:
        return False
    (magic,) = struct.unpack_from("=q", buf.raw, 0)
    return int(magic) == _NSFS_MAGIC


def preload_netlink() -> None:
    """Import pyroute2 in a thread of its own (50-90 ms), once: for a caller that will soon
    need it and waits meanwhile (a UVM starting)."""
    global _preloading
    with _preload_lock:
        if _preloading is None:
            _preloading = threading.Thread(target=importlib.import_module, args=("pyroute2",),
                                           name="pyroute2-import", daemon=True)
            _preloading.start()


_preloading: threading.Thread | None = None
_preload_lock = threading.Lock()


def _with_netlink(fn: Callable[[IPRoute], T]) -> T:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        return fn(ipr)
    finally:
        ipr.close()


def _in_thread(netns: str | None, fn: Callable[[IPRoute], T]) -> concurrent.futures.Future[T]:
    """Run ``fn(ipr)`` in a new thread inside the namespace ``netns`` (None: ours), with a
    netlink socket opened there; the thread goes back to its own namespace afterwards."""
    return _in_ns_thread(netns, functools.partial(_with_netlink, fn))


def _in_ns_thread(netns: str | None, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn()`` in a new thread inside the namespace ``netns`` (None: ours)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    fd = open_netns(netns) if netns is not None else -1

    def work() -> None:
        own = -1
        try:
            if fd >= 0:
                own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                _setns(fd)
            future.set_result(fn())
        except BaseException as e:  # handed to the awaiting task
            future.set_exception(e)
        finally:
            if own >= 0:
                with contextlib.suppress(OSError):  # the thread ends anyway
                    _setns(own)
                os.close(own)
            if fd >= 0:
                os.close(fd)

    try:
        threading.Thread(target=work, name="uvmshim-netns", daemon=True).start()
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return future


async def in_netns(netns: str | None, fn: Callable[[IPRoute], T]) -> T:
    """Await ``fn(ipr)`` run in the namespace ``netns`` (see :func:`_in_thread`).

    If the caller is cancelled, this still waits for the thread (whose effects the caller may
    have to undo) before the cancellation goes on.
    """
    return await _await_thread(_in_thread(netns, fn))


async def _await_thread(thread: concurrent.futures.Future[T]) -> T:
    future = asyncio.wrap_future(thread)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _netlink_error(what: str, e: BaseException) -> NetworkError:
    code = getattr(e, "code", None)
    if isinstance(code, int) and code > 0:
        return NetworkError(f"{what}: {os.strerror(code)}")
    return NetworkError(f"{what}: {e}")


# Section: reading the endpoints


def _read_endpoints(ipr: IPRoute, netns: str) -> list[Endpoint]:
    endpoints: list[Endpoint] = []
    with _ready_lock:
        ours = {tap for ns, tap in _ready_taps if ns == os.path.realpath(netns)}
    for link in ipr.get_links():
        name = str(link.get("ifname"))
        if link["flags"] & _IFF_LOOPBACK or name in ours:
            continue
        if name.startswith(TAP_PREFIX):
            raise _connected_already(netns, name)
        mac = link.get("address")
        if not isinstance(mac, str) or len(mac) != 17:
            raise NetworkError(f"interface {name} of {netns} is not an Ethernet interface "
                               "(no MAC address); uvmshim can only connect Ethernet "
                               "interfaces to a UVM")
        index = int(link["index"])
        addresses: list[str] = []
        for a in ipr.get_addr(index=index):
            ip = ipaddress.ip_interface(f"{a.get('address')}/{a['prefixlen']}")
            if ip.version == 6 and ip.ip.is_link_local:
                continue
            addresses.append(ip.with_prefixlen)
        routes: list[str] = []
        for family in (2, 10):
            for r in ipr.get_routes(family=family, table=_RT_TABLE_MAIN):
                if r.get("oif") != index or r["proto"] == _RTPROT_KERNEL or \
                        r["type"] != _RTN_UNICAST:
                    continue
                dst = r.get("dst") or ("0.0.0.0" if family == 2 else "::")
                dest = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
                if dest.version == 6 and dest.is_link_local:
                    continue
                routes.append(format_route(dest.with_prefixlen, str(r.get("gateway") or ""),
                                           int(r.get("priority") or 0)))
        endpoints.append(Endpoint(name, index, mac.lower(), int(link.get("mtu") or 1500),
                                  tuple(addresses), tuple(routes)))
    return endpoints


def _connected_already(netns: str, tap: str) -> NetworkError:
    return NetworkError(f"network namespace {netns} is already connected to a UVM ({tap} "
                        "exists)", hint="each network namespace can serve one UVM: put the "
                                        "containers that share it in one pod")


async def read_endpoints(netns: str) -> list[Endpoint]:
    """The interfaces of the network namespace at ``netns`` (all but loopback).

    :raises NetworkError: the path is not a namespace, an interface is not Ethernet, the
        namespace is already connected to a UVM.
    """
    def read(ipr: IPRoute) -> list[Endpoint]:
        try:
            return _read_endpoints(ipr, netns)
        except NetworkError:
            raise
        except Exception as e:
            raise _netlink_error(f"reading network namespace {netns}", e) from e

    return await in_netns(netns, read)


# Section: the owners journal

_held: dict[tuple[int, str], int] = {}  # (pid, namespace path) -> plumbings of ours there
_held_lock = threading.Lock()


def _hold(p: Plumbing) -> None:
    """Record ``p.netns`` in this process's journal (before its first tap there)."""
    key = (os.getpid(), os.path.abspath(p.netns))
    with _held_lock:
        if not _held.get(key):
            owners.acquire(owners.NET, key[1])
        _held[key] = _held.get(key, 0) + 1
    p.held = True


def _unhold(p: Plumbing) -> None:
    """``p`` left nothing in its namespace: when it was the last, the journal says so."""
    if not p.held:
        return
    p.held = False
    key = (os.getpid(), os.path.abspath(p.netns))
    with _held_lock:
        left = _held.get(key, 0) - 1
        if left > 0:
            _held[key] = left
            return
        _held.pop(key, None)
        owners.release(owners.NET, key[1])


# Section: taps and redirects


def _create_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _redirect(ipr: IPRoute, from_index: int, to_index: int) -> None:
    """An ingress qdisc on ``from_index`` and a catch-all filter redirecting to ``to_index``."""
    ipr.tc("add", "ingress", from_index, "ffff:")
    ipr.tc("add-filter", "u32", from_index, parent="ffff:", protocol=_ETH_P_ALL,
           prio=FILTER_PRIO, keys=["0x0/0x0+0"], target=0x10001,
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": to_index})


def _plumb(ipr: IPRoute, p: Plumbing, fail_after: str) -> None:
    ep = _check_link(ipr, p)
    p.fd = _create_tap(p.tap)
    p.steps.append("tap")
    if fail_after == "tap":
        raise NetworkError(f"injected failure after creating {p.tap}")
    _connect(ipr, p, ep, fail_after)


def _check_link(ipr: IPRoute, p: Plumbing) -> Endpoint:
    ep = p.endpoint
    assert ep is not None
    links = ipr.link_lookup(ifname=ep.ifname)
    if not links or links[0] != ep.index:
        raise NetworkError(f"interface {ep.ifname} of {p.netns} went away while the "
                           "container was being connected")
    return ep


def _connect(ipr: IPRoute, p: Plumbing, ep: Endpoint, fail_after: str) -> None:
    """The redirects between ``p``'s tap (which exists) and its endpoint's interface ``ep``
    (checked by :func:`_check_link`)."""
    found = ipr.link_lookup(ifname=p.tap)
    if not found:
        raise NetworkError(f"{p.tap} in {p.netns} is gone (its VM stopped?)")
    p.tap_index = found[0]
    ipr.link("set", index=p.tap_index, mtu=ep.mtu, state="up")
    p.steps.append("veth-redirect")  # before: a half-made redirect is undone too
    try:
        _redirect(ipr, ep.index, p.tap_index)
    except Exception as e:
        if getattr(e, "code", None) == errno.EEXIST:
            p.steps.remove("veth-redirect")  # not ours: leave it
            raise NetworkError(
                f"interface {ep.ifname} of {p.netns} already has an ingress qdisc; uvmshim "
                "needs it for the redirect into the UVM",
                hint="remove it (tc qdisc del dev IF ingress) or connect another interface") \
                from e
        raise
    if fail_after == "veth-redirect":
        raise NetworkError(f"injected failure after redirecting {ep.ifname}")
    _redirect(ipr, p.tap_index, ep.index)
    p.steps.append("tap-redirect")


def _unplumb(ipr: IPRoute, p: Plumbing, *, keep_tap: bool = False) -> list[str]:
    problems: list[str] = []
    if "veth-redirect" in p.steps and p.endpoint is not None:
        try:
            ipr.tc("del", "ingress", p.endpoint.index, "ffff:")
        except Exception as e:
            code = getattr(e, "code", None)
            if code not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                problems.append(f"removing the redirect of {p.endpoint.ifname}: {e}")
    if "tap" in p.steps and not keep_tap:
        try:
            found = ipr.link_lookup(ifname=p.tap)
            if found:
                ipr.link("del", index=found[0])
        except Exception as e:
            code = getattr(e, "code", None)
            if code != errno.ENODEV:
                problems.append(f"removing {p.tap}: {e}")
    return problems


def _undo_failed(ipr: IPRoute, p: Plumbing, *, keep_tap: bool = False) -> None:
    """Undo what a failed set-up made of ``p`` (all but its tap with ``keep_tap``). What could
    not be undone stays in ``p.steps`` (and so in the journal), with a warning."""
    problems = _unplumb(ipr, p, keep_tap=keep_tap)
    if problems:
        log.warning("undoing a failed network set-up: %s", "; ".join(problems))
    else:
        p.steps[:] = [s for s in p.steps if keep_tap and s == "tap"]


#: Test hook: make :func:`plumb` fail right after this step (``tap``, ``veth-redirect``).
FAIL_AFTER: str = ""


async def plumb(netns: str, endpoint: Endpoint, tap: str) -> Plumbing:
    """Create tap ``tap`` in ``netns`` and the redirects between it and ``endpoint``.

    :returns: the plumbing, holding the tap's descriptor (the caller passes it to QEMU and
        closes its own copy).
    :raises NetworkError: nothing is left behind then.
    """
    p = Plumbing(netns, endpoint, tap)
    fail_after = FAIL_AFTER

    def work(ipr: IPRoute) -> Plumbing:
        try:
            _plumb(ipr, p, fail_after)
        except BaseException as e:
            _undo_failed(ipr, p)
            p.close_fd()
            if isinstance(e, NetworkError):
                raise
            if isinstance(e, OSError):
                raise NetworkError(f"creating {tap} for {endpoint.ifname} in {netns}: "
                                   f"{e.strerror}") from e
            raise _netlink_error(f"connecting {endpoint.ifname} of {netns} to {tap}", e) \
                from e
        return p

    _hold(p)  # before the tap: a SIGKILL at any point leaves a record
    try:
        return await in_netns(netns, work)
    except asyncio.CancelledError:
        if p.steps:  # the thread finished after all: undo it
            with contextlib.suppress(BaseException):
                await unplumb(p)
        if not p.steps:
            _unhold(p)
        raise
    except BaseException:
        if not p.steps:  # else something stayed: the journal keeps the record
            _unhold(p)
        raise


async def unplumb(p: Plumbing) -> None:
    """Delete ``p``'s redirects and tap (what is already gone is fine).

    :raises NetworkError: something stayed.
    """
    p.close_fd()
    if not p.steps:
        _unhold(p)
        return
    try:
        problems = await in_netns(p.netns, lambda ipr: _unplumb(ipr, p))
    except NetworkError as e:
        if not os.path.exists(p.netns):
            problems = []  # the namespace is gone, and everything in it
        else:
            raise NetworkError(f"removing {p.tap}: {e}") from e
    if problems:
        raise NetworkError("; ".join(problems))
    p.steps.clear()
    _forget_ready(p)
    _unhold(p)


# Section: the ready NIC's tap

#: ``(namespace realpath, tap)`` of the ready NICs' taps this process made: what
#: :func:`read_endpoints` does not count as the namespace's (nor as another UVM's).
_ready_taps: set[tuple[str, str]] = set()
_ready_lock = threading.Lock()


def _forget_ready(p: Plumbing) -> None:
    with _ready_lock:
        _ready_taps.discard((os.path.realpath(p.netns), p.tap))


def scratch_tap() -> tuple[int, int]:
    """A tap in a new network namespace of its own, connected to nothing: a template's ready
    NIC's (its driver binds with a tap, as its clones' will). Blocking.

    :returns: the tap's descriptor and the namespace's (which keeps it alive: close it after
        the tap's last descriptor).
    """
    def work() -> tuple[int, int]:
        if _libc().unshare(_CLONE_NEWNET) != 0:  # this thread's namespace only
            err = ctypes.get_errno()
            raise OSError(err, f"a network namespace: {os.strerror(err)}")
        ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _create_tap(f"{TAP_PREFIX}t"), ns
        except BaseException:
            os.close(ns)
            raise

    # A thread of its own, which ends in the new namespace.
    return _in_ns_thread(None, work).result()


async def make_tap(netns: str, tap: str) -> Plumbing:
    """Create tap ``tap`` in ``netns``, connected to nothing yet (:func:`connect_tap`): the
    ready NIC's, which QEMU inherits as it starts. No netlink library: a thread enters the
    namespace and opens ``/dev/net/tun``.

    :returns: the plumbing, holding the tap's descriptor (the caller passes it to QEMU and
        closes its own copy; the tap goes when QEMU's copy is closed too).
    :raises NetworkError: the namespace is not one, or has a tap of ours (another UVM's).
    """
    p = Plumbing(netns, None, tap)

    def work() -> None:
        taps = [name for _, name in socket.if_nameindex() if name.startswith(TAP_PREFIX)]
        if taps:
            raise _connected_already(netns, taps[0])
        try:
            p.fd = _create_tap(tap)
        except OSError as e:
            raise NetworkError(f"creating {tap} in {netns}: {e.strerror}") from e
        p.steps.append("tap")

    _hold(p)  # before the tap: a SIGKILL at any point leaves a record
    try:
        await _await_thread(_in_ns_thread(netns, work))
    except BaseException:
        p.close_fd()  # the tap, if made, goes with its only descriptor
        p.steps.clear()
        _unhold(p)
        raise
    with _ready_lock:
        _ready_taps.add((os.path.realpath(netns), tap))
    return p


async def connect_tap(p: Plumbing, endpoint: Endpoint) -> None:
    """Redirect between ``p``'s tap (from :func:`make_tap`) and ``endpoint``'s interface, and
    bring the tap up with its MTU.

    :raises NetworkError: the redirects that were made are undone then (the tap stays: it is
        QEMU's, and goes with the VM or :func:`unplumb`).
    """
    p.endpoint = endpoint
    fail_after = FAIL_AFTER

    def work(ipr: IPRoute) -> None:
        try:
            _connect(ipr, p, _check_link(ipr, p), fail_after)
        except BaseException as e:
            _undo_failed(ipr, p, keep_tap=True)
            if isinstance(e, NetworkError):
                raise
            raise _netlink_error(f"connecting {endpoint.ifname} of {p.netns} to {p.tap}", e) \
                from e

    await in_netns(p.netns, work)


# Section: leftovers


@dataclass(frozen=True)
class Leftover:
    """A redirect of ours whose tap is gone (its uvmshim crashed), or, in a namespace whose
    owner is dead (:data:`uvmshim.owners.NET`), any redirect or tap of ours."""

    netns: str  # "" for the host's own namespace
    ifname: str
    index: int
    what: str
    #: A tap (deleted by :func:`reclaim`), not a redirect (the ingress qdisc is deleted).
    tap: bool = False

    def __str__(self) -> str:
        return f"{self.netns or 'host network namespace'}: {self.ifname}: {self.what}"


def _find_leftovers(ipr: IPRoute, netns: str, orphaned: bool = False) -> list[Leftover]:
    found: list[Leftover] = []
    names = {int(link["index"]): str(link.get("ifname")) for link in ipr.get_links()}
    for index, name in names.items():
        if orphaned and name.startswith(TAP_PREFIX):
            found.append(Leftover(netns, name, index, "uvmshim tap (its owner is gone)",
                                  tap=True))
            continue
        try:
            filters = ipr.get_filters(index=index, parent=0xFFFF0000)
        except Exception:
            continue
        for f in filters:
            if (f.get("info", 0) >> 16) != FILTER_PRIO:
                continue
            targets = [a.get("TCA_MIRRED_PARMS") for a in _mirred_actions(f)]
            alive = [t for t in targets if t is not None and
                     names.get(int(t["ifindex"]), "").startswith(TAP_PREFIX)]
            if orphaned or (not name.startswith(TAP_PREFIX) and not alive):
                found.append(Leftover(netns, name, index,
                                      "uvmshim redirect (its owner is gone)" if orphaned else
                                      "uvmshim redirect to a tap that is gone"))
                break
    return found


def _mirred_actions(msg: Any) -> Iterable[Any]:
    options = msg.get("TCA_OPTIONS")
    if options is None:
        return []
    act = options.get("TCA_U32_ACT")
    if act is None:
        return []
    out = []
    for prio in act.get("attrs", []):
        value = prio[1]
        if hasattr(value, "get") and value.get("TCA_ACT_KIND") == "mirred":
            opts = value.get("TCA_ACT_OPTIONS")
            if opts is not None:
                out.append(opts)
    return out


def named_namespaces() -> list[str]:
    """Every named network namespace file (``/run/netns/*``), the host's own first as ""."""
    seen: set[tuple[int, int]] = set()
    out = [""]
    for d in NETNS_DIRS:
        with contextlib.suppress(OSError):
            for entry in sorted(d.iterdir()):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        out.append(str(entry))
    return out


def _namespaces(namespaces: Iterable[str] | None,
                orphaned: Iterable[str]) -> list[tuple[str, bool]]:
    """``(path, orphaned)`` of each namespace to look at: ``namespaces`` (default: the host's
    and the named ones) and the ``orphaned`` ones (recorded by a dead owner)."""
    dead = list(dict.fromkeys(os.path.abspath(ns) for ns in orphaned))
    real = {os.path.realpath(ns) for ns in dead}
    out = [(ns, False) for ns in (namespaces if namespaces is not None else named_namespaces())
           if not ns or os.path.realpath(ns) not in real]
    return out + [(ns, True) for ns in dead]


async def find_leftovers(namespaces: Iterable[str] | None = None,
                         orphaned: Iterable[str] = ()) -> list[Leftover]:
    """Redirects of ours left behind in the host's namespace and the named ones; every tap
    and redirect of ours in the ``orphaned`` namespaces (their owner is dead)."""
    found: list[Leftover] = []
    for ns, dead in _namespaces(namespaces, orphaned):
        try:
            look = functools.partial(_find_leftovers, netns=ns, orphaned=dead)
            found += await in_netns(ns or None, look)
        except (NetworkError, OSError) as e:
            log.debug("looking at %s: %s", ns, e)
    return found


def _drop_redirect(ipr: IPRoute, *, left: Leftover) -> None:
    """In ``left``'s namespace: delete its tap, or its interface's ingress qdisc, if still
    there."""
    try:
        if left.tap:
            found = ipr.link_lookup(ifname=left.ifname)
            if found:
                ipr.link("del", index=found[0])
        else:
            ipr.tc("del", "ingress", left.index, "ffff:")
    except Exception as e:
        if getattr(e, "code", None) not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
            raise _netlink_error(f"removing {left}", e) from e


async def reclaim(left: Leftover) -> None:
    """Delete a leftover redirect (the interface's ingress qdisc)."""
    await in_netns(left.netns or None, functools.partial(_drop_redirect, left=left))


def find_leftovers_sync(namespaces: Iterable[str] | None = None,
                        orphaned: Iterable[str] = ()) -> list[Leftover]:
    """:func:`find_leftovers` for callers without an event loop (``uvmshim leaks``)."""
    found: list[Leftover] = []
    for ns, dead in _namespaces(namespaces, orphaned):
        try:
            look = functools.partial(_find_leftovers, netns=ns, orphaned=dead)
            found += _in_thread(ns or None, look).result(30)
        except (NetworkError, OSError, concurrent.futures.TimeoutError) as e:
            log.debug("looking at %s: %s", ns, e)
    return found


def reclaim_sync(left: Leftover) -> None:
    """:func:`reclaim` for callers without an event loop."""
    _in_thread(left.netns or None, functools.partial(_drop_redirect, left=left)).result(30)


def reclaim_namespace_sync(netns: str) -> list[str]:
    """Delete every tap and redirect of ours in ``netns``, whose owner is dead (the
    :data:`uvmshim.owners.NET` reclaimer); the problems, one line each. A path that is no
    longer a network namespace has nothing of ours."""
    try:
        look = functools.partial(_find_leftovers, netns=netns, orphaned=True)
        lefts = _in_thread(netns, look).result(30)
    except NetworkError as e:
        log.debug("looking at %s: %s", netns, e)
        return []
    except (OSError, concurrent.futures.TimeoutError) as e:
        return [f"looking at {netns}: {e}"]
    problems: list[str] = []
    for left in lefts:
        try:
            reclaim_sync(left)
        except (NetworkError, OSError, concurrent.futures.TimeoutError) as e:
            problems.append(f"could not remove {left}: {e}")
    return problems

