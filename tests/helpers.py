"""Shared test helpers: build host files for specs and run coroutines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from uvmshim.spec import Spec

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class HostFiles:
    """Makes layer folders, scratch folders, disks, directories and files under a root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def layer(self, name: str) -> str:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "layer.vhd").write_bytes(b"\0" * 512)
        return str(d)

    def scratch(self, name: str = "scratch") -> str:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "sandbox.vhdx").write_bytes(b"\0" * 512)
        return str(d)

    def disk(self, name: str, size: int = 512) -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * size)
        return str(p)

    def dir(self, name: str) -> str:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return str(p)

    def file(self, name: str, text: str = "x") -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return str(p)


def spec_json(
    *,
    layers: list[str] | None = None,
    root_path: str | None = None,
    mounts: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    devices: list[dict[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {"ociVersion": "1.0.2", "process": {"args": ["/bin/true"]}}
    if root_path is not None:
        obj["root"] = {"path": root_path}
    obj["mounts"] = mounts or []
    if annotations:
        obj["annotations"] = annotations
    windows: dict[str, Any] = {}
    if layers is not None:
        windows["layerFolders"] = layers
    if devices is not None:
        windows["devices"] = devices
    if windows:
        obj["windows"] = windows
    obj["linux"] = {"namespaces": [{"type": "mount"}]}
    obj.update(extra or {})
    return obj


def make_spec(**kw: Any) -> Spec:
    return Spec.from_json(spec_json(**kw))


def write_bundle(path: Path, obj: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(obj))
    return path


def ext4(tmp: Path, name: str, files: dict[str, str]) -> str:
    """A 16 MiB ext4 image ``<tmp>/<name>.img`` holding ``files`` (name -> text)."""
    src = tmp / f"{name}-src"
    src.mkdir()
    for rel, text in files.items():
        (src / rel).write_text(text)
    img = tmp / f"{name}.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img), "16M"], check=True,
                   stdout=subprocess.DEVNULL)
    return str(img)


def uvmshim_binary() -> str:
    """The console script next to this interpreter (not a pyenv shim: start-up time)."""
    here = Path(sys.executable).parent / "uvmshim"
    return str(here) if here.exists() else shutil.which("uvmshim") or "uvmshim"


def busybox_rootfs(path: Path, *, dirs: Iterable[str], applets: Iterable[str],
                   files: dict[str, str]) -> Path:
    """A root filesystem at ``path``: the directories ``dirs``, the host's busybox as
    ``/bin/busybox`` with a symlink per applet, and ``files`` (relative path: text)."""
    for d in dirs:
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", path / "bin" / "busybox")
    for applet in applets:
        os.symlink("busybox", path / "bin" / applet)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@contextlib.contextmanager
def podman_host_fixes(conf_dir: Path) -> Iterator[dict[str, str]]:
    """The host fixes of docs/oci-runtime.md for podman (crun needs the hugetlb mount), undone
    afterwards where we made them; yields the environment to run podman in (its
    ``containers.conf`` written in ``conf_dir``)."""
    mounted = False
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    hugetlb = Path("/sys/fs/cgroup/hugetlb")
    if unified.exists() and "hugetlb" in unified.read_text().split():
        hugetlb.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(hugetlb)],
                       check=True)
        mounted = True
    conf = conf_dir / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", '
                    '"nproc=32768:32768"]\n')
    try:
        yield {**os.environ, "CONTAINERS_CONF": str(conf)}
    finally:
        if mounted:
            subprocess.run(["umount", str(hugetlb)], check=False)


def http_get(url: str, proc: subprocess.Popen[str] | None = None, *, timeout: float = 60,
             interval: float = 0.5) -> str:
    """GET ``url`` (a loopback address), retrying every ``interval`` seconds while the server
    comes up (until ``timeout``, or until ``proc``, if given, has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            time.sleep(interval)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def veth_namespaces(tag: str, net4: str = "10.99.0", net6: str = "fd99"
                    ) -> Iterator[tuple[str, str]]:
    """Two network namespaces of our own joined by a veth, removed afterwards: ``uvmc<tag>``
    (a container's: c0, ``<net4>.2/24`` and ``<net6>::2/64``, default route via the other)
    and ``uvms<tag>`` (a server's: s0, ``.1`` and ``::1``)."""
    c, s = f"uvmc{tag}", f"uvms{tag}"
    _ip("netns", "add", c)
    try:
        _ip("netns", "add", s)
        _ip("link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "s0", "netns", s)
        for ns, dev, host in ((c, "c0", 2), (s, "s0", 1)):
            _ip("-n", ns, "addr", "add", f"{net4}.{host}/24", "dev", dev)
            _ip("-n", ns, "-6", "addr", "add", f"{net6}::{host}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", c, "route", "add", "default", "via", f"{net4}.1")
        yield c, s
    finally:
        subprocess.run(["ip", "netns", "del", c], check=False)
        subprocess.run(["ip", "netns", "del", s], check=False, capture_output=True)
