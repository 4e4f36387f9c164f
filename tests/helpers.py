"""Shared test helpers: build host files for specs and run coroutines."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Coroutine
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
