"""A typed view of an OCI runtime spec (``config.json``) that round-trips what it doesn't know.

Only the fields the allocator reads or writes are modelled: ``root``, ``mounts``, ``annotations``,
``windows`` (``layerFolders``, ``devices``, ``network``), ``linux`` and ``hooks``. Every object
keeps the JSON it was loaded from (``raw``), and :meth:`Spec.to_json` writes the modelled fields
back into a copy of it, so unknown fields, and the order of keys, survive untouched.

All objects are frozen: the allocator builds a new spec with :func:`dataclasses.replace`
and never changes the caller's.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

from uvmshim.errors import SpecError

JSON: TypeAlias = Any  # a value decoded by the json module
JSONObject: TypeAlias = dict[str, Any]

#: The largest ``config.json`` accepted (a spec with 10,000 bind mounts is about 2 MiB).
MAX_SPEC_BYTES = 64 << 20
#: How deeply objects and arrays may nest (a real spec nests 7 levels at most, in seccomp).
MAX_JSON_DEPTH = 64
#: The largest uid/gid (an unsigned 32-bit number, as the kernel takes it).
MAX_ID = (1 << 32) - 1


def json_copy(value: JSON) -> JSON:
    """A deep copy of decoded JSON (dicts, lists and scalars only); much faster than deepcopy."""
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def _copy_object(obj: JSONObject) -> JSONObject:
    return {k: json_copy(v) for k, v in obj.items()}


def _type_name(value: JSON) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _sub(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _expect(value: JSON, kind: type, what: str, where: str) -> None:
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise SpecError(
            f"expected {what}, got {_type_name(value)}",
            where=where,
            hint="fix this field of config.json (see the OCI runtime spec)",
        )


def _str(obj: JSONObject, key: str, where: str, default: str = "") -> str:
    if key not in obj or obj[key] is None:
        return default
    _expect(obj[key], str, "a string", _sub(where, key))
    value: str = obj[key]
    return value


def _bool(obj: JSONObject, key: str, where: str) -> bool:
    if key not in obj or obj[key] is None:
        return False
    _expect(obj[key], bool, "a boolean", _sub(where, key))
    value: bool = obj[key]
    return value


def _str_list(obj: JSONObject, key: str, where: str) -> tuple[str, ...] | None:
    if key not in obj or obj[key] is None:
        return None
    items = obj[key]
    _expect(items, list, "an array of strings", _sub(where, key))
    for i, item in enumerate(items):
        _expect(item, str, "a string", f"{_sub(where, key)}[{i}]")
    return tuple(items)


def _object(obj: JSONObject, key: str, where: str) -> JSONObject | None:
    if key not in obj or obj[key] is None:
        return None
    _expect(obj[key], dict, "an object", _sub(where, key))
    value: JSONObject = obj[key]
    return value


@dataclass(frozen=True)
class Root:
    """``root``: the container's root filesystem."""

    path: str = ""
    readonly: bool = False
    raw: JSONObject = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: JSONObject, where: str = "root") -> Root:
        return cls(path=_str(obj, "path", where), readonly=_bool(obj, "readonly", where), raw=obj)

    def to_json(self) -> JSONObject:
        out = _copy_object(self.raw)
        out["path"] = self.path
        if self.readonly or "readonly" in out:
            out["readonly"] = self.readonly
        return out


@dataclass(frozen=True)
class Mount:
    """One entry of ``mounts``."""

    destination: str = ""
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()
    raw: JSONObject = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: JSONObject, where: str) -> Mount:
        return cls(
            destination=_str(obj, "destination", where),
            type=_str(obj, "type", where),
            source=_str(obj, "source", where),
            options=_str_list(obj, "options", where) or (),
            raw=obj,
        )

    def to_json(self) -> JSONObject:
        out = _copy_object(self.raw)
        out["destination"] = self.destination
        for key, value in (("type", self.type), ("source", self.source)):
            if value or key in out:
                out[key] = value
        if self.options or "options" in out:
            out["options"] = list(self.options)
        return out

    def go_repr(self) -> str:
        """The mount as Go's ``%+v`` prints an OCI ``specs.Mount`` (hcsshim's error texts)."""
        return (
            f"{{Destination:{self.destination} Type:{self.type} Source:{self.source} "
            f"Options:[{' '.join(self.options)}]}}"
        )

    @property
    def read_only(self) -> bool:
        """hcsshim's rule: an option that, lowercased, is exactly ``ro``."""
        return any(o.lower() == "ro" for o in self.options)


@dataclass(frozen=True)
class WindowsDevice:
    """One entry of ``windows.devices``: an assigned device (``idType`` + ``id``)."""

    id: str = ""
    id_type: str = ""
    raw: JSONObject = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: JSONObject, where: str) -> WindowsDevice:
        return cls(id=_str(obj, "id", where), id_type=_str(obj, "idType", where), raw=obj)

    def to_json(self) -> JSONObject:
        out = _copy_object(self.raw)
        out["id"] = self.id
        out["idType"] = self.id_type
        return out


