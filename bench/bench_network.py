"""Benchmark: container networking, uvmshim vs crun on the same podman network, same run.

1. **Set-up time** added to ``create`` by one interface: on a running UVM, connecting a network
   namespace of our own (a veth with IPv4 and IPv6 addresses and a default route) — reading it
   over netlink, the tap and tc redirects, the ``virtio-net-pci`` hot-add, the guest's
   namespace and configuration — and releasing it again (:func:`connect_network`); and the
   first connection on each of ``--fresh`` new UVMs (what a container with a UVM of its own
   pays: started for the namespace, as the runtime does, so its first interface takes the
   ready NIC); and, alternately with them, new UVMs started without a network: the time a
   network adds to start + connect is the difference of the two medians.
2. **TCP throughput host → container**: a bounded transfer (``--mb``, default 200 MB) from the
   host to ``127.0.0.1:<published port>``, where the container's ``nc -l`` discards it; the time
   runs until the container closed the connection (it read everything).
3. **HTTP GET round trip**: the median of ``--gets`` GETs (a new connection each, as busybox
   ``httpd`` closes them) to the container's ``httpd`` through the published port.

Both runtimes use a podman network the script creates (its own subnet) and are measured
alternately. Only loopback and addresses in the namespaces and network made here are contacted.

    python bench/bench_network.py [--mb 200] [--gets 50] [--repeat 3] [--setups 10] [--fresh 3]
                                  [--setup-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The shared test helpers live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import busybox_rootfs, podman_host_fixes, uvmshim_binary, veth_namespaces

SUBNET = "10.89.78.0/24"
APPLETS = ("sh", "nc", "httpd", "sleep", "cat", "ip")


def make_rootfs(path: Path) -> Path:
    return busybox_rootfs(path, dirs=("bin", "proc", "sys", "dev", "etc", "tmp", "www"),
                          applets=APPLETS, files={"www/index.html": "x" * 100 + "\n"})


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:7.1f} ms (n={len(xs)}, min {min(xs) * 1000:.1f})"


# Section: set-up time


async def setup_times(n: int, fresh: int = 0
                      ) -> tuple[dict[str, tuple[list[float], list[float]]],
                                 dict[str, list[float]]]:
    """Connect and release times of one interface, per kind: ``tap`` (a namespace of our own
    with a veth, the engines' case) and ``user`` (``--network=nat``: QEMU's user-mode
    network with one published port), alternately on one UVM; and ``tap first``, the first
    ``tap`` connection on each of ``fresh`` new UVMs (started with the namespace, as the
    runtime starts them). Then, with ``fresh``, start times: ``start+connect`` (the UVM's
    start and that connection) and ``start alone`` (new UVMs without a network,
    alternately)."""
    from uvmshim.runtime.vm import start_uvm
    from uvmshim.uvm.network import connect_network, network_annotations

    with veth_namespaces(f"b{os.getpid() % 100000}", "10.97.0", "fd97") as (c, _s):
        kinds = {
            "tap": ({"namespaces": [{"type": "network", "path": f"/run/netns/{c}"}]}, {}),
            "user": ({"namespaces": [{"type": "network"}]},
                     network_annotations("nat", ["127.0.0.1:18399:80"])),
        }
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in kinds}
        together: list[float] = []
        alone: list[float] = []
        starts = {"start+connect": together, "start alone": alone} if fresh else {}
        if fresh:  # not timed: builds the templates of both kinds if they are missing
            first: tuple[list[float], list[float]] = ([], [])
            times["tap first"] = first
            async with start_uvm(netns=f"/run/netns/{c}"):
                pass
            async with start_uvm():
                pass
        for _ in range(fresh):
            t = time.perf_counter()
            async with start_uvm(netns=f"/run/netns/{c}") as uvm:
                t0 = time.perf_counter()
                ns = await connect_network(uvm.vm.network, kinds["tap"][0], {})
                t1 = time.perf_counter()
                assert ns is not None
                await ns.release()
                first[0].append(t1 - t0)
                first[1].append(time.perf_counter() - t1)
                together.append(t1 - t)
            t = time.perf_counter()
            async with start_uvm():
                alone.append(time.perf_counter() - t)
        async with start_uvm() as uvm:
            for _ in range(n):
                for kind, (linux, annotations) in kinds.items():
                    t0 = time.perf_counter()
                    ns = await connect_network(uvm.vm.network, linux, annotations)
                    t1 = time.perf_counter()
                    assert ns is not None
                    await ns.release()
                    t2 = time.perf_counter()
                    times[kind][0].append(t1 - t0)
                    times[kind][1].append(t2 - t1)
        return times, starts


# Section: podman


def podman(env: dict[str, str], *argv: str) -> str:
    res = subprocess.run(["podman", *argv], env=env, capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"podman {' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get(port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def get(port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as k:
        k.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := k.recv(65536):
            data += chunk
    if b"200 OK" not in data:
        raise OSError("bad answer")
    return time.perf_counter() - t0


def send(port: int, total: int) -> float:
    block = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as k:
        sent = 0
        while sent < total:
            k.sendall(block)
            sent += len(block)
        k.shutdown(socket.SHUT_WR)
        while k.recv(65536):  # until the container's nc closed: it read everything
            pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--gets", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--setups", type=int, default=10)
    ap.add_argument("--fresh", type=int, default=3,
                    help="new UVMs to time the first connection on")
    ap.add_argument("--setup-only", action="store_true", help="only the set-up times")
    args = ap.parse_args()
    print("network set-up of one interface on a running UVM")
    times, starts = asyncio.run(setup_times(args.setups, args.fresh))
    for kind, (add, remove) in times.items():
        print(f"  {kind:9s} connect  {med(add)}")
        print(f"  {kind:9s} release  {med(remove)}")
    for kind, took in starts.items():
        print(f"  {kind:13s}  {med(took)}")
    if starts:
        added = (statistics.median(starts["start+connect"])
                 - statistics.median(starts["start alone"]))
        print(f"  a network adds to a new UVM's start: {added * 1000:.1f} ms "
              "(difference of the medians)")
    if args.setup_only:
        return
    if shutil.which("podman") is None:
        print("podman is not installed: no throughput/RTT comparison")
        return
    tmp = Path(tempfile.mkdtemp(prefix="uvmshim-bench-net-"))
    rootfs = make_rootfs(tmp / "rootfs")
    net = f"uvmshim-bench-{os.getpid()}"
    runtimes = {"crun": "crun", "uvmshim": uvmshim_binary()}
    ports = {"crun": (18181, 18182), "uvmshim": (18281, 18282)}
    script = ("httpd -p 8080 -h /www; trap 'exit 0' TERM; "
              "while :; do nc -l -p 9000 > /dev/null; done")
    tput: dict[str, list[float]] = {k: [] for k in runtimes}
    rtt: dict[str, list[float]] = {k: [] for k in runtimes}
    with podman_host_fixes(tmp) as env:
        podman(env, "network", "create", "--subnet", SUBNET, net)
        names = {k: f"uvmshim-bench-{k}-{os.getpid()}" for k in runtimes}
        try:
            for k, rt in runtimes.items():
                http, sink = ports[k]
                podman(env, "--runtime", rt, "run", "-d", "--name", names[k], "--network", net,
                       "-p", f"127.0.0.1:{http}:8080", "-p", f"127.0.0.1:{sink}:9000",
                       "--rootfs", str(rootfs), "sh", "-c", script)
                wait_port(http)
            total = args.mb << 20
            for _ in range(args.repeat):
                for k in runtimes:
                    tput[k].append(total / send(ports[k][1], total))
                    time.sleep(0.5)  # nc restarts
                    rtt[k] += [get(ports[k][0]) for _ in range(args.gets)]
        finally:
            for k, rt in runtimes.items():
                subprocess.run(["podman", "--runtime", rt, "rm", "-f", "-t", "1", names[k]],
                               env=env, capture_output=True, check=False)
            subprocess.run(["podman", "network", "rm", "-f", net], env=env,
                           capture_output=True, check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"host -> container through a published port, {args.mb} MB x {args.repeat}; "
          f"HTTP GET x {args.gets * args.repeat} (same podman network, same run)")
    for k in runtimes:
        print(f"  {k:8s} TCP {statistics.median(tput[k]) / 1e6:8.1f} MB/s   "
              f"GET median {statistics.median(rtt[k]) * 1000:6.2f} ms")
    print(f"  ratio uvmshim/crun: throughput "
          f"{statistics.median(tput['uvmshim']) / statistics.median(tput['crun']):.3f}, "
          f"GET time {statistics.median(rtt['uvmshim']) / statistics.median(rtt['crun']):.2f}")


if __name__ == "__main__":
    main()
