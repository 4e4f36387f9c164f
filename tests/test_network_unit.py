"""Networking without a VM: the endpoint manager on the simulated UVM (a failure at every step
undoes everything), the host plumbing in a namespace of our own (taps, tc redirects; faults and
a vanishing interface), and the wire forms of routes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmshim.agent.network import _address, _route
from uvmshim.agent.util import AgentError
from uvmshim.errors import UvmshimError
from uvmshim.protocol.messages import ProtocolError
from uvmshim.protocol.requests import AddNic, decode_request, format_route, parse_route
from uvmshim.uvm import hostnet
from uvmshim.uvm.hostnet import Endpoint, NetworkError
from uvmshim.uvm.network import MAX_INTERFACES, rewrite_netns, spec_netns_path
from uvmshim.uvm.sim import simulated_uvm

EPS = [
    Endpoint("eth0", 2, "02:00:00:00:00:01", 1500, ("10.88.0.5/16", "fd00::5/64"),
             ("0.0.0.0/0 via 10.88.0.1", "::/0 via fd00::1 metric 1024")),
    Endpoint("eth1", 3, "02:00:00:00:00:02", 9000, ("192.168.7.2/24",), ()),
]


# Section: the manager on the simulated UVM


def test_network_namespace_lifecycle_and_sharing() -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        first = await vm.network.add("k", EPS, host_path="/run/netns/x")
        second = vm.network.find("k")
        assert second is not None and second.guest_path == first.guest_path
        ops = [(o.side, o.op) for o in backend.operations]
        assert ops == [("guest", "add-netns"), ("host", "nic-add"), ("guest", "add-nic"),
                       ("host", "nic-add"), ("guest", "add-nic")]
        await first.release()
        assert backend.nics  # the second reference keeps it
        await second.release()
        await second.release()  # a second release is a no-op
        assert backend.live() == {}
        ops = [(o.side, o.op) for o in backend.operations][5:]
        assert ops == [("guest", "remove-nic"), ("host", "nic-remove"), ("guest", "remove-nic"),
                       ("host", "nic-remove"), ("guest", "remove-netns")]
        assert vm.network.namespaces() == []

    asyncio.run(go())


def test_a_failure_at_every_step_undoes_everything() -> None:
    async def go(n: int) -> bool:
        vm, backend = simulated_uvm(fail_at=[n])
        try:
            ns = await vm.network.add("k", EPS, host_path="/run/netns/x")
        except UvmshimError:
            assert backend.live() == {}, n
            assert vm.network.namespaces() == []
            return True
        try:
            await ns.release()
        except UvmshimError:
            await ns.release()  # what failed stays tracked: the retry finishes the job
        assert backend.live() == {}
        assert vm.network.namespaces() == []
        return False

    failed = [n for n in range(1, 12) if asyncio.run(go(n))]
    assert failed == [1, 2, 3, 4, 5]  # every add step


def test_too_many_interfaces() -> None:
    async def go() -> None:
        vm, backend = simulated_uvm()
        many = [Endpoint(f"e{i}", i, f"02:00:00:00:01:{i:02x}", 1500)
                for i in range(MAX_INTERFACES + 1)]
        with pytest.raises(NetworkError, match="has 9 interfaces besides lo"):
            await vm.network.add("k", many, host_path="/run/netns/x")
        assert backend.operations == []

    asyncio.run(go())


def test_spec_rewrite() -> None:
    linux = {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/a"}]}
    assert spec_netns_path(linux) == "/run/netns/a"
    assert spec_netns_path({"namespaces": [{"type": "network"}]}) == ""
    assert spec_netns_path(None) == ""
    with pytest.raises(NetworkError, match=r"linux.namespaces\[0\].path"):
        spec_netns_path({"namespaces": [{"type": "network", "path": 3}]})
    oci = {"linux": linux}
    rewrite_netns(oci, "/run/uvmshim/netns/ns0")
    assert linux["namespaces"][1] == {"type": "network", "path": "/run/uvmshim/netns/ns0"}


# Section: wire forms


def test_routes_round_trip_and_refusals() -> None:
    for dest, gw, metric in (("0.0.0.0/0", "10.0.0.1", 0), ("::/0", "fe80::1", 1024),
                             ("10.1.0.0/16", "", 5)):
        assert parse_route(format_route(dest, gw, metric)) == (dest, gw, metric)
    for bad in ("", "default", "10.0.0.0/8 via", "10.0.0.0/8 dev eth0", "1.0.0.0/8 metric x"):
        with pytest.raises(ProtocolError):
            parse_route(bad)
    req = decode_request("add_nic", {"ns_id": "ns0", "nic_id": "nic0", "mac": EPS[0].mac,
                                     "ifname": "eth0", "routes": list(EPS[0].routes)})
    assert isinstance(req, AddNic) and req.routes == EPS[0].routes
    route = _route("::/0 via fd00::1 metric 1024")
    assert route.args() == ["::/0", "via", "fd00::1", "metric", "1024"]
    assert (route.prefix, route.metric, route.net) == (0, 1024, bytes(16))
    assert _route("10.1.2.3/16").args() == ["10.1.0.0/16"]  # the network, as ip wants it
    assert _address("10.88.0.5/16") == ("10.88.0.5/16", 4)
    for bad_route in ("10.0.0.0/8 via fd00::1", "300.0.0.0/8"):
        with pytest.raises(AgentError):
            _route(bad_route)
    for bad_addr in ("10.0.0.1", "10.0.0.1/40", "eth0; reboot"):
        with pytest.raises(AgentError):
            _address(bad_addr)


# Section: host plumbing (root, a namespace of our own)


def _ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    name = f"uvmunit{os.getpid() % 100000}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", name, "addr", "add", "10.98.0.2/24", "dev", "v0")
        _ip("-n", name, "link", "set", "v0", "up")
        _ip("-n", name, "route", "add", "default", "via", "10.98.0.1")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _traces(name: str) -> list[str]:
    links = [x for x in _ip("-n", name, "-o", "link").splitlines() if hostnet.TAP_PREFIX in x]
    qdiscs = subprocess.run(["tc", "-n", name, "qdisc", "show"], check=True,
                            capture_output=True, text=True).stdout
    return links + [x for x in qdiscs.splitlines() if "ingress" in x]


def test_plumbing_faults_and_leftovers(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"/run/netns/{netns}"

    async def go() -> None:
        eps = {e.ifname: e for e in await hostnet.read_endpoints(path)}
        v0 = eps["v0"]
        assert v0.addresses == ("10.98.0.2/24",) and v0.routes == ("0.0.0.0/0 via 10.98.0.1",)
        for step in ("tap", "veth-redirect"):
            monkeypatch.setattr(hostnet, "FAIL_AFTER", step)
            with pytest.raises(NetworkError, match="injected failure"):
                await hostnet.plumb(path, v0, "uvmtap0")
            assert _traces(netns) == []
        monkeypatch.setattr(hostnet, "FAIL_AFTER", "")
        p = await hostnet.plumb(path, v0, "uvmtap0")
        assert p.fd >= 0 and len(_traces(netns)) == 3  # the tap and two ingress qdiscs
        with pytest.raises(NetworkError, match="already connected to a UVM"):
            await hostnet.read_endpoints(path)
        p.close_fd()  # as if QEMU died: the tap goes, the veth's redirect stays
        left = await hostnet.find_leftovers([path])
        assert [(x.ifname, x.netns) for x in left] == [("v0", path)]
        for x in left:
            await hostnet.reclaim(x)
        assert _traces(netns) == []
        await hostnet.unplumb(p)  # what is gone already is fine
        # An interface that vanishes between reading and connecting.
        _ip("-n", netns, "link", "del", "v0")
        with pytest.raises(NetworkError, match="went away"):
            await hostnet.plumb(path, v0, "uvmtap1")
        assert _traces(netns) == []

    asyncio.run(go())


def _nsenter(path: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={path}", *argv], check=True,
                          capture_output=True, text=True).stdout


def test_sigkilled_owner_taps_and_redirects_are_found_and_reclaimed(
        netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owners journal records a namespace before uvmshim's first tap there: after a
    SIGKILL of the owner, ``uvmshim leaks`` lists its tap (still held by a process that
    outlived it, as a QEMU without its parent-death signal would) and redirect although the
    namespace's file is not where named namespaces live, and ``--reclaim`` deletes them."""
    from uvmshim import owners

    env = {**os.environ}
    for var, sub in {"UVMSHIM_OWNERS_DIR": "owners", "UVMSHIM_VM_DIR": "vm",
                     "UVMSHIM_ROOT": "root", "UVMSHIM_POD_DIR": "pods"}.items():
        env[var] = str(tmp_path / sub)
        monkeypatch.setenv(var, env[var])
    monkeypatch.setattr(owners, "_journal", None)
    # The namespace's only file is ours, outside /run/netns.
    path = tmp_path / "netns"
    path.touch()
    subprocess.run(["mount", "--bind", f"/run/netns/{netns}", str(path)], check=True)
    holder_pid = 0
    try:
        _ip("netns", "del", netns)
        code = textwrap.dedent(f"""
            import asyncio, subprocess, sys
            from uvmshim.uvm import hostnet
            async def go():
                [v0] = [e for e in await hostnet.read_endpoints({str(path)!r})
                        if e.ifname == "v0"]
                p = await hostnet.plumb({str(path)!r}, v0, "uvmtap0")
                q = subprocess.Popen(["sleep", "600"], pass_fds=(p.fd,))
                print(q.pid, flush=True)
            asyncio.run(go())
            import time; time.sleep(600)
        """)
        owner = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                 stdout=subprocess.PIPE)
        assert owner.stdout is not None
        holder_pid = int(owner.stdout.readline())
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        links = _nsenter(str(path), "ip", "-o", "link")
        assert "uvmtap0" in links
        assert "ingress" in _nsenter(str(path), "tc", "qdisc", "show", "dev", "v0")
        res = subprocess.run([sys.executable, "-m", "uvmshim", "leaks", "--json"], env=env,
                             capture_output=True, text=True, timeout=120)
        listed = json.loads(res.stdout)["net_redirects"]
        assert f"{path}: uvmtap0: uvmshim tap (its owner is gone)" in listed, listed
        assert f"{path}: v0: uvmshim redirect (its owner is gone)" in listed, listed
        res = subprocess.run([sys.executable, "-m", "uvmshim", "leaks", "--reclaim", "--json"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(res.stdout)["net_redirects"] == [], res.stdout + res.stderr
        assert "uvmtap" not in _nsenter(str(path), "ip", "-o", "link")
        assert "ingress" not in _nsenter(str(path), "tc", "qdisc", "show")
        assert [j for j in owners.read_journals() if j.entries] == []
    finally:
        if holder_pid:
            os.kill(holder_pid, signal.SIGKILL)
        subprocess.run(["umount", str(path)], check=False)


def test_journal_records_the_namespace_while_plumbed(
        netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uvmshim import owners

    monkeypatch.setenv("UVMSHIM_OWNERS_DIR", str(tmp_path / "owners"))
    monkeypatch.setattr(owners, "_journal", None)
    path = f"/run/netns/{netns}"

    def recorded() -> list[tuple[str, str]]:
        return [(e.kind, e.path) for j in owners.read_journals() for e in j.entries]

    async def go() -> None:
        [v0] = [e for e in await hostnet.read_endpoints(path) if e.ifname == "v0"]
        monkeypatch.setattr(hostnet, "FAIL_AFTER", "veth-redirect")
        with pytest.raises(NetworkError, match="injected failure"):
            await hostnet.plumb(path, v0, "uvmtap0")
        assert recorded() == []
        monkeypatch.setattr(hostnet, "FAIL_AFTER", "")
        p = await hostnet.plumb(path, v0, "uvmtap0")
        assert recorded() == [(owners.NET, path)]
        await hostnet.unplumb(p)
        assert recorded() == [] and _traces(netns) == []

    asyncio.run(go())


def test_agent_waits_for_a_link_by_its_announcement(netns: str) -> None:
    """The agent's wait for a hot-added NIC (run here in a namespace of our own, where a veth
    with the MAC appears a moment later) wakes on the kernel's link announcement."""
    code = textwrap.dedent("""
        import sys, time
        from uvmshim.agent.network import wait_link
        t0 = time.monotonic()
        print(wait_link(sys.argv[1], 0.2), flush=True)  # not there: None after the timeout
        assert time.monotonic() - t0 >= 0.2
        print("waiting", flush=True)
        print(wait_link(sys.argv[1], 30)[0], flush=True)
    """)
    mac = "02:00:00:75:76:09"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code, mac],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "None\n" and proc.stdout.readline() == "waiting\n"
    _ip("-n", netns, "link", "add", "w0", "address", mac, "type", "veth", "peer", "name", "w1")
    assert proc.stdout.readline() == "w0\n"
    assert proc.wait(timeout=30) == 0


def test_not_a_namespace(tmp_path: pytest.TempPathFactory) -> None:
    async def go() -> None:
        with pytest.raises(NetworkError, match="No such file or directory"):
            await hostnet.read_endpoints("/run/netns/no-such-namespace-anywhere")
        with pytest.raises(NetworkError, match="is not a network namespace"):
            await hostnet.read_endpoints("/etc/hostname")

    asyncio.run(go())


# Section: uvmshim's own user-mode network (--network=nat, -p)


def test_publish_rules_and_annotations() -> None:
    from uvmshim.uvm.network import (
        ANNOTATION_NETWORK,
        ANNOTATION_PUBLISH,
        network_annotations,
        publish_rule,
        user_network_forwards,
    )

    assert publish_rule("8080:80") == "tcp:0.0.0.0:8080-:80"  # podman's default: every address
    assert publish_rule("127.0.0.1:8080:80/udp") == "udp:127.0.0.1:8080-:80"
    for bad in ("80", "a:80", "8080:0", "8080:70000", "::1:80:80", "host:1:2", "1:2/sctp"):
        with pytest.raises(NetworkError):
            publish_rule(bad)
    assert network_annotations("none", []) == {}
    ann = network_annotations("nat", ["127.0.0.1:8080:80", "8080:80/udp"])
    assert ann == {ANNOTATION_NETWORK: "nat",
                   ANNOTATION_PUBLISH: "tcp:127.0.0.1:8080-:80,udp:0.0.0.0:8080-:80"}
    assert user_network_forwards(ann) == ["tcp:127.0.0.1:8080-:80", "udp:0.0.0.0:8080-:80"]
    assert user_network_forwards({}) is None
    for mode, publish in (("none", ["1:2"]), ("bridge", []), ("nat", ["1:2", "127.0.0.1:1:3"])):
        with pytest.raises(NetworkError):
            network_annotations(mode, publish)
    for bad_ann in ({ANNOTATION_NETWORK: "x"}, {ANNOTATION_PUBLISH: "tcp:0.0.0.0:1-:2"},
                    {ANNOTATION_NETWORK: "nat", ANNOTATION_PUBLISH: "tcp:0.0.0.0:1-:2,hostfwd"},
                    {ANNOTATION_NETWORK: "nat", ANNOTATION_PUBLISH: "tcp:0.0.0.0:1-:0"}):
        with pytest.raises(NetworkError):
            user_network_forwards(bad_ann)


def test_user_network_on_the_simulated_uvm() -> None:
    from uvmshim.uvm.network import connect_network, network_annotations

    ann = network_annotations("nat", ["127.0.0.1:8080:80"])
    linux = {"namespaces": [{"type": "network"}]}

    async def go() -> None:
        vm, backend = simulated_uvm()
        first = await connect_network(vm.network, linux, ann)
        second = await connect_network(vm.network, linux, {"io.uvmshim.network": "nat"})
        assert first is not None and second is not None
        assert first.guest_path == second.guest_path  # a pod's containers share it
        adds = [o for o in backend.operations if o.op == "nic-add"]
        assert len(adds) == 1 and adds[0].args["netns"] == ""
        assert adds[0].args["forwards"] == ["tcp:127.0.0.1:8080-:80"]
        [ep] = first.endpoints
        assert ep.addresses == ("10.0.2.15/24",) and ep.routes == ("0.0.0.0/0 via 10.0.2.2",)
        await first.release()
        await second.release()
        assert backend.live() == {}
        assert await connect_network(vm.network, linux, {}) is None
        with pytest.raises(NetworkError, match="asks for uvmshim.s user-mode network"):
            await connect_network(vm.network, {"namespaces": [
                {"type": "network", "path": "/run/netns/x"}]}, ann)
        with pytest.raises(NetworkError, match="network namespace of the container's own"):
            await connect_network(vm.network, {"namespaces": []}, ann)
        assert backend.live() == {}

    asyncio.run(go())


def test_pod_workloads_join_the_sandbox_network() -> None:
    from uvmshim.runtime.pod import _annotate, pause_spec
    from uvmshim.runtime.specgen import RunOptions, build_spec
    from uvmshim.uvm.network import ANNOTATION_NETWORK, ANNOTATION_PUBLISH

    sandbox = pause_spec("/r", network="nat", publish=["127.0.0.1:9000:80"])
    assert sandbox.annotations[ANNOTATION_PUBLISH] == "tcp:127.0.0.1:9000-:80"
    workload = build_spec(RunOptions(args=["true"], rootfs="/r", network="nat",
                                     publish=["9001:80"]))
    joined = _annotate(workload, "container", "p", sandbox.annotations)
    assert joined.annotations[ANNOTATION_NETWORK] == "nat"
    assert ANNOTATION_PUBLISH not in joined.annotations  # the sandbox publishes the pod's
    alone = _annotate(workload, "container", "p", pause_spec("/r").annotations)
    assert ANNOTATION_NETWORK not in alone.annotations


# Section: the ready NIC's tap, and the agent's netlink requests


def test_ready_tap_is_made_before_the_endpoint_and_connected_later(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ready NIC's tap exists before the endpoints are read (QEMU inherits it as it
    starts); reading them does not count it, nor take it for another UVM's; a failed
    connection undoes its redirects but leaves the tap (QEMU's); unplumbing removes all."""
    path = f"/run/netns/{netns}"

    async def go() -> None:
        p = await hostnet.make_tap(path, hostnet.READY_TAP)
        try:
            assert p.fd >= 0 and p.endpoint is None
            assert hostnet.READY_TAP in _ip("-n", netns, "-o", "link")
            eps = {e.ifname: e for e in await hostnet.read_endpoints(path)}
            assert sorted(eps) == ["v0", "v1"]  # not the tap
            with pytest.raises(NetworkError, match="already connected to a UVM"):
                await hostnet.make_tap(path, "uvmtap9")  # a second UVM on the namespace
            monkeypatch.setattr(hostnet, "FAIL_AFTER", "veth-redirect")
            with pytest.raises(NetworkError, match="injected failure"):
                await hostnet.connect_tap(p, eps["v0"])
            assert [t for t in _traces(netns) if hostnet.READY_TAP not in t] == []
            monkeypatch.setattr(hostnet, "FAIL_AFTER", "")
            await hostnet.connect_tap(p, eps["v0"])
            assert len(_traces(netns)) == 3  # the tap and two ingress qdiscs
            assert "mtu 1500" in _ip("-n", netns, "link", "show", hostnet.READY_TAP)
        finally:
            await hostnet.unplumb(p)
        assert _traces(netns) == []
        # Another UVM's tap: refused before anything is made.
        other = await hostnet.plumb(path, (await hostnet.read_endpoints(path))[0], "uvmtap0")
        try:
            with pytest.raises(NetworkError, match="already connected to a UVM"):
                await hostnet.make_tap(path, hostnet.READY_TAP)
        finally:
            await hostnet.unplumb(other)
        assert _traces(netns) == []

    asyncio.run(go())


def test_scratch_tap_lives_in_a_namespace_of_its_own() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    before = _ip("-o", "link")
    tap, ns = hostnet.scratch_tap()
    try:
        assert os.readlink(f"/proc/self/fd/{ns}") != os.readlink("/proc/self/ns/net")
        links = _nsenter(f"/proc/{os.getpid()}/fd/{ns}", "ip", "-o", "link")
        assert f"{hostnet.TAP_PREFIX}t" in links
        assert _ip("-o", "link") == before  # nothing in the host's namespace
    finally:
        os.close(tap)
        os.close(ns)


def test_agent_configures_a_namespace_over_netlink(netns: str) -> None:
    """The agent's netlink requests (run here in a namespace of our own): a link renamed,
    given a MAC and MTU and brought up in one request; IPv4 and IPv6 addresses and routes; a
    refusal comes back as the kernel's error."""
    code = textwrap.dedent("""
        import socket
        from uvmshim.agent import network as n
        sock = n._netlink()
        i = n.link_index(sock, "v1")
        n.set_link(sock, i, name="eth9", mtu=1400, up=True, mac="02:00:00:75:76:0a")
        assert n.link_index(sock, "eth9") == i
        for text in ("10.98.1.2/24", "fd98::2/64"):
            n.add_address(sock, i, *n._prefixed(text))
        for text in ("10.98.2.0/24 via 10.98.1.1 metric 7", "fd99::/64 via fd98::1",
                     "10.98.3.0/24"):
            r = n._route(text)
            n.add_route(sock, i, r.family, r.net, r.prefix, r.gateway, r.metric)
        try:
            n.add_address(sock, i, *n._prefixed("10.98.1.2/24"))
        except n.AgentError as err:
            print("refused:", err)
    """)
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                         check=True, capture_output=True, text=True).stdout
    assert "refused: adding 10.98.1.2/24: File exists" in out
    link = _ip("-n", netns, "link", "show", "eth9")
    assert "mtu 1400" in link and "02:00:00:75:76:0a" in link and "UP" in link
    addrs = _ip("-n", netns, "addr", "show", "eth9")
    assert "inet 10.98.1.2/24" in addrs and "inet6 fd98::2/64" in addrs
    v4 = _ip("-n", netns, "route", "show", "dev", "eth9")
    assert "10.98.2.0/24 via 10.98.1.1 metric 7" in v4 and "10.98.3.0/24 scope link" in v4
    assert "fd99::/64 via fd98::1" in _ip("-n", netns, "-6", "route", "show", "dev", "eth9")