@dataclass(frozen=True)
class Windows:
    """``windows``: for LCOW, the layer folders, assigned devices and network namespace."""

    layer_folders: tuple[str, ...] | None = None
    devices: tuple[WindowsDevice, ...] | None = None
    network_namespace: str = ""
    raw: JSONObject = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: JSONObject, where: str = "windows") -> Windows:
        devices = None
        if obj.get("devices") is not None:
            _expect(obj["devices"], list, "an array of devices", f"{where}.devices")
            devices = tuple(
                WindowsDevice.from_json(_as_object(d, f"{where}.devices[{i}]"),
                                        f"{where}.devices[{i}]")
                for i, d in enumerate(obj["devices"])
            )
        network = _object(obj, "network", where)
        namespace = _str(network, "networkNamespace", f"{where}.network") if network else ""
        return cls(
            layer_folders=_str_list(obj, "layerFolders", where),
            devices=devices,
            network_namespace=namespace,
            raw=obj,
        )

    @property
    def has_network(self) -> bool:
        return self.raw.get("network") is not None

    def to_json(self) -> JSONObject:
        out = _copy_object(self.raw)
        if self.layer_folders is not None:
            out["layerFolders"] = list(self.layer_folders)
        if self.devices is not None:
            out["devices"] = [d.to_json() for d in self.devices]
        elif "devices" in out:
            out["devices"] = None
        return out


def _as_object(value: JSON, where: str) -> JSONObject:
    _expect(value, dict, "an object", where)
    obj: JSONObject = value
    return obj


