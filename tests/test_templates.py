"""UVM templates and clones (:mod:`uvmshim.uvm.qemu.template`, ``start_uvm``).

Unit tests build fake template directories (no VM): the key, the checks that refuse a stale or
damaged template, the lock, the leak inventory. The VM tests (marked ``vm``) use a private
template directory, so they never touch the templates the rest of the suite clones from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from uvmshim import hostpath
from uvmshim.agent.kmods import ModuleLoader
from uvmshim.agent.server import Server
from uvmshim.agent.storage import Storage
from uvmshim.errors import UvmshimError
from uvmshim.protocol import FreshStart, Request, decode_request
from uvmshim.runtime.leaks import find_holdings, reclaim_all
from uvmshim.uvm.bootfiles import BootFiles
from uvmshim.uvm.qemu import template as tm
from uvmshim.uvm.qemu.cmdline import build_argv
from uvmshim.uvm.qemu.config import MachinePaths, QemuConfig

from helpers import ext4

T = TypeVar("T")
BOOT = BootFiles(Path("/boot/k"), Path("/boot/i"), "bootkey1")


def _config(**kw: object) -> QemuConfig:
    return QemuConfig(kernel=Path("/boot/k"), initrd=Path("/boot/i"), **kw)  # type: ignore[arg-type]


# Section: command line and key


def test_argv_of_template_and_clone() -> None:
    paths = MachinePaths(Path("/s"))
    cold = build_argv(_config(), paths, accel="tcg", qmp_fd=3, agent_fd=4)
    assert "-incoming" not in cold and not any("memory-backend" in a for a in cold)
    tmpl = build_argv(_config(ram="template"), paths, accel="tcg", qmp_fd=3, agent_fd=4,
                      ram_fd=5)
    clone = build_argv(_config(ram="clone"), paths, accel="tcg", qmp_fd=3, agent_fd=4, ram_fd=5)
    assert "q35,memory-backend=ram0" in tmpl and "q35,memory-backend=ram0" in clone
    backend = "memory-backend-file,id=ram0,size=512M,mem-path=/proc/self/fd/5,share="
    assert backend + "on" in tmpl and backend + "off" in clone
    assert "-incoming" not in tmpl
    assert clone[clone.index("-incoming") + 1] == "defer"
    with pytest.raises(ValueError):
        build_argv(_config(ram="clone"), paths, accel="tcg", qmp_fd=3, agent_fd=4)


def test_key_covers_the_machine_and_nothing_host_specific() -> None:
    base = tm.key_for(_config(), BOOT, "tcg")
    assert base.key == tm.key_for(_config(), BOOT, "tcg").key
    # Where the files are does not matter ...
    moved = _config(base_dir=Path("/elsewhere"))
    assert tm.key_for(moved, BootFiles(Path("/x/k"), Path("/x/i"), "bootkey1"), "tcg").key \
        == base.key
    # ... what the guest runs on does.
    others = [
        tm.key_for(_config(memory_mb=1024), BOOT, "tcg"),
        tm.key_for(_config(cpus=1), BOOT, "tcg"),
        tm.key_for(_config(scsi_controllers=1), BOOT, "tcg"),
        tm.key_for(_config(vpmem_slots=2), BOOT, "tcg"),
        tm.key_for(_config(hotplug_ports=6), BOOT, "tcg"),
        tm.key_for(_config(kernel_args=("x=1",)), BOOT, "tcg"),
        tm.key_for(_config(), BootFiles(BOOT.kernel, BOOT.initrd, "bootkey2"), "tcg"),
        tm.key_for(_config(), BOOT, "kvm"),
    ]
    assert len({base.key, *(k.key for k in others)}) == len(others) + 1
    assert base.config.accel == "tcg" and base.config.ram == "anonymous"


# Section: a fake template on disk


def _fake_template(root: Path, key: tm.TemplateKey, state: bytes = b"S" * 1000) -> Path:
    d = root / key.key
    d.mkdir(parents=True)
    (d / tm.STATE).write_bytes(state)
    with open(d / tm.RAM, "wb") as f:
        f.truncate(key.config.memory_mb << 20)
    st = (d / tm.RAM).stat()
    (d / tm.MANIFEST).write_text(json.dumps({
        "format": tm.FORMAT_VERSION, "key": key.key, "material": key.material,
        "created": "2024-01-01T00:00:00Z",
        "state": {"size": len(state), "sha256": hashlib.sha256(state).hexdigest()},
        "ram": {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
    }))
    return d


@pytest.fixture
def key() -> tm.TemplateKey:
    return tm.key_for(_config(memory_mb=64), BOOT, "tcg")


def test_good_template_opens(tmp_path: Path, key: tm.TemplateKey) -> None:
    assert tm.open_template(key, tmp_path) is None
    _fake_template(tmp_path, key)
    files = tm.open_template(key, tmp_path)
    assert files is not None
    try:
        assert os.fstat(files.state_fd).st_size == 1000
        assert os.fstat(files.ram_fd).st_size == 64 << 20
        # Read-only descriptors: a clone can't write the template through them.
        assert fcntl.fcntl(files.ram_fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        files.close()


@pytest.mark.parametrize("damage", ["truncated state", "changed state", "modified ram",
                                    "short ram", "stale key", "bad manifest", "no state"])
def test_damaged_or_stale_template_is_refused(tmp_path: Path, key: tm.TemplateKey,
                                              damage: str) -> None:
    d = _fake_template(tmp_path, key)
    if damage == "truncated state":
        os.truncate(d / tm.STATE, 10)
    elif damage == "changed state":
        (d / tm.STATE).write_bytes(b"T" * 1000)
    elif damage == "modified ram":
        time.sleep(0.01)
        with open(d / tm.RAM, "r+b") as f:
            f.write(b"x")
    elif damage == "short ram":
        os.truncate(d / tm.RAM, 4096)
    elif damage == "stale key":
        manifest = json.loads((d / tm.MANIFEST).read_text())
        manifest["material"]["boot"] = "another boot key"
        (d / tm.MANIFEST).write_text(json.dumps(manifest))
    elif damage == "bad manifest":
        (d / tm.MANIFEST).write_text("{")
    else:
        (d / tm.STATE).unlink()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(tm.TemplateError, match="stale|damaged"):
        tm.open_template(key, tmp_path)
    assert set(os.listdir("/proc/self/fd")) == before  # no descriptor left open


def test_lock_guards_unfinished_builds_and_leaks_keep_templates(
        tmp_path: Path, key: tm.TemplateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hostpath.TEMPLATE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(hostpath.VM_DIR_ENV, str(tmp_path / "vm"))
    monkeypatch.setenv(hostpath.POD_DIR_ENV, str(tmp_path / "pods"))
    monkeypatch.setenv(hostpath.ROOT_ENV, str(tmp_path / "root"))
    good = _fake_template(tmp_path, key)
    partial = tmp_path / (tm.BUILD_PREFIX + "x")
    partial.mkdir()
    (partial / tm.RAM).write_bytes(b"half")
    # A build holds the lock: its directory is not a leak.
    fd = os.open(tmp_path / tm.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert tm.build_in_progress(tmp_path)
        held = find_holdings(tmp_path / "vm")
        assert held.template_builds == [] and held.empty
    finally:
        os.close(fd)
    held = find_holdings(tmp_path / "vm")
    assert held.template_builds == [str(partial)] and not held.empty
    assert [t.key for t in held.templates] == [key.key]
    reclaim_all(held)
    assert not partial.exists() and good.is_dir()  # the template is never reclaimed
    assert find_holdings(tmp_path / "vm").empty


def test_template_in_use_is_not_removed(tmp_path: Path, key: tm.TemplateKey,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = _fake_template(tmp_path, key)
    # A process mapping the RAM file privately, as a clone's QEMU does.
    child = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys, time\n"
        f"f = open({str(d / tm.RAM)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)\n"
        "print('mapped', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"mapped\n"
        assert tm.ram_users(d / tm.RAM, [child.pid]) == [child.pid]
        monkeypatch.setattr(tm, "_qemu_pids", lambda: [child.pid])
        with pytest.raises(tm.TemplateError, match="in use"):
            tm.remove_template(key.key, root=tmp_path)
        assert d.is_dir()
        [info] = tm.list_templates(tmp_path)
        assert info.users == [child.pid]
    finally:
        child.kill()
        child.wait()
    tm.remove_template(key.key, root=tmp_path)
    assert not d.exists() and tm.list_templates(tmp_path) == []


def test_fresh_start_request_is_checked(tmp_path: Path) -> None:
    body = FreshStart(entropy=b"e" * 64, time_ns=123, hostname="vm1")
    assert decode_request("fresh_start", body.to_json()) == body
    # The agent refuses a bad host name before touching anything of the system.
    a, b = socket.socketpair()
    try:
        storage = Storage(ModuleLoader(str(tmp_path)), sysfs=str(tmp_path))
        server = Server(a.fileno(), storage, eof_is_final=True)
        bad = FreshStart(entropy=b"e" * 64, time_ns=1, hostname="a/b")
        reply = server._answer(Request(1, "fresh_start", bad.to_json()))
        assert not reply.ok and reply.kind == "invalid"
        short = FreshStart(entropy=b"e", time_ns=1, hostname="ok")
        reply = server._answer(Request(2, "fresh_start", short.to_json()))
        assert not reply.ok and reply.kind == "invalid"
    finally:
        a.close()
        b.close()


# Section: real VMs


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tmpl_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("templates")
    old = os.environ.get(hostpath.TEMPLATE_DIR_ENV)
    os.environ[hostpath.TEMPLATE_DIR_ENV] = str(d)
    try:
        yield d
    finally:
        if old is None:
            del os.environ[hostpath.TEMPLATE_DIR_ENV]
        else:
            os.environ[hostpath.TEMPLATE_DIR_ENV] = old


async def _probe(template: bool | None = None) -> dict[str, Any]:
    from uvmshim.runtime.vm import start_uvm

    async with start_uvm(template=template) as uvm:
        host_before = time.time()
        res = await uvm.agent.exec(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | "
                                    "tr -d ' \\n'; echo; date +%s; hostname"])
        assert res.exit_code == 0, res.stderr
        rnd, clock, name = res.stdout.decode().split("\n")[:3]
        return {"random": rnd, "clock": int(clock), "host_clock": host_before,
                "hostname": name, "id": uvm.id, "template": uvm.template,
                "pid": uvm.machine.pid}


@pytest.mark.vm
def test_clones_get_their_own_entropy_clock_and_name(tmpl_dir: Path) -> None:
    first = _run(_probe())  # builds the template
    assert isinstance(first, dict) and first["template"]
    a, b = _run(_probe()), _run(_probe())
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["template"] == b["template"] == first["template"]
    assert len({first["random"], a["random"], b["random"]}) == 3, "clones share a CRNG state"
    for probe in (a, b):
        assert abs(probe["clock"] - probe["host_clock"]) <= 2
        assert probe["hostname"] == probe["id"]
    [info] = tm.list_templates(tmpl_dir)
    assert info.users == []  # the clones are gone
    assert find_holdings(hostpath.vm_dir()).template_builds == []


@pytest.mark.vm
def test_cold_boot_gets_a_fresh_start_too(tmpl_dir: Path) -> None:
    probe = _run(_probe(template=False))
    assert isinstance(probe, dict) and probe["template"] is None
    assert probe["hostname"] == probe["id"]
    assert abs(probe["clock"] - probe["host_clock"]) <= 2


@pytest.mark.vm
def test_hotplug_after_restore(tmpl_dir: Path, tmp_path: Path) -> None:
    from uvmshim.runtime.vm import start_uvm

    img = ext4(tmp_path, "d", {"hello.txt": "from disk\n"})
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("from share\n")

    async def go() -> str:
        async with start_uvm() as uvm:
            assert uvm.template is not None
            disk = await uvm.vm.add_scsi(img, "/run/mounts/m1", read_only=True,
                                         options=("ro",))
            sh = await uvm.vm.add_plan9(str(share), "/run/shares/0", read_only=True)
            res = await uvm.agent.exec(["cat", "/run/mounts/m1/hello.txt", "/run/shares/0/f"])
            await sh.release()
            await disk.release()
            return res.stdout.decode()

    assert _run(go()) == "from disk\nfrom share\n"


@pytest.mark.vm
def test_template_removed_while_a_clone_runs(tmpl_dir: Path) -> None:
    from uvmshim.runtime.vm import start_uvm

    async def go() -> tuple[int, str]:
        async with start_uvm() as uvm:
            assert uvm.template is not None
            for key in [t.key for t in tm.list_templates(tmpl_dir)]:
                tm.remove_template(key, force=True, root=tmpl_dir)
            assert tm.list_templates(tmpl_dir) == []
            # The clone keeps running on its mapping of the removed RAM file.
            res = await uvm.agent.exec(["sh", "-c", "dd if=/dev/zero of=/tmp/x bs=1M count=64 "
                                        "2>/dev/null && md5sum /tmp/x | cut -c1-8"])
            return res.exit_code, res.stdout.decode().strip()

    assert _run(go()) == (0, "7f614da9")
    assert not any(p.name.startswith(".") and p.is_dir() for p in tmpl_dir.iterdir())


@pytest.mark.vm
def test_truncated_state_falls_back_to_cold_boot(tmpl_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from uvmshim.runtime.vm import build_template

    key = _run(build_template())
    assert isinstance(key, str)
    os.truncate(tmpl_dir / key / tm.STATE, 1000)
    with caplog.at_level(logging.WARNING):
        probe = _run(_probe())
    assert isinstance(probe, dict)
    # The damaged template was refused and rebuilt; nothing half-written was used.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("damaged" in w for w in warnings), warnings
    assert probe["template"] == key
    files = tm.open_template(_key_now(), tmpl_dir)
    assert files is not None
    files.close()


def _key_now() -> tm.TemplateKey:
    from uvmshim.runtime.vm import machine_config
    from uvmshim.uvm.bootfiles import ensure_boot_files
    from uvmshim.uvm.options import UvmOptions

    async def go() -> tm.TemplateKey:
        boot = await ensure_boot_files()
        return await tm.resolve_key(machine_config(boot, UvmOptions()), boot)

    key = _run(go())
    assert isinstance(key, tm.TemplateKey)
    return key


@pytest.mark.vm
def test_state_the_clone_refuses_means_cold_boot(tmpl_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A state file that passes the checks but that QEMU refuses (here: forged, manifest and
    all) gives a cold boot with a warning, and the template is removed."""
    key = _key_now()
    d = tmpl_dir / key.key
    if not d.exists():
        from uvmshim.runtime.vm import build_template

        _run(build_template())
    junk = b"QEVM" + os.urandom(4000)
    (d / tm.STATE).write_bytes(junk)
    manifest = json.loads((d / tm.MANIFEST).read_text())
    manifest["state"] = {"size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    (d / tm.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        probe = _run(_probe())
    assert isinstance(probe, dict) and probe["template"] is None
    assert any("booting cold" in r.getMessage() for r in caplog.records)
    assert not d.exists()


_BUILD = """
import asyncio, sys
from uvmshim.runtime.vm import build_template
print(asyncio.run(build_template()), flush=True)
"""


@pytest.mark.vm
def test_concurrent_builds_end_with_one_good_template(tmp_path: Path) -> None:
    env = {**os.environ, hostpath.TEMPLATE_DIR_ENV: str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    keys = {o[0].decode().strip() for o in outs}
    assert len(keys) == 1
    entries = sorted(p.name for p in tmp_path.iterdir() if p.name != tm.LOCK)
    assert entries == sorted(keys)
    [info] = tm.list_templates(tmp_path)
    assert info.manifest["key"] == keys.pop()


_CLONE_AND_HANG = """
import asyncio
from uvmshim.runtime.vm import start_uvm
async def main():
    async with start_uvm() as uvm:
        print(uvm.machine.state_dir, uvm.template, flush=True)
        await asyncio.sleep(600)
asyncio.run(main())
"""


@pytest.mark.vm
def test_killed_clone_leaves_nothing_reclaim_misses(tmpl_dir: Path) -> None:
    env = {**os.environ, hostpath.TEMPLATE_DIR_ENV: str(tmpl_dir)}
    before = find_holdings()
    proc = subprocess.Popen([sys.executable, "-c", _CLONE_AND_HANG], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    assert len(line) == 2 and line[1] != "None", proc.stderr.read() if proc.stderr else ""
    state_dir = Path(line[0])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    held = find_holdings()
    mine = [v for v in held.vms if v.state_dir == state_dir]
    assert mine, "the killed clone's state directory should be listed"
    reclaim_all(dataclasses.replace(held, vms=mine, qemu_pids=[], mounts=[], state_dirs=[],
                                    template_builds=[]))
    after = find_holdings()
    assert not any(v.state_dir == state_dir for v in after.vms)
    assert not [m for m in after.mounts if m.startswith(str(state_dir))]
    assert set(after.qemu_pids) <= set(before.qemu_pids) | set(held.qemu_pids)
    for t in after.templates:
        if t.path.parent == tmpl_dir:
            assert t.users == []


def test_no_template_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tm.NO_TEMPLATE_ENV, raising=False)
    assert not tm.templates_disabled()
    monkeypatch.setenv(tm.NO_TEMPLATE_ENV, "1")
    assert tm.templates_disabled()
    monkeypatch.setenv(tm.NO_TEMPLATE_ENV, "0")
    assert not tm.templates_disabled()
    assert issubclass(tm.TemplateError, UvmshimError)


def test_template_cli_ls_and_rm(tmp_path: Path, key: tm.TemplateKey,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from uvmshim.cli.main import cli
    from uvmshim.cli.run_cmd import run_command
    from uvmshim.cli.uvm_cmd import uvm_group

    cli.add_command(uvm_group)
    monkeypatch.setenv(hostpath.TEMPLATE_DIR_ENV, str(tmp_path))
    _fake_template(tmp_path, key)
    runner = CliRunner()
    res = runner.invoke(cli, ["uvm", "template", "ls", "--json"])
    assert res.exit_code == 0, res.output
    [row] = json.loads(res.output)
    assert row["key"] == key.key and row["memory_mb"] == 64 and row["users"] == []
    res = runner.invoke(cli, ["uvm", "template", "rm", key.key])
    assert res.exit_code == 0 and f"removed {key.key}" in res.output
    res = runner.invoke(cli, ["uvm", "template", "ls"])
    assert "no templates" in res.output
    assert "--no-template" in runner.invoke(run_command, ["--help"]).output
