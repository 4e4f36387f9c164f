"""uvmshim's own network (``--network=nat``, QEMU user-mode networking) on real UVMs: a
published port answers on the host's loopback (and only there), the container reaches a
server on the host's loopback through the gateway 10.0.2.2, a pod's containers share one
network, and nothing is left behind.

Only loopback is ever contacted (the guest's 10.0.2.2 is the host's 127.0.0.1).
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmshim.runtime.leaks import find_holdings
from uvmshim.uvm import hostnet

import helpers

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parent.parent


def uvmshim_binary() -> str:
    here = Path(sys.executable).parent / "uvmshim"
    return str(here) if here.exists() else "uvmshim"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nat") / "rootfs"
    subprocess.run(["sh", str(ROOT / "examples" / "make-rootfs.sh"), str(path)], check=True,
                   capture_output=True)
    (path / "www").mkdir()
    (path / "www" / "index.html").write_text("hello through slirp\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback (only) answering ``from the host``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def http_get(url: str, proc: subprocess.Popen[str] | None = None) -> str:
    """GET ``url`` (loopback), retrying while the container comes up."""
    return helpers.http_get(url, proc, timeout=180, interval=0.3)


def listeners(port: int) -> list[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], check=True, capture_output=True,
                         text=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def taps() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if hostnet.TAP_PREFIX in line]


def test_run_nat_publish_and_reach_the_host(rootfs: Path, host_server: int,
                                            tmp_path: Path) -> None:
    port = free_port()
    base = tmp_path / "vms"
    env = {**os.environ, "UVMSHIM_VM_DIR": str(base)}
    taps_before = taps()
    script = (f"trap 'exit 0' TERM; wget -q -O /www/host.txt http://10.0.2.2:{host_server}/; "
              "ip -o -4 addr show eth0 > /www/addr.txt; ip route > /www/route.txt; "
              "httpd -f -p 8080 -h /www & wait")
    proc = subprocess.Popen(
        [uvmshim_binary(), "run", "--network=nat", "-p", f"127.0.0.1:{port}:8080",
         "--rootfs", str(rootfs), "--", "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert http_get(f"http://127.0.0.1:{port}/index.html", proc) == "hello through slirp\n"
        # The container reached the host's loopback server through the gateway.
        assert http_get(f"http://127.0.0.1:{port}/host.txt", proc) == "from the host\n"
        assert "inet 10.0.2.15/24" in http_get(f"http://127.0.0.1:{port}/addr.txt", proc)
        assert "default via 10.0.2.2 dev eth0" in \
            http_get(f"http://127.0.0.1:{port}/route.txt", proc)
        # Published on the address asked for, and only there.
        assert listeners(port) == [f"127.0.0.1:{port}"]
        assert taps() == taps_before  # user-mode networking needs no tap
    finally:
        proc.send_signal(signal.SIGTERM)  # the container's shell exits 0 on it
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert listeners(port) == []
    held = find_holdings(base)
    assert held.vms == [] and held.qemu_pids == []


def test_bad_network_arguments_are_clear_errors(rootfs: Path) -> None:
    for args, text in (
        (["-p", "8080:80"], "-p: publishing a port needs a network"),
        (["--network=nat", "-p", "::1:8080:80"], "expected [IP:]HOST_PORT:CONTAINER_PORT"),
        (["--network=nat", "-p", "8080:0"], "the container port must be a number"),
        (["--network=nat", "-p", "localhost:8080:80"], "is not an IPv4 address"),
        (["--network=nat", "-p", "1.2.3.4:80:80/sctp"], "unknown protocol 'sctp'"),
        (["--network=nat", "-p", "8080:80", "-p", "127.0.0.1:8080:81"],
         "host port tcp:8080 is published twice"),
    ):
        res = subprocess.run([uvmshim_binary(), "run", *args, "--rootfs", str(rootfs), "--",
                              "true"], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and text in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


def test_pod_nat_network_is_shared(rootfs: Path, tmp_path: Path) -> None:
    """A pod's published port reaches a workload's server; another workload reaches it on
    localhost (one network namespace per pod)."""
    port = free_port()
    env = {**os.environ, "UVMSHIM_VM_DIR": str(tmp_path / "vms"),
           "UVMSHIM_POD_DIR": str(tmp_path / "pods")}

    def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([uvmshim_binary(), *args], capture_output=True, text=True,
                              env=env, timeout=300)

    created = uvmshim("pod", "create", "n1", "--rootfs", str(rootfs), "--network=nat",
                      "-p", f"127.0.0.1:{port}:8080")
    server: subprocess.Popen[str] | None = None
    try:
        assert created.returncode == 0, created.stderr
        server = subprocess.Popen([uvmshim_binary(), "pod", "run", "n1", "--", "httpd", "-f",
                                   "-p", "8080", "-h", "/www"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert http_get(f"http://127.0.0.1:{port}/index.html", server) == \
            "hello through slirp\n"
        client = uvmshim("pod", "run", "n1", "--", "wget", "-q", "-O", "-",
                         "http://127.0.0.1:8080/index.html")
        assert (client.returncode, client.stdout) == (0, "hello through slirp\n"), \
            client.stderr
    finally:
        if server is not None:
            server.terminate()  # the client going away removes the container
            server.communicate(timeout=120)
        stopped = uvmshim("pod", "stop", "n1")
    assert stopped.returncode == 0, stopped.stderr
    assert listeners(port) == []
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []
