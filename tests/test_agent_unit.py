"""Guest agent pieces that run anywhere: path rules, sysfs lookups, module order, the server."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from uvmshim.agent import kmods
from uvmshim.agent.__main__ import find_port
from uvmshim.agent.paths import hugepage_size_kb, hugepages_mount_path, sandbox_mount_path
from uvmshim.agent.server import Server
from uvmshim.agent.storage import (
    Storage,
    detect_fstype,
    find_pmem_device,
    find_scsi_block_device,
    read_only_options,
    scsi_host_name,
)
from uvmshim.agent.util import AgentError, _reason, mounts
from uvmshim.protocol import PROTOCOL_VERSION, FrameDecoder, MountScsi, encode_frame

# Path rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ("sandbox://data", "/run/gcs/c/sb/sandboxMounts/data"),
    ("data/sub/", "/run/gcs/c/sb/sandboxMounts/data/sub"),
    ("sandbox:///abs/./x//y", "/run/gcs/c/sb/sandboxMounts/abs/x/y"),
    ("a/../b", "/run/gcs/c/sb/sandboxMounts/b"),
    ("", "/run/gcs/c/sb/sandboxMounts"),
    ("a/..", "/run/gcs/c/sb/sandboxMounts"),
])
def test_sandbox_paths(source: str, expected: str) -> None:
    assert sandbox_mount_path("sb", source) == expected


@pytest.mark.parametrize("source", [
    "..", "../x", "sandbox://../../etc", "a/../../b", "/../..", "x/../../sandboxMountsX",
])
def test_sandbox_escapes(source: str) -> None:
    with pytest.raises(AgentError, match="outside"):
        sandbox_mount_path("sb", source)


@pytest.mark.parametrize("sandbox_id", ["", ".", "..", "a/b"])
def test_bad_sandbox_ids(sandbox_id: str) -> None:
    with pytest.raises(AgentError, match="sandbox id"):
        sandbox_mount_path(sandbox_id, "x")


def test_hugepages_paths() -> None:
    assert hugepages_mount_path("sb", "hugepages://2M/hp") == (
        "/run/gcs/c/sb/hugepages/2M/hp", "2M")
    assert hugepages_mount_path("sb", "1G/a/../b") == ("/run/gcs/c/sb/hugepages/1G/b", "1G")
    assert hugepages_mount_path("sb", "2M") == ("/run/gcs/c/sb/hugepages/2M", "2M")
    for bad in ("2M/../1G/x", "2M/../../x", "2M/../../../../etc"):
        with pytest.raises(AgentError, match="outside"):
            hugepages_mount_path("sb", bad)
    for bad in ("", "/x", "2Q/x", "0M/x", "../x", "hugepages://"):
        with pytest.raises(AgentError, match="hugepage size"):
            hugepages_mount_path("sb", bad)
    assert [hugepage_size_kb(s) for s in ("2M", "2MB", "1G", "64k")] == [2048, 2048, 1048576, 64]


# sysfs lookups -------------------------------------------------------------------------------


def _fake_disk(sysfs: Path, slot: int, host: int, lun_l: int, name: str) -> None:
    pci = sysfs / f"bus/pci/devices/0000:00:{slot:02x}.0"
    (pci / f"virtio{slot}/host{host}/target{host}:0:0/{host}:0:0:{lun_l}/block/{name}").mkdir(
        parents=True)


def test_find_scsi_block_device(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _fake_disk(sysfs, 5, 0, 0, "sda")
    _fake_disk(sysfs, 5, 0, 3, "sdb")
    _fake_disk(sysfs, 6, 2, 1, "sdc")
    _fake_disk(sysfs, 6, 2, 0x4000 | 300, "sdd")  # LUN >= 256: flat-space addressing
    (sysfs / "bus/pci/devices/0000:00:05.0/virtio5/host0/target0:0:1/0:0:1:3/block/sdz").mkdir(
        parents=True)  # another target: not ours
    s = str(sysfs)
    assert find_scsi_block_device(0, 0, sysfs=s) == "sda"
    assert find_scsi_block_device(0, 3, sysfs=s) == "sdb"
    assert find_scsi_block_device(1, 1, sysfs=s) == "sdc"
    assert find_scsi_block_device(1, 300, sysfs=s) == "sdd"
    assert find_scsi_block_device(1, 0, sysfs=s) is None
    assert find_scsi_block_device(2, 0, sysfs=s) is None
    assert scsi_host_name(1, sysfs=s) == "host2"
    with pytest.raises(AgentError, match="out of range"):
        find_scsi_block_device(4, 0, sysfs=s)


def test_find_pmem_device(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    port = sysfs / "bus/pci/devices/0000:00:11.0"
    (port / "0000:02:00.0/virtio3/ndbus0/region0/namespace0.0/block/pmem0").mkdir(parents=True)
    (sysfs / "bus/pci/devices/0000:00:10.0").mkdir()  # root port 0: empty
    assert find_pmem_device(1, sysfs=str(sysfs)) == "pmem0"  # not "pmem1": probe order
    assert find_pmem_device(0, sysfs=str(sysfs)) is None
    # No root port at all: boot-time devices on the root bus, numbered in probe order.
    assert find_pmem_device(2, sysfs=str(sysfs)) is None
    (sysfs / "block/pmem2").mkdir(parents=True)
    assert find_pmem_device(2, sysfs=str(sysfs)) == "pmem2"
    with pytest.raises(AgentError, match="out of range"):
        find_pmem_device(16, sysfs=str(sysfs))


def test_mount_scsi_attach_only_waits_for_node(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    _fake_disk(sysfs, 5, 0, 2, "sdb")
    (dev / "sdb").touch()
    storage = Storage(_NoModules(), sysfs=str(sysfs), dev=str(dev))
    assert storage.mount_scsi(MountScsi(controller=0, lun=2, read_only=True)) == {
        "device": f"{dev}/sdb"}


def test_find_port(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for port, name in (("vport0p1", "other"), ("vport1p1", "agent")):
        (sysfs / "class/virtio-ports" / port).mkdir(parents=True)
        (sysfs / "class/virtio-ports" / port / "name").write_text(name + "\n")
    dev.mkdir()
    assert find_port(sysfs=str(sysfs), dev=str(dev)) is None  # node not there yet
    (dev / "vport1p1").touch()
    assert find_port(sysfs=str(sysfs), dev=str(dev)) == f"{dev}/vport1p1"


def test_detect_fstype(tmp_path: Path) -> None:
    img = tmp_path / "img"
    blank = bytearray(4096)
    img.write_bytes(bytes(blank))
    with pytest.raises(AgentError, match="no ext4"):
        detect_fstype(str(img))
    ext4 = bytearray(blank)
    ext4[1024 + 56 : 1024 + 58] = (0xEF53).to_bytes(2, "little")
    img.write_bytes(bytes(ext4))
    assert detect_fstype(str(img)) == "ext4"
    erofs = bytearray(blank)
    erofs[1024:1028] = (0xE0F5E1E2).to_bytes(4, "little")
    img.write_bytes(bytes(erofs))
    assert detect_fstype(str(img)) == "erofs"
    img.write_bytes(b"XFSB" + bytes(4092))
    assert detect_fstype(str(img)) == "xfs"
    assert read_only_options("ext4") == ["ro", "noload"]
    assert read_only_options("erofs") == ["ro"]


def test_mounts_parsing_and_reasons(tmp_path: Path) -> None:
    pm = tmp_path / "mounts"
    pm.write_text("/dev/sda /run/mounts/m\\0401 ext4 ro,noload 0 0\nproc /proc proc rw 0 0\n")
    assert mounts(str(pm))[0] == ("/dev/sda", "/run/mounts/m 1", "ext4", "ro,noload")
    assert _reason("mount: mounting /dev/sdb on /x failed: Invalid argument") == (
        "Invalid argument")
    assert _reason("umount: can't unmount /x: Device or resource busy") == (
        "Device or resource busy")


# Module dependencies -------------------------------------------------------------------------

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/scsi/sd_mod.ko.xz: kernel/block/t10-pi.ko kernel/lib/crc-t10dif.ko \
kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/block/t10-pi.ko: kernel/lib/crc-t10dif.ko
kernel/lib/crc-t10dif.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
"""


def test_parse_modules_dep_and_order() -> None:
    deps = kmods.parse_modules_dep(MODULES_DEP.replace("\\\n", ""))
    assert deps["ext4"] == ["crc16", "mbcache", "jbd2"]
    assert deps["crc_t10dif"] == []
    order = kmods.load_order(deps, ["sd_mod", "ext4"])
    assert set(order) == {"sd_mod", "t10_pi", "crc_t10dif", "scsi_mod", "scsi_common", "ext4",
                          "crc16", "mbcache", "jbd2"}
    for mod, mod_deps in deps.items():
        if mod in order:
            assert all(order.index(d) < order.index(mod) for d in mod_deps), mod
    assert kmods.load_order(deps, ["ext4", "ext4"]).count("ext4") == 1
    with pytest.raises(KeyError):
        kmods.load_order(deps, ["nope"])
    with pytest.raises(ValueError, match="cycle"):
        kmods.load_order({"a": ["b"], "b": ["a"]}, ["a"])


def test_modinfo_parsing() -> None:
    section = b"license=GPL\0depends=jbd2,mbcache,crc16\0softdep=pre: crc32c\0alias=fs-ext4\0"
    info = kmods.parse_modinfo(section)
    assert info["license"] == ["GPL"]
    assert kmods.modinfo_depends(info) == ["jbd2", "mbcache", "crc16"]
    assert kmods.modinfo_depends(kmods.parse_modinfo(b"depends=\0")) == []
    assert kmods.module_name("kernel/lib/crc-t10dif.ko.xz") == "crc_t10dif"


def test_module_set_covers_requests() -> None:
    wanted = kmods.all_wanted()
    assert wanted[:2] == ["virtio_pci", "virtio_console"]
    for needed in ("virtio_scsi", "sd_mod", "crc32c_generic", "ext4", "xfs", "erofs",
                   "9pnet_virtio", "9p", "overlay", "nd_pmem", "virtio_pmem"):
        assert needed in wanted


def test_module_loader_skips_loaded_and_builtin(tmp_path: Path) -> None:
    table = tmp_path / "modules.json"
    table.write_text(json.dumps({"deps": {"a": [], "b": ["a"]}}))
    sysfs = tmp_path / "sys"
    for name in ("a", "b"):
        (sysfs / "module" / name).mkdir(parents=True)
        (sysfs / "module" / name / "initstate").write_text("live\n")
    loader = kmods.ModuleLoader(str(tmp_path), str(table), str(sysfs))
    loader.ensure("b", "builtin_thing")  # nothing to insmod: all live or built in
    assert loader.is_loaded("a") and not loader.is_loaded("c")


# The server over a socketpair ----------------------------------------------------------------


class _NoModules(kmods.ModuleLoader):
    def ensure(self, *names: str) -> None:
        pass


class _Peer:
    """The host end of a socketpair, speaking frames synchronously."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = FrameDecoder()
        self.buffered: list[dict[str, Any]] = []
        self.next_id = 1

    def send(self, op: str, version: int = PROTOCOL_VERSION, **args: Any) -> int:
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(encode_frame({"v": version, "id": rid, "op": op, "args": args}))
        return rid

    def until_response(self, rid: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        while True:
            while self.buffered:
                msg = self.buffered.pop(0)
                if msg.get("id") == rid and "ok" in msg:
                    return msg, events
                if msg.get("id") == rid:
                    events.append(msg)
            chunk = self.sock.recv(65536)
            assert chunk, "agent closed the connection"
            self.buffered += self.dec.feed(chunk)


def _failure(resp: dict[str, Any]) -> tuple[str, str]:
    """``(kind, message)`` of a failed response."""
    assert resp["ok"] is False, resp
    return resp["error"]["kind"], resp["error"]["message"]


@pytest.fixture
def peer(tmp_path: Path) -> Any:
    host, guest = socket.socketpair()
    powered_off = threading.Event()
    server = Server(guest.fileno(), Storage(_NoModules(), sysfs=str(tmp_path)),
                    eof_is_final=True, poweroff=powered_off.set)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    p = _Peer(host)
    p.powered_off = powered_off  # type: ignore[attr-defined]
    yield p
    host.close()
    t.join(5)
    guest.close()


def test_server_hello_ping_and_errors(peer: _Peer) -> None:
    resp, _ = peer.until_response(peer.send("hello", version=PROTOCOL_VERSION))
    assert resp["ok"] and resp["result"]["version"] == PROTOCOL_VERSION
    resp, _ = peer.until_response(peer.send("ping"))
    assert resp["ok"] and "uptime" in resp["result"]
    resp, _ = peer.until_response(peer.send("ping", version=PROTOCOL_VERSION + 1))
    kind, message = _failure(resp)
    assert kind == "protocol" and "protocol version mismatch" in message
    resp, _ = peer.until_response(peer.send("frobnicate"))
    assert resp == {"id": resp["id"], "ok": False,
                    "error": {"kind": "protocol", "message": "unknown operation 'frobnicate'"}}
    resp, _ = peer.until_response(peer.send("mount_scsi", controller="0", lun=0))
    assert _failure(resp) == (
        "invalid", "mount_scsi: controller must be a non-negative integer, got '0'")
    resp, _ = peer.until_response(peer.send("mount_scsi", controller=0))
    assert _failure(resp) == ("invalid", "mount_scsi: lun is missing")
    resp, _ = peer.until_response(peer.send("ping", extra=1))
    assert _failure(resp) == ("invalid", "ping: unknown field 'extra'")
    resp, _ = peer.until_response(peer.send("add_vpci", vmbus_guid="g"))
    kind, message = _failure(resp)
    assert kind == "unsupported" and "not supported" in message
    resp, _ = peer.until_response(peer.send("mount_plan9", name="../x", guest_path="/x",
                                            read_only=True))
    kind, message = _failure(resp)
    assert kind == "invalid" and "invalid share name" in message
    resp, _ = peer.until_response(peer.send("container_start", container_id="nope"))
    assert _failure(resp) == ("not_found", "container nope does not exist")


def test_server_exec_streams_then_answers(peer: _Peer) -> None:
    rid = peer.send("exec", argv=["sh", "-c", "echo out; echo err >&2; cat; exit 4"],
                    env={"X": "1"}, stdin=base64.b64encode(b"in\n").decode())
    resp, events = peer.until_response(rid)
    assert resp["ok"] and resp["result"] == {"exit_code": 4, "timed_out": False}
    streams: dict[str, bytes] = {}
    for ev in events:
        assert ev["event"] == "output"
        streams[ev["stream"]] = streams.get(ev["stream"], b"") + base64.b64decode(ev["data"])
    assert streams == {"stdout": b"out\nin\n", "stderr": b"err\n"}


def test_server_exec_timeout_and_missing_binary(peer: _Peer) -> None:
    slow = peer.send("exec", argv=["sleep", "30"], timeout=0.3)
    quick = peer.send("ping")
    resp, _ = peer.until_response(quick)  # concurrent: not stuck behind the sleep
    assert resp["ok"]
    resp, _ = peer.until_response(slow)
    assert resp["result"]["timed_out"] is True
    resp, _ = peer.until_response(peer.send("exec", argv=["/nonexistent/tool"]))
    kind, message = _failure(resp)
    assert kind == "not_found" and message.startswith("exec /nonexistent/tool: ")


def test_server_shutdown_answers_before_poweroff(peer: _Peer) -> None:
    resp, _ = peer.until_response(peer.send("shutdown"))
    assert resp["ok"]
    assert peer.powered_off.wait(5)  # type: ignore[attr-defined]


def test_server_sandbox_dir(peer: _Peer, tmp_path: Path) -> None:
    resp, _ = peer.until_response(peer.send("sandbox_dir", sandbox_id="sb", path="../../x"))
    kind, message = _failure(resp)
    assert kind == "invalid" and "outside" in message
    assert not os.path.exists("/run/gcs/c/sb/x")


@pytest.mark.skipif(os.path.exists("/bin/install-drivers"), reason="host has install-drivers")
def test_server_install_drivers_missing_tool(peer: _Peer) -> None:
    resp, _ = peer.until_response(peer.send("install_drivers", rw_path="/run/drivers/x",
                                            disk_path="/run/mounts/m1"))
    assert _failure(resp) == ("unsupported", "/bin/install-drivers is not present in this guest")


def test_reaper_records_watched_exits_only(tmp_path: Path) -> None:
    """PID 1's reaper keeps the status of watched pids (the containers' inits) and the agent
    reads it back; the paths agree with the protocol's constants."""
    import subprocess

    from uvmshim.agent import reaper
    from uvmshim.agent.runtime import wait_exit
    from uvmshim.protocol.constants import EXIT_STATUS_DIR, EXIT_WATCH_DIR

    assert (reaper.WATCH_DIR, reaper.STATUS_DIR) == (EXIT_WATCH_DIR, EXIT_STATUS_DIR)
    watch, status = tmp_path / "watch", tmp_path / "exits"
    watch.mkdir()
    status.mkdir()
    for code, watched in ((7, True), (3, False)):
        proc = subprocess.Popen(["sh", "-c", f"exit {code}"])
        if watched:
            (watch / str(proc.pid)).touch()
        _, st = os.waitpid(proc.pid, 0)
        proc.returncode = code  # reaped here, as PID 1 does
        assert reaper.record(proc.pid, st, str(watch), str(status)) is watched
        if watched:
            assert not (watch / str(proc.pid)).exists()
            assert wait_exit(proc.pid, str(status), timeout=1) == 7
            assert not (status / str(proc.pid)).exists()
    proc = subprocess.Popen(["sleep", "30"])
    (watch / str(proc.pid)).touch()
    proc.kill()
    _, st = os.waitpid(proc.pid, 0)
    proc.returncode = -9
    reaper.record(proc.pid, st, str(watch), str(status))
    assert wait_exit(proc.pid, str(status), timeout=1) == 137  # 128 + SIGKILL, as runc reports it
    assert wait_exit(999999, str(status), timeout=0.05) == 255  # nothing recorded


def test_container_stats_reads_the_inits_cgroup(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``container_stats`` reads the cgroup v2 files of the cgroup the init is in; a container
    whose init is gone is not running (kind ``conflict``)."""
    from uvmshim.agent import runtime
    from uvmshim.protocol import ContainerStats
    from uvmshim.protocol.messages import ErrorKind

    lines = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        pytest.skip("no cgroup v2 line in /proc/self/cgroup")
    cgroup = tmp_path / path.lstrip("/")
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "pids.current").write_text("3\n")
    (cgroup / "memory.max").write_text("max\n")
    monkeypatch.setattr(runtime, "CGROUP_MOUNT", str(tmp_path))
    rt = runtime.Runtime(Storage(kmods.ModuleLoader()), lambda event: None)
    c = runtime._Container(str(tmp_path), False, "", "c1")
    rt._containers["c1"] = c
    with pytest.raises(AgentError) as err:  # not created yet
        rt.stats(ContainerStats(container_id="c1"))
    assert err.value.kind is ErrorKind.CONFLICT and "is not running" in str(err.value)
    c.init_pid = os.getpid()
    got = rt.stats(ContainerStats(container_id="c1"))
    assert got == {"cgroup": os.path.normpath(str(cgroup)),
                   "files": {"pids.current": "3\n", "memory.max": "max\n"}}
    with pytest.raises(AgentError) as err:
        rt.stats(ContainerStats(container_id="nope"))
    assert err.value.kind is ErrorKind.NOT_FOUND