def _path_of(parts: tuple[str | int, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "(top level)"


def check_json_value(obj: JSON, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what JSON decoders accept but no spec may hold: nesting deeper than
    ``max_depth``, a NUL character in any string (or key), and NaN or infinite numbers.

    Iterative (a deep document must not exhaust the interpreter's stack).

    :raises SpecError: naming the first offending place.
    """
    stack: list[tuple[JSON, tuple[str | int, ...]]] = [(obj, ())]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, str):
            if "\0" in value:
                raise SpecError("a string must not contain a NUL character",
                                where=_path_of(parts))
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise SpecError("NaN and infinite numbers are not valid JSON",
                                where=_path_of(parts))
        elif isinstance(value, dict | list):
            if len(parts) >= max_depth:
                raise SpecError(f"objects and arrays nest deeper than {max_depth} levels",
                                where=_path_of(parts[:8]) + " ...",
                                hint="config.json is not a plausible OCI spec")
            if isinstance(value, dict):
                for k, v in value.items():
                    if "\0" in k:
                        raise SpecError("a key must not contain a NUL character",
                                        where=_path_of(parts))
                    stack.append((v, (*parts, k)))
            else:
                stack.extend((v, (*parts, i)) for i, v in enumerate(value))


def _check_process(process: JSONObject) -> None:
    """The fields of ``process`` that reach the guest's crun: typed as the OCI spec says."""
    _str_list(process, "args", "process")
    _str_list(process, "env", "process")
    _str(process, "cwd", "process")
    _bool(process, "terminal", "process")
    user = _object(process, "user", "process")
    if user is not None:
        for key in ("uid", "gid"):
            if key in user:
                _id(user[key], f"process.user.{key}")
        gids = user.get("additionalGids")
        if gids is not None:
            _expect(gids, list, "an array of numbers", "process.user.additionalGids")
            for i, g in enumerate(gids):
                _id(g, f"process.user.additionalGids[{i}]")


def _id(value: JSON, where: str) -> None:
    _expect(value, int, "an integer", where)
    if not 0 <= value <= MAX_ID:
        raise SpecError(f"{value} is out of range 0..{MAX_ID}", where=where,
                        hint="uids and gids are unsigned 32-bit numbers")


@dataclass(frozen=True)
class Spec:
    """An OCI runtime spec. Modelled fields are typed; everything else lives in ``raw``."""

    root: Root | None = None
    mounts: tuple[Mount, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    windows: Windows | None = None
    linux: JSONObject | None = None
    hooks: JSONObject | None = None
    raw: JSONObject = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: JSON) -> Spec:
        """Validate and wrap a decoded ``config.json``; :class:`SpecError` names the bad path."""
        spec = _as_object(obj, "(top level)")
        check_json_value(spec)
        process = _object(spec, "process", "")
        if process is not None:
            _check_process(process)
        root = _object(spec, "root", "")
        mounts: list[Mount] = []
        if spec.get("mounts") is not None:
            _expect(spec["mounts"], list, "an array of mounts", "mounts")
            for i, m in enumerate(spec["mounts"]):
                mounts.append(Mount.from_json(_as_object(m, f"mounts[{i}]"), f"mounts[{i}]"))
        annotations = _object(spec, "annotations", "") or {}
        for key, value in annotations.items():
            _expect(value, str, "a string", f"annotations[{key!r}]")
        windows = _object(spec, "windows", "")
        return cls(
            root=Root.from_json(root) if root is not None else None,
            mounts=tuple(mounts),
            annotations=dict(annotations),
            windows=Windows.from_json(windows) if windows is not None else None,
            linux=_object(spec, "linux", ""),
            hooks=_object(spec, "hooks", ""),
            raw=spec,
        )

    def to_json(self) -> JSONObject:
        """The spec as JSON: ``raw`` with the modelled fields written back (key order kept)."""
        out = _copy_object(self.raw)
        if self.root is not None:
            out["root"] = self.root.to_json()
        if self.mounts or "mounts" in out:
            out["mounts"] = [m.to_json() for m in self.mounts]
        if self.annotations or "annotations" in out:
            out["annotations"] = dict(self.annotations)
        for key, value in (("windows", self.windows), ("linux", self.linux),
                           ("hooks", self.hooks)):
            if value is None:
                if key in out:
                    del out[key]
            elif isinstance(value, Windows):
                out[key] = value.to_json()
            else:
                out[key] = json_copy(value)
        return out

    @property
    def has_assigned_devices(self) -> bool:
        return self.windows is not None and bool(self.windows.devices)


def config_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else ``path/config.json`` (an OCI bundle)."""
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, *, where: str = "JSON") -> JSON:
    """Decode JSON strictly: no ``NaN``/``Infinity``, nesting at most :data:`MAX_JSON_DEPTH`
    deep, no NUL in strings.

    :raises SpecError: with ``where`` (and the line and column, for a syntax error).
    """
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise SpecError(
            f"invalid JSON: {err.msg}", where=f"{where}:{err.lineno}:{err.colno}",
            hint="config.json must be a single JSON object",
        ) from None
    except ValueError as err:  # a NaN/Infinity constant, or undecodable bytes
        raise SpecError(f"invalid JSON: {err}", where=where) from None
    except RecursionError:
        raise SpecError(f"invalid JSON: objects and arrays nest deeper than "
                        f"{MAX_JSON_DEPTH} levels", where=where) from None
    try:
        check_json_value(obj)
    except SpecError as err:
        err.where = f"{where}: {err.where}" if err.where else where
        err.args = (str(err),)
        raise
    return obj


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Load ``config.json``, or the ``config.json`` of a bundle directory.

    :raises SpecError: the file is missing, not a regular file, larger than
        :data:`MAX_SPEC_BYTES`, is not JSON, or has a field of the wrong type.
    """
    file = config_path(path)
    try:
        # O_NONBLOCK: opening a FIFO put there must not hang; the type is checked first.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SpecError("not a regular file", where=str(file),
                                hint="pass a config.json or an OCI bundle directory")
            data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(
            "no such file", where=str(file),
            hint="pass a config.json or an OCI bundle directory that holds one",
        ) from None
    except OSError as err:
        raise SpecError(f"cannot read the spec: {err.strerror or err}",
                        where=str(file)) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"larger than {MAX_SPEC_BYTES >> 20} MiB", where=str(file),
                        hint="config.json is not a plausible OCI spec")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"cannot read the spec: not UTF-8 ({err.reason} at byte "
                        f"{err.start})", where=str(file)) from None
    obj = parse_json(text, where=str(file))
    try:
        return Spec.from_json(obj)
    except SpecError as err:
        err.where = f"{file}: {err.where}" if err.where else str(file)
        err.args = (str(err),)
        raise


#: Mount types whose ``source`` is a host path (a relative one is relative to the bundle).
HOST_PATH_MOUNT_TYPES = ("bind", "virtual-disk", "physical-disk")


def resolve_bundle_paths(spec: Spec, bundle: str | os.PathLike[str]) -> Spec:
    """``spec`` with a relative ``root.path`` and relative host-path mount sources (``bind``,
    ``virtual-disk``, ``physical-disk``) made absolute against the bundle directory, as runc
    resolves them (it runs in the bundle). ``sandbox://`` and ``hugepages://`` stay as they are.
    """
    base = os.path.abspath(bundle)
    root = spec.root
    if root is not None and root.path and not os.path.isabs(root.path):
        root = replace(root, path=os.path.normpath(os.path.join(base, root.path)))
    mounts = tuple(
        replace(m, source=os.path.normpath(os.path.join(base, m.source)))
        if m.type in HOST_PATH_MOUNT_TYPES and m.source and "://" not in m.source
        and not os.path.isabs(m.source) else m
        for m in spec.mounts
    )
    if root is spec.root and all(a is b for a, b in zip(mounts, spec.mounts, strict=True)):
        return spec
    return replace(spec, root=root, mounts=mounts)


def load_bundle(path: str | os.PathLike[str]) -> Spec:
    """:func:`load_spec`, then relative paths resolved against the bundle (the directory
    holding ``config.json``): :func:`resolve_bundle_paths`."""
    return resolve_bundle_paths(load_spec(path), config_path(path).parent)
