"""The host ↔ guest contract: framing, messages, typed requests and events, error kinds, and the
shared constants, checked on both sides by construction."""

from __future__ import annotations

import ast
import asyncio
import importlib
import itertools
import json
import re
import shutil
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from uvmshim import guestpath
from uvmshim.agent import kmods
from uvmshim.agent import storage as storage_mod
from uvmshim.agent.__main__ import find_port
from uvmshim.agent.paths import hugepages_mount_path, sandbox_mount_path
from uvmshim.agent.runtime import Runtime
from uvmshim.agent.server import Server
from uvmshim.agent.storage import Storage, find_pmem_device, find_scsi_block_device
from uvmshim.errors import UvmError
from uvmshim.protocol import (
    EVENT_TYPES,
    MAX_FRAME_SIZE,
    MAX_ROOT_PORTS,
    MAX_SCSI_CONTROLLERS,
    PLAN9_GUEST_ROOT,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    SCSI_CONTROLLER_PCI_SLOTS,
    SCSI_TARGET,
    ContainerCreate,
    ErrorKind,
    Event,
    EventBody,
    EventKind,
    Exec,
    ExecStatus,
    ExitEvent,
    FrameDecoder,
    MountScsi,
    Op,
    OutputEvent,
    ProtocolError,
    Request,
    RequestBody,
    Response,
    Struct,
    check_share_name,
    constants,
    decode_event,
    decode_payload,
    decode_request,
    encode_frame,
    parse_message,
    plan9_share_guest_path,
    plan9_share_host_path,
    process_key,
    read_frame,
    scsi_controller_pci_address,
    scsi_linux_lun,
    vpmem_root_port_pci_address,
    write_frame,
)
from uvmshim.runc.hosted import GUEST_CRUN
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.qemu.cmdline import build_argv
from uvmshim.uvm.qemu.config import MachinePaths, QemuConfig

json_values = hst.recursive(
    hst.none() | hst.booleans() | hst.integers(-(2**53), 2**53) | hst.text(),
    lambda inner: hst.lists(inner, max_size=4) | hst.dictionaries(hst.text(), inner, max_size=4),
    max_leaves=12,
)


def test_frame_layout() -> None:
    frame = encode_frame({"a": 1})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert json.loads(frame[4:]) == {"a": 1}


def test_frame_is_utf8() -> None:
    frame = encode_frame({"s": "ünïcødé ✓"})
    assert decode_payload(frame[4:]) == {"s": "ünïcødé ✓"}


@given(hst.dictionaries(hst.text(), json_values, max_size=5))
def test_decoder_round_trip_any_split(obj: dict[str, object]) -> None:
    data = encode_frame(obj) * 3
    for cut in (1, 3, 4, 5, len(data) // 2):
        dec = FrameDecoder()
        out = []
        for i in range(0, len(data), cut):
            out += dec.feed(data[i : i + cut])
        assert out == [obj, obj, obj]
        assert dec.pending == 0


def test_decoder_partial_then_reset() -> None:
    dec = FrameDecoder()
    frame = encode_frame({"x": 1})
    assert dec.feed(frame[:6]) == []
    assert dec.pending == 6
    dec.reset()
    assert dec.feed(frame) == [{"x": 1}]


def test_oversize_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"data": "x" * 100}, max_size=50)
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder(max_size=10).feed(struct.pack(">I", 11) + b"{}")
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_SIZE + 1))


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"not json", b"[1,2]", b'"str"'])
def test_bad_payloads(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def test_encode_rejects_non_objects() -> None:
    with pytest.raises(ProtocolError):
        encode_frame([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="serialisable"):
        encode_frame({"x": object()})


def test_message_round_trips() -> None:
    req = Request(7, "mount_scsi", {"controller": 0, "lun": 3})
    assert req.to_json()["v"] == PROTOCOL_VERSION
    assert parse_message(req.to_json()) == req
    ok = Response(7, True, {"device": "/dev/sdb"})
    assert parse_message(ok.to_json()) == ok
    bad = Response.failure(8, ErrorKind.FAILED, "mount /dev/sdb on /m: Invalid argument")
    assert bad.to_json()["error"] == {"kind": "failed",
                                      "message": "mount /dev/sdb on /m: Invalid argument"}
    assert parse_message(bad.to_json()) == bad
    ev = Event("output", {"id": 7, "stream": "stdout", "data": "aGk="})
    assert parse_message(ev.to_json()) == ev


def test_version_is_carried() -> None:
    req = parse_message({"v": 99, "id": 1, "op": "ping", "args": {}})
    assert isinstance(req, Request) and req.version == 99


@pytest.mark.parametrize("obj", [
    [], {"id": 1}, {"op": "ping", "id": "1", "v": 1}, {"op": "ping", "id": 1},
    {"op": "ping", "id": True, "v": 1}, {"op": 3, "id": 1, "v": 1},
    {"op": "x", "id": 1, "v": 1, "args": []}, {"id": 1, "ok": "yes"}, {"id": 1, "ok": False},
    {"event": 5},
])
def test_malformed_messages(obj: object) -> None:
    with pytest.raises(ProtocolError):
        parse_message(obj)


def test_layout_conventions() -> None:
    assert SCSI_CONTROLLER_PCI_SLOTS == (5, 6, 7, 8)
    assert scsi_controller_pci_address(0) == "0000:00:05.0"
    assert scsi_controller_pci_address(3) == "0000:00:08.0"
    with pytest.raises(ValueError):
        scsi_controller_pci_address(4)
    assert [scsi_linux_lun(n) for n in (0, 63, 255, 256, 16383)] == [0, 63, 255, 16640, 32767]
    assert vpmem_root_port_pci_address(0) == "0000:00:10.0"
    assert vpmem_root_port_pci_address(3) == "0000:00:13.0"
    assert plan9_share_host_path("/run/u/export", "3") == "/run/u/export/3"
    assert plan9_share_guest_path("3") == "/run/uvmshim/share0/3"
    for bad in ("", ".", "..", "a/b", "x\0"):
        with pytest.raises(ValueError):
            check_share_name(bad)


def test_sync_socketpair_round_trip() -> None:
    """The guest's style: blocking fd reads fed to a FrameDecoder, byte by byte."""
    a, b = socket.socketpair()
    frames = [encode_frame({"n": i, "pad": "x" * i * 1000}) for i in range(5)]

    def writer() -> None:
        for f in frames:
            for i in range(0, len(f), 7):
                a.sendall(f[i : i + 7])
        a.close()

    t = threading.Thread(target=writer)
    t.start()
    dec, got = FrameDecoder(), []
    while chunk := b.recv(100):
        got += dec.feed(chunk)
    t.join()
    b.close()
    assert [g["n"] for g in got] == [0, 1, 2, 3, 4]


def test_async_read_write_frames() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        _ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        await write_frame(wa, {"hello": 1})
        await write_frame(wa, {"big": "y" * 200_000})
        assert await read_frame(rb) == {"hello": 1}
        assert (await read_frame(rb) or {})["big"] == "y" * 200_000
        # A partial frame followed by EOF is an error; EOF between frames is a clean end.
        wa.write(encode_frame({"x": 1})[:5])
        await wa.drain()
        wa.close()
        with pytest.raises(ProtocolError, match="inside a frame"):
            await read_frame(rb)
        wb.close()

        c, d = socket.socketpair()
        _rc, wc = await asyncio.open_connection(sock=c)
        rd, wd = await asyncio.open_connection(sock=d)
        wc.close()
        assert await read_frame(rd) is None
        wd.close()

        e, f = socket.socketpair()
        _re, we = await asyncio.open_connection(sock=e)
        rf, wf = await asyncio.open_connection(sock=f)
        we.write(struct.pack(">I", 100))
        await we.drain()
        with pytest.raises(ProtocolError, match="exceeds"):
            await read_frame(rf, max_size=10)
        we.close()
        wf.close()

    asyncio.run(main())


# Section: typed requests and events -------------------------------------------------------------

#: A strategy for each wire field annotation (the closed set of uvmshim.protocol.schema).
_FIELD_VALUES: dict[str, hst.SearchStrategy[Any]] = {
    "int": hst.integers(-(2**53), 2**53),
    "Index": hst.integers(0, 2**53),
    "str": hst.text(),
    "bool": hst.booleans(),
    "float": hst.floats(allow_nan=False, allow_infinity=False),
    "bytes": hst.binary(),
    "StrList": hst.lists(hst.text(), max_size=4).map(tuple),
    "StrMap": hst.dictionaries(hst.text(), hst.text(), max_size=4),
    "JSONObject": hst.dictionaries(hst.text(), json_values, max_size=4),
}


def _field_strategy(annotation: str) -> hst.SearchStrategy[Any]:
    base, none, _ = annotation.partition(" | None")
    values = _FIELD_VALUES[base]
    return hst.none() | values if none else values


def _instances(cls: type[Struct]) -> hst.SearchStrategy[Struct]:
    return hst.builds(cls, **{f.name: _field_strategy(f.annotation) for f in cls.FIELDS})


WIRE_TYPES: list[type[Struct]] = [*REQUEST_TYPES.values(), *EVENT_TYPES.values(), ExecStatus]


def test_every_operation_has_one_request_type() -> None:
    assert set(REQUEST_TYPES) == set(Op)
    assert all(op == cls.OP for op, cls in REQUEST_TYPES.items())
    assert set(EVENT_TYPES) == set(EventKind)


@pytest.mark.parametrize("cls", WIRE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None)
@given(data=hst.data())
def test_every_message_type_round_trips(cls: type[Struct], data: hst.DataObject) -> None:
    msg = data.draw(_instances(cls))
    # Through the real wire: JSON in a frame, decoded and checked field by field.
    (wire,) = FrameDecoder().feed(encode_frame(msg.to_json()))
    back = cls.from_json(wire)
    assert back == msg
    if not any(isinstance(getattr(msg, f.name), dict) for f in cls.FIELDS):
        assert hash(back) == hash(msg)  # like a frozen dataclass: hashable unless it holds a dict
    if isinstance(msg, RequestBody):
        req = parse_message(Request(7, msg.OP, msg.to_json()).to_json())
        assert isinstance(req, Request) and req.version == PROTOCOL_VERSION
        assert decode_request(req.op, req.args) == msg
    if isinstance(msg, EventBody):
        ev = parse_message(msg.to_event().to_json())
        assert isinstance(ev, Event) and decode_event(ev) == msg


def test_defaults_and_immutability() -> None:
    m = MountScsi.from_json({"controller": 1, "lun": 2})
    assert m == MountScsi(controller=1, lun=2, guest_path="", read_only=False, options=())
    assert repr(m).startswith("MountScsi(controller=1, lun=2,")
    with pytest.raises(AttributeError, match="frozen"):
        m.lun = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="needs lun="):
        MountScsi(controller=1)  # type: ignore[call-arg]
    assert Exec(argv=("true",)).to_json() == {"argv": ["true"], "env": None, "cwd": "/",
                                              "stdin": "", "timeout": None}
    # Only the key that routes an output event goes on the wire.
    assert OutputEvent(stream="stdout", data=b"hi", process="c").to_event().to_json() == {
        "event": "output", "stream": "stdout", "data": "aGk=", "process": "c"}
    assert OutputEvent(stream="stdout", data=b"", id=4).route == 4
    assert ExitEvent(process="c/e1", exit_code=0).route == "c/e1"
    assert process_key("c") == "c" and process_key("c", "e1") == "c/e1"


@pytest.mark.parametrize(("cls", "args", "error"), [
    (MountScsi, {"controller": "0", "lun": 0},
     "mount_scsi: controller must be a non-negative integer, got '0'"),
    (MountScsi, {"controller": -1, "lun": 0}, "controller must be a non-negative integer"),
    (MountScsi, {"controller": True, "lun": 0}, "controller must be a non-negative integer"),
    (MountScsi, {"controller": 0}, "mount_scsi: lun is missing"),
    (MountScsi, {"controller": 0, "lun": 0, "options": "ro"}, "options must be a list of strings"),
    (MountScsi, {"controller": 0, "lun": 0, "read_only": 1}, "read_only must be a boolean"),
    (MountScsi, {"controller": 0, "lun": 0, "bogus": 1}, "mount_scsi: unknown field 'bogus'"),
    (MountScsi, [], "mount_scsi: arguments must be a JSON object"),
    (Exec, {"argv": ["x"], "stdin": "not base64!"}, "stdin must be a base64 string"),
    (Exec, {"argv": ["x"], "env": {"A": 1}}, "env must be an object of strings"),
    (Exec, {"argv": ["x"], "timeout": "1"}, "timeout must be a number"),
    (ContainerCreate, {"container_id": "c", "bundle": "/b", "spec": []}, "spec must be an object"),
    (ExitEvent, {"process": "c", "exit_code": 1.5}, "exit event: exit_code must be an integer"),
])
def test_bad_fields_are_refused_by_name(cls: type[Struct], args: object, error: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(error)):
        cls.from_json(args)


def test_unknown_operation_and_event() -> None:
    with pytest.raises(ProtocolError, match="unknown operation 'frobnicate'"):
        decode_request("frobnicate", {})
    with pytest.raises(ProtocolError, match="unknown event 'bell'"):
        decode_event(Event("bell", {}))


def test_wire_types_are_a_closed_set() -> None:
    with pytest.raises(TypeError, match="unsupported wire field type 'list\\[int\\]'"):
        class _Bad(Struct):  # pragma: no cover - the class statement itself fails
            values: list[int]


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_failures_carry_their_kind(kind: ErrorKind) -> None:
    resp = Response.failure(3, kind, "why")
    back = parse_message(resp.to_json())
    assert isinstance(back, Response) and (back.ok, back.kind, back.error) == (False, kind, "why")


def test_failure_decoding() -> None:
    # A version-1 agent answers a version-2 hello with a bare string: still a clear failure.
    old = parse_message({"id": 1, "ok": False, "error": "protocol version mismatch: host 2"})
    assert isinstance(old, Response) and old.kind is ErrorKind.PROTOCOL
    for error in ({"kind": "nope", "message": "x"}, {"kind": "busy"}, {"message": "x"}, 5):
        with pytest.raises(ProtocolError):
            parse_message({"id": 1, "ok": False, "error": error})


def test_server_handles_every_operation_with_its_type() -> None:
    server = Server(-1, Storage(kmods.ModuleLoader()))
    assert set(server._handlers) | {Op.EXEC} == set(REQUEST_TYPES)
    for op, handler in server._handlers.items():
        # Each handler takes the typed arguments of its own operation (annotations are strings).
        first = next(iter(handler.__annotations__.items()))
        assert first == ("req", REQUEST_TYPES[op].__name__), op
    assert next(iter(server._exec.__annotations__.values())) == "Exec"


# Section: the shared constants, host view against guest view ------------------------------------


def _argv(**kw: Any) -> list[str]:
    cfg = QemuConfig(kernel=Path("/k"), initrd=Path("/i"), **kw)
    return build_argv(cfg, MachinePaths(Path("/run/vm/x")), accel="tcg", qmp_fd=3, agent_fd=4)


def _devices(argv: list[str], driver: str) -> list[dict[str, str]]:
    """The ``key=value`` options of every ``-device <driver>,...`` on the command line."""
    out = []
    for flag, value in itertools.pairwise(argv):
        driver_name, _, opts = value.partition(",")
        if flag == "-device" and driver_name == driver:
            out.append(dict(o.split("=", 1) for o in opts.split(",")))
    return out


def test_scsi_controllers_are_where_the_guest_looks(tmp_path: Path) -> None:
    """The host puts controller i at the argv's addr=; the guest's lookup finds disks there."""
    controllers = _devices(_argv(scsi_controllers=MAX_SCSI_CONTROLLERS), "virtio-scsi-pci")
    assert len(controllers) == MAX_SCSI_CONTROLLERS == len(SCSI_CONTROLLER_PCI_SLOTS)
    sysfs = tmp_path / "sys"
    for i, dev in enumerate(controllers):
        slot = int(dev["addr"], 16)
        assert f"0000:00:{slot:02x}.0" == scsi_controller_pci_address(i)
        lun = scsi_linux_lun(300)
        t = SCSI_TARGET
        (sysfs / f"bus/pci/devices/0000:00:{slot:02x}.0/virtio{i}/host{i}/target{i}:0:{t}"
         f"/{i}:0:{t}:{lun}/block/sd{i}").mkdir(parents=True)
    for i in range(MAX_SCSI_CONTROLLERS):
        assert find_scsi_block_device(i, 300, sysfs=str(sysfs)) == f"sd{i}"


def test_root_ports_are_where_the_guest_looks_for_vpmem(tmp_path: Path) -> None:
    ports = _devices(_argv(hotplug_ports=MAX_ROOT_PORTS), "pcie-root-port")
    assert len(ports) == MAX_ROOT_PORTS
    sysfs = tmp_path / "sys"
    for n, dev in enumerate(ports):
        slot = int(dev["addr"], 16)
        assert f"0000:00:{slot:02x}.0" == vpmem_root_port_pci_address(n)
        (sysfs / f"bus/pci/devices/0000:00:{slot:02x}.0/0000:0{n % 10}:00.0/virtio{n}/ndbus{n}"
         f"/region{n}/namespace{n}.0/block/pmem{n}").mkdir(parents=True)
    for n in range(MAX_ROOT_PORTS):
        assert find_pmem_device(n, sysfs=str(sysfs)) == f"pmem{n}"
    with pytest.raises(ValueError, match="hotplug_ports"):
        _argv(hotplug_ports=MAX_ROOT_PORTS + 1)


def test_agent_port_is_the_one_the_guest_opens(tmp_path: Path) -> None:
    (port,) = _devices(_argv(), "virtserialport")
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    (sysfs / "class/virtio-ports/vport0p1").mkdir(parents=True)
    (sysfs / "class/virtio-ports/vport0p1/name").write_text(port["name"] + "\n")
    (dev / "vport0p1").mkdir(parents=True)
    assert find_port(sysfs=str(sysfs), dev=str(dev)) == f"{dev}/vport0p1"  # the default name


def test_9p_tag_is_the_one_the_guest_mounts(monkeypatch: pytest.MonkeyPatch) -> None:
    (p9,) = _devices(_argv(), "virtio-9p-pci")
    mounted: list[tuple[str, str, str | None]] = []
    monkeypatch.setattr(storage_mod, "is_mountpoint", lambda _path: False)
    monkeypatch.setattr(storage_mod, "makedirs", lambda _path, _mode=None: None)
    monkeypatch.setattr(storage_mod, "mount", lambda src, dst, fstype=None, options="":
                        mounted.append((src, dst, fstype)))
    storage = Storage(_NoModules())
    storage._ensure_share_root()
    assert mounted == [(p9["mount_tag"], PLAN9_GUEST_ROOT, "9p")]


def test_guest_paths_agree() -> None:
    # sandbox:// and hugepages://: what the host names and what the guest creates.
    root = guestpath.container_root("sb")
    assert sandbox_mount_path("sb", guestpath.SANDBOX_MOUNT_PREFIX + "d") == \
        guestpath.join(root, guestpath.SANDBOX_MOUNTS_DIR, "d")
    assert hugepages_mount_path("sb", guestpath.HUGEPAGES_MOUNT_PREFIX + "2M/d")[0] == \
        guestpath.join(root, guestpath.HUGEPAGES_DIR, "2M", "d")
    # crun's state root: the host runs crun in the guest exactly as the agent does.
    runtime = Runtime(Storage(_NoModules()), lambda _event: None)
    argv = runtime._crun()
    assert argv[1:3] == list(GUEST_CRUN[1:])
    # The agent runs its sealed in-memory copy of crun (agent/runtime.py: sealed_copy).
    crun = shutil.which(GUEST_CRUN[0])
    assert crun is not None
    assert Path(argv[0]).read_bytes() == Path(crun).read_bytes()
    # The host's SCSI controller limit is the guest's slot count.
    assert UvmOptions(scsi_controllers=len(SCSI_CONTROLLER_PCI_SLOTS)).scsi_controller_count == 4
    with pytest.raises(UvmError, match="can't be more than 4"):
        UvmOptions(scsi_controllers=len(SCSI_CONTROLLER_PCI_SLOTS) + 1)


#: Modules on each side of the contract, and the shared names each must import (not redefine).
CONSUMERS: dict[str, set[str]] = {
    "uvmshim.uvm.qemu.cmdline": {"AGENT_PORT_NAME", "PLAN9_MOUNT_TAG",
                                 "SCSI_CONTROLLER_PCI_SLOTS", "root_port_pci_slot"},
    "uvmshim.uvm.qemu.config": {"MAX_SCSI_CONTROLLERS", "MAX_ROOT_PORTS"},
    "uvmshim.uvm.options": {"MAX_SCSI_CONTROLLERS"},
    "uvmshim.guestpath": {"CONTAINER_ROOT_PREFIX", "SANDBOX_MOUNT_PREFIX",
                          "HUGEPAGES_MOUNT_PREFIX", "SANDBOX_MOUNTS_DIR", "HUGEPAGES_DIR"},
    "uvmshim.runc.hosted": {"CRUN_ROOT"},
    "uvmshim.agent.__main__": {"AGENT_PORT_NAME"},
    "uvmshim.agent.paths": {"CONTAINER_ROOT_PREFIX", "SANDBOX_MOUNT_PREFIX",
                            "HUGEPAGES_MOUNT_PREFIX", "SANDBOX_MOUNTS_DIR", "HUGEPAGES_DIR"},
    "uvmshim.agent.storage": {"PLAN9_GUEST_ROOT", "PLAN9_MOUNT_OPTIONS", "PLAN9_MOUNT_TAG",
                              "SCSI_TARGET", "scsi_controller_pci_address",
                              "vpmem_root_port_pci_address", "CONTAINER_ROOT_PREFIX"},
    "uvmshim.agent.runtime": {"CRUN_ROOT", "SANDBOX_MOUNT_PREFIX", "HUGEPAGES_MOUNT_PREFIX"},
}


def _shared_strings() -> dict[str, str]:
    """Shared string constants by value (numbers are too common to tell copies from chance)."""
    return {getattr(constants, name): name for name in dir(constants)
            if name.isupper() and isinstance(getattr(constants, name), str)}


@pytest.mark.parametrize("module", sorted(CONSUMERS))
def test_shared_constants_are_imported_not_copied(module: str) -> None:
    path = Path(importlib.import_module(module).__file__ or "")
    tree = ast.parse(path.read_text(), str(path))
    imported = {alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "uvmshim.protocol.constants"
                for alias in node.names}
    assert CONSUMERS[module] <= imported
    # No module-level constant of its own holds a shared value (a copy that could drift).
    shared = _shared_strings()
    copies = [f"{target.id} = {shared[node.value.value]}"
              for node in tree.body if isinstance(node, ast.Assign)
              and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
              and node.value.value in shared
              for target in node.targets if isinstance(target, ast.Name)]
    assert copies == []


class _NoModules(kmods.ModuleLoader):
    def ensure(self, *names: str) -> None:
        pass
