"""Networking without a VM: the endpoint manager on the simulated UVM (a failure at every step
undoes everything), the host plumbing in a namespace of our own (taps, tc redirects; faults and
a vanishing interface), and the wire forms of routes."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

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
    assert _route("::/0 via fd00::1 metric 1024") == (["::/0", "via", "fd00::1", "metric",
                                                       "1024"], 6)
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
