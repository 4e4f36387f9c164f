"""Networking on real UVMs (#11): podman's default network with a published port, a pod whose
containers talk over localhost, a container reaching another on the same podman network, a
clean teardown and clear errors for bad network namespaces.

Only loopback and addresses inside the networks these tests create (their own namespaces and
a podman network with its own subnet) are ever contacted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_oci_clients import ETC_FILES, Runc, make_bundle, podman, sandbox_fixes, wait_for
from uvmshim.runtime.vm import QemuUvm
from uvmshim.uvm import hostnet
from uvmshim.uvm.network import NetworkNamespace

from helpers import busybox_rootfs, http_get, uvmshim_binary, veth_namespaces

pytestmark = pytest.mark.vm

__all__ = ["sandbox_fixes"]  # a fixture used here

APPLETS = ["sh", "echo", "cat", "sleep", "true", "ls", "ip", "nc", "httpd", "grep"]
#: The subnet of the podman network the tests create (theirs alone).
TEST_SUBNET = "10.89.77.0/24"


def make_rootfs(path: Path) -> Path:
    return busybox_rootfs(path, dirs=("bin", "proc", "sys", "dev", "etc", "tmp", "www"),
                          applets=APPLETS,
                          files={**ETC_FILES, "www/index.html": "hello from the uvm\n"})


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("net") / "rootfs")


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True).stdout


def host_traces(netns: str) -> list[str]:
    """What uvmshim may have left in ``netns``: taps, ingress qdiscs (looked at, not counted)."""
    left = [line for line in ip("-n", netns, "-o", "link").splitlines()
            if hostnet.TAP_PREFIX in line]
    qdiscs = subprocess.run(["tc", "-n", netns, "qdisc", "show"], check=True,
                            capture_output=True, text=True).stdout
    left += [line for line in qdiscs.splitlines() if "ingress" in line]
    return left


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    """Two namespaces of our own joined by a veth: ``c`` (the container's: c0, 10.99.0.2 and
    fd99::2) and ``s`` (a server's: s0, 10.99.0.1 and fd99::1)."""
    with veth_namespaces(f"{os.getpid() % 100000}") as pair:
        yield pair


def netns_bundle(tmp: Path, rootfs: Path, args: list[str], netns: str,
                 annotations: dict[str, str] | None = None) -> Path:
    b = make_bundle(tmp, rootfs, args)
    spec = json.loads((b / "config.json").read_text())
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = f"/run/netns/{netns}"
    if annotations:
        spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    return b


GET = "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc {addr} {port}"


# Section: podman ------------------------------------------------------------------------------


def test_podman_default_network_published_port(rootfs: Path,
                                                sandbox_fixes: dict[str, str]) -> None:
    _need("podman", "conmon")
    env = sandbox_fixes
    name = f"uvmshim-net-{os.getpid()}"
    podman(env, "run", "-d", "--name", name, "-p", "127.0.0.1:18080:8080", "--rootfs",
           str(rootfs), "sh", "-c", "trap 'exit 0' TERM; httpd -p 8080 -h /www; "
           "while :; do sleep 1; done")
    try:
        assert http_get("http://127.0.0.1:18080/index.html") == "hello from the uvm\n"
        assigned = podman(env, "inspect", "-f", "{{.NetworkSettings.IPAddress}}",
                          name).stdout.strip()
        assert assigned
        shown = podman(env, "exec", name, "ip", "-o", "-4", "addr", "show", "eth0").stdout
        assert f"inet {assigned}/" in shown
        netns = podman(env, "inspect", "-f", "{{.NetworkSettings.SandboxKey}}",
                       name).stdout.strip()
        assert hostnet.TAP_PREFIX in ip("-n", os.path.basename(netns), "-o", "link")
    finally:
        podman(env, "rm", "-f", "-t", "2", name, check=False)
    assert not [line for line in ip("-o", "link").splitlines() if hostnet.TAP_PREFIX in line]


@pytest.fixture
def podman_network(sandbox_fixes: dict[str, str]) -> Iterator[str]:
    _need("podman", "conmon")
    net = f"uvmshim-test-{os.getpid()}"
    podman(sandbox_fixes, "network", "create", "--subnet", TEST_SUBNET, net)
    try:
        yield net
    finally:
        podman(sandbox_fixes, "network", "rm", "-f", net, check=False)


@pytest.mark.parametrize("server_runtime", ["crun", "uvmshim"])
def test_reach_a_server_on_the_same_podman_network(rootfs: Path, podman_network: str,
                                                   sandbox_fixes: dict[str, str],
                                                   server_runtime: str) -> None:
    env = sandbox_fixes
    server = f"uvmshim-srv-{os.getpid()}"
    runtime = "crun" if server_runtime == "crun" else uvmshim_binary()
    res = subprocess.run(
        ["podman", "--runtime", runtime, "run", "-d", "--name", server, "--network",
         podman_network, "--rootfs", str(rootfs), "httpd", "-f", "-p", "8080", "-h", "/www"],
        env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    try:
        addr = podman(env, "inspect", "-f",
                      f"{{{{(index .NetworkSettings.Networks \"{podman_network}\").IPAddress}}}}",
                      server).stdout.strip()
        assert addr.startswith("10.89.77.")
        out = podman(env, "run", "--rm", "--network", podman_network, "--rootfs", str(rootfs),
                     "sh", "-c", f"for i in 1 2 3 4 5 6 7 8 9 10; do "
                     f"{GET.format(addr=addr, port=8080)} && exit 0; sleep 1; done; exit 1")
        assert out.stdout.endswith("hello from the uvm\n")
    finally:
        subprocess.run(["podman", "--runtime", runtime, "rm", "-f", "-t", "1", server],
                       env=env, capture_output=True, check=False)


# Section: our own namespaces ----------------------------------------------------------------


def test_pod_containers_share_localhost_and_teardown_is_clean(
        tmp_path: Path, rootfs: Path, netns_pair: tuple[str, str]) -> None:
    """A pod (CRI annotations): the sandbox serves on 127.0.0.1, the workload container (in the
    same UVM, the same guest network namespace) reaches it; the sandbox is reachable from the
    server namespace on its address; afterwards nothing is left in the namespace."""
    c, s = netns_pair
    runc = Runc(tmp_path / "root")
    pod = {"io.kubernetes.cri.sandbox-id": "netpod"}
    sb = netns_bundle(tmp_path / "sb", rootfs,
                      ["sh", "-c", "httpd -p 127.0.0.1:8080 -h /www; httpd -p 8081 -h /www; "
                       "trap 'exit 0' TERM; while :; do sleep 1; done"], c,
                      {**pod, "io.kubernetes.cri.container-type": "sandbox"})
    w = netns_bundle(tmp_path / "w", rootfs, ["sh", "-c", GET.format(addr="127.0.0.1",
                                                                       port=8080)], c,
                     {**pod, "io.kubernetes.cri.container-type": "container"})
    runc("create", "--bundle", str(sb), "netpod", stdin=subprocess.DEVNULL,
         output=subprocess.DEVNULL)
    try:
        runc("start", "netpod")
        assert hostnet.TAP_PREFIX in ip("-n", c, "-o", "link")
        out = tmp_path / "w.out"
        with open(out, "wb") as f:
            runc("create", "--bundle", str(w), "w1", stdin=subprocess.DEVNULL,
                 output=f.fileno())
        runc("start", "w1")
        wait_for(lambda: runc.status("w1") == "stopped")
        assert out.read_text().endswith("hello from the uvm\n")
        runc("delete", "w1")
        # From the other end of the veth, to the sandbox's address (v4 and v6).
        for addr in ("10.99.0.2", "fd99::2"):
            res = subprocess.run(
                ["ip", "netns", "exec", s, "python3", "-c",
                 "import socket,sys; a=sys.argv[1]; "
                 "k=socket.create_connection((a, 8081), timeout=20); "
                 "k.sendall(b'GET /index.html HTTP/1.0\\r\\n\\r\\n'); "
                 "print(b''.join(iter(lambda: k.recv(4096), b'')).decode())", addr],
                capture_output=True, text=True, timeout=60)
            assert res.stdout.rstrip().endswith("hello from the uvm"), res.stderr
    finally:
        runc("delete", "--force", "netpod", check=False)
    assert host_traces(c) == []


def test_sigkilled_owner_leaves_a_redirect_that_leaks_reclaims(
        tmp_path: Path, rootfs: Path, netns_pair: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runc shim (the owner of the UVM, the tap and the redirects) is SIGKILLed: QEMU
    dies with it and takes the tap along; the veth's redirect stays, and the shim's journal
    names the namespace: ``uvmshim leaks`` lists it, ``--reclaim`` removes it. Every uvmshim
    directory is the test's own (``--reclaim`` touches only what it made)."""
    from uvmshim import owners

    c, _ = netns_pair
    for var, sub in (("UVMSHIM_OWNERS_DIR", "owners"), ("UVMSHIM_VM_DIR", "vm"),
                     ("UVMSHIM_ROOT", "root"), ("UVMSHIM_POD_DIR", "pods")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    runc = Runc(tmp_path / "root")
    b = netns_bundle(tmp_path / "k", rootfs, ["sh", "-c", "while :; do sleep 1; done"], c)
    runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "netk",
         stdin=subprocess.DEVNULL, output=subprocess.DEVNULL)
    try:
        assert hostnet.TAP_PREFIX in ip("-n", c, "-o", "link")
        recorded = [(e.kind, e.path) for j in owners.read_journals(tmp_path / "owners")
                    for e in j.entries]
        assert (owners.NET, f"/run/netns/{c}") in recorded, recorded
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
        # QEMU dies with its owner, and its tap with it; the veth's redirect stays.
        wait_for(lambda: hostnet.TAP_PREFIX not in ip("-n", c, "-o", "link"))
        assert host_traces(c) != []
        res = subprocess.run([uvmshim_binary(), "leaks", "--json"], capture_output=True,
                             text=True, timeout=120)
        listed = json.loads(res.stdout)["net_redirects"]
        assert f"/run/netns/{c}: c0: uvmshim redirect (its owner is gone)" in listed, listed
        res = subprocess.run([uvmshim_binary(), "leaks", "--reclaim", "--json"],
                             capture_output=True, text=True, timeout=300)
        assert json.loads(res.stdout)["net_redirects"] == [], res.stdout + res.stderr
        assert host_traces(c) == []
    finally:
        runc("delete", "--force", "netk", check=False)
        subprocess.run([uvmshim_binary(), "gc"], capture_output=True, timeout=120)


def test_bad_network_namespaces(tmp_path: Path, rootfs: Path,
                                netns_pair: tuple[str, str]) -> None:
    c, _ = netns_pair
    runc = Runc(tmp_path / "root")
    # A path that does not exist: a clear error, nothing left.
    b = netns_bundle(tmp_path / "a", rootfs, ["true"], "no-such-netns-here")
    res = runc("create", "--bundle", str(b), "bad1", check=False)
    assert res.returncode == 1
    assert "/run/netns/no-such-netns-here: No such file or directory" in res.stderr
    # Nine interfaces: more than a UVM takes; refused before anything is connected.
    for i in range(4):  # (this host's kernel has no dummy interfaces)
        ip("-n", c, "link", "add", f"d{i}", "type", "veth", "peer", "name", f"e{i}")
    b = netns_bundle(tmp_path / "b", rootfs, ["true"], c)
    res = runc("create", "--bundle", str(b), "bad2", check=False)
    assert res.returncode == 1 and "has 9 interfaces besides lo" in res.stderr, res.stderr
    assert host_traces(c) == []
    # IPv6 only: works (the guest gets the same address).
    for i in range(4):
        ip("-n", c, "link", "del", f"d{i}")
    ip("-n", c, "-4", "addr", "flush", "dev", "c0")
    b = netns_bundle(tmp_path / "c", rootfs, ["ip", "-o", "addr", "show", "c0"], c)
    out = tmp_path / "v6.out"
    with open(out, "wb") as f:
        runc("create", "--bundle", str(b), "v6", stdin=subprocess.DEVNULL, output=f.fileno())
    runc("start", "v6")
    wait_for(lambda: runc.status("v6") == "stopped")
    runc("delete", "v6")
    text = out.read_text()
    assert "inet6 fd99::2/64" in text and "inet " not in text
    assert host_traces(c) == []
    assert not list((runc.root / "containers").iterdir())


# Section: the ready NIC ------------------------------------------------------------------------


async def _connect_ready(uvm: QemuUvm, path: str) -> tuple[NetworkNamespace, list[str]]:
    """Connect the namespace ``path`` to ``uvm`` (started for it); the guest namespace and
    the names of QEMU's user-created devices (``nic-ready``, ``nic-nic<n>`` hot-added)."""
    from uvmshim.uvm.network import connect_network

    ns = await connect_network(uvm.vm.network, {"namespaces": [
        {"type": "network", "path": path}]}, {})
    assert ns is not None
    peripherals = await uvm.machine.qmp.execute("qom-list", {"path": "/machine/peripheral"})
    assert isinstance(peripherals, list)
    return ns, sorted(p["name"] for p in peripherals)


@pytest.mark.parametrize("template", [True, False], ids=["clone", "cold-boot"])
def test_first_interface_takes_the_ready_nic(netns_pair: tuple[str, str],
                                             template: bool) -> None:
    """A UVM started for a namespace (as the runtime starts one) connects that namespace's
    first interface to its ready NIC: no NIC is hot-added, the guest's interface has the
    endpoint's MAC, addresses and offloads (negotiated with a tap), traffic flows both ways;
    afterwards the tap, the redirects and the guest's interface are gone, the UVM still up.
    A clone finds the NIC bound and parked in its first namespace by its template; a cold
    boot binds it and makes the namespace then."""
    import asyncio

    from uvmshim.runtime.vm import start_uvm

    c, _ = netns_pair
    path = f"/run/netns/{c}"

    async def guest(uvm: QemuUvm, script: str) -> str:
        return (await uvm.agent.exec(["sh", "-c", script], timeout=60)).stdout.decode()

    async def go() -> None:
        async with start_uvm(netns=path, template=template) as uvm:
            ns, names = await _connect_ready(uvm, path)
            assert "nic-ready" in names and not [n for n in names if n.startswith("nic-nic")]
            mac = ns.endpoints[0].mac
            out = await guest(uvm, f"nsenter --net={ns.guest_path} ip addr show c0; "
                                   f"nsenter --net={ns.guest_path} ping -c 1 -W 10 10.99.0.1; "
                                   "cat /sys/bus/pci/devices/0000:00:09.0/virtio*/features")
            assert mac in out and "inet 10.99.0.2/24" in out and "inet6 fd99::2/64" in out
            assert "1 packets received" in out, out
            features = out.strip().splitlines()[-1]
            assert features[0] == "1" and features[11] == "1"  # CSUM, HOST_TSO4
            await ns.release()
            assert host_traces(c) == []
            out = await guest(uvm, "ls /sys/bus/pci/devices/0000:00:09.0/virtio*/")
            assert "net" not in out.split() and "driver" not in out.split()
            assert uvm.machine.pid is not None

    asyncio.run(go())


def test_second_interface_is_hot_added_beside_the_ready_nic(
        netns_pair: tuple[str, str]) -> None:
    """A namespace with two interfaces: the first takes the ready NIC, the second is
    hot-added; both are configured in the guest; releasing them (newest first) unbinds the
    ready NIC's driver and leaves nothing on the host."""
    import asyncio

    from uvmshim.runtime.vm import start_uvm

    c, s = netns_pair
    path = f"/run/netns/{c}"
    ip("-n", c, "link", "add", "d0", "type", "veth", "peer", "name", "e0", "netns", s)
    ip("-n", c, "addr", "add", "10.98.5.2/24", "dev", "d0")
    ip("-n", c, "link", "set", "d0", "up")

    async def go() -> None:
        async with start_uvm(netns=path) as uvm:
            ns, names = await _connect_ready(uvm, path)
            assert len([n for n in names if n.startswith("nic-nic")]) == 1
            res = await uvm.agent.exec(["nsenter", f"--net={ns.guest_path}", "ip", "-o",
                                        "addr"], timeout=60)
            out = res.stdout.decode()
            assert "inet 10.99.0.2/24" in out and "inet 10.98.5.2/24" in out, out
            await ns.release()
            assert host_traces(c) == []
            res = await uvm.agent.exec(["sh", "-c",
                                        "ls /sys/bus/pci/devices/0000:00:09.0/virtio*/"],
                                       timeout=60)
            left = res.stdout.decode().split()
            assert "net" not in left and "driver" not in left, left

    asyncio.run(go())
