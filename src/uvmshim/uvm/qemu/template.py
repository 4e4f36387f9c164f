"""Utility VM templates: boot one UVM, save it, and start every later UVM as a clone of it.

A **template** is a UVM booted with a given machine configuration until its agent answered and
the guest's early set-up was done, with no share mounted, no disk attached and no host connected,
then paused and saved (:mod:`.snapshot`). Its directory, ``<template_dir()>/<key>/``, holds::

    ram             guest RAM (the memory-backend-file the template VM ran on, share=on)
    state           the device state (QEMU's migration stream without RAM, a few hundred KB)
    manifest.json   what it was built from (the key material), sizes, the state's SHA-256, the
                    RAM file's mtime, QEMU's version, when and how fast it was built

A **clone** runs QEMU with the same command line, RAM mapped privately from the template's file
(``share=off``: pages are shared with the page cache, and with every other clone, until the clone
writes them; the file itself is never written) and ``-incoming defer``; the device state is
loaded, the VM continued, and its agent answers on the clone's own channel a fraction of a second
after QEMU started. :func:`uvmshim.runtime.vm.start_uvm` then sends the agent
:class:`~uvmshim.protocol.requests.FreshStart` (entropy, wall clock, host name), so no two
clones share a random state.

**Key.** A template is used only by a clone that would run the very same machine: the key hashes
the QEMU command line with every host path and descriptor replaced by a placeholder (so memory,
CPUs, CPU model, accelerator, SCSI controllers, ports, vPMEM, kernel arguments are all in), the
boot files' key (kernel, initrd, agent), the QEMU binary's identity (path, size, mtime) and, under
KVM, the host CPU's flags. A change to any of them is a new key, and so a new template.

**Trust, but check.** Before a clone uses a template, :func:`open_template` checks the manifest
against the key, the state file's size and SHA-256 (~1 ms) and the RAM file's size and mtime
(written through a mapping or ``write``, it would have a new mtime). A template that fails is
*damaged*: it is refused, removed, and the caller boots cold with a one-line warning. Every file
is opened through one directory descriptor, so a template replaced meanwhile can't be mixed up.

**Building** happens under an exclusive ``flock`` on ``<template_dir()>/.lock`` (two processes
building the same template end with one good template: the second waits and finds it), in a
temporary ``.build-*`` directory renamed into place only when complete and synced; Ctrl-C, a
failure, a full disk leave nothing but a ``.build-*`` directory that the next build (or ``uvmshim
leaks --reclaim``) removes once no build holds the lock. A template is never modified after it
is complete, only removed (running clones keep their mapping of a removed RAM file).

**QEMU's confinement.** QEMU opens no host file by name: uvmshim opens the RAM file and passes
it as an inherited descriptor that QEMU opens as ``/proc/self/fd/<n>`` (``memory-backend-file``
takes a path only), and hands the state file over QMP (``getfd``). QEMU 7.2 maps a file
writable only if it opened it read-write (its ``readonly`` option also makes the mapping
read-only), so a clone's QEMU opens the RAM file read-write but maps it privately; it never
writes it, and the mtime check would catch a QEMU that did.

Templates are disabled with ``UVMSHIM_NO_TEMPLATE=1`` (or ``uvmshim run --no-template``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import hostpath, procscan
from ...asyncutil import finish_despite_cancel
from ...errors import BackendError, UvmshimError
from ...protocol.constants import BOOT_DONE_MARKER
from ...protocol.requests import FreshStart, LoadModules, ParkReadyNic
from .. import hostnet
from ..bootfiles import BootFiles
from .agent_client import AgentClient
from .cmdline import build_argv
from .config import Accel, MachinePaths, QemuConfig
from .machine import QemuMachine, default_kvm_probe
from .snapshot import save_state

log = logging.getLogger(__name__)

#: Bump when the layout or the build changes in a way the key does not show.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state"
RAM = "ram"
LOCK = ".lock"
BUILD_PREFIX = ".build-"
TRASH_PREFIX = ".trash-"
FAILED_SUFFIX = ".failed"
#: Set (to anything but ``0`` or empty) to boot every UVM cold.
NO_TEMPLATE_ENV = "UVMSHIM_NO_TEMPLATE"
#: How many complete templates to keep (most recently built first; one in use is never removed).
KEEP_TEMPLATES = 4
#: After a failed automatic build, how long start_uvm boots cold without trying again.
RETRY_FAILED_AFTER = 600.0
#: How long the template VM's agent may take to answer (a cold boot under TCG: 3-6 s).
AGENT_TIMEOUT = 60.0
#: How long the guest's early set-up may take after the agent answered.
BOOT_DONE_TIMEOUT = 30.0
#: Kernel modules a template loads, so that its clones need not (``agent.kmods.MODULE_GROUPS``):
#: what nearly every container needs (a 9p root or bind mount, SCSI layers, ext4, overlay, and
#: virtio_net for an engine's network: 0.2-0.6 s of insmod under TCG otherwise, in create).
PRELOAD_MODULE_GROUPS = ("9p", "scsi", "ext4", "overlay", "net")
#: Free space a build wants besides the guest RAM size (device state, manifest).
SPACE_MARGIN = 64 << 20

Progress = Callable[[str], None]


class TemplateError(BackendError):
    """A template could not be built, or is stale or damaged and was refused."""


def templates_disabled() -> bool:
    """True if ``$UVMSHIM_NO_TEMPLATE`` asks for cold boots."""
    return os.environ.get(NO_TEMPLATE_ENV, "") not in ("", "0")


# Section: the key


@dataclass(frozen=True)
class TemplateKey:
    """Names a template: ``key`` is a hash of ``material`` (see the module docstring)."""

    key: str
    material: dict[str, Any]
    #: The machine a template (and each of its clones) runs: ``config`` with ``accel`` resolved.
    config: QemuConfig


def qemu_identity(binary: str) -> dict[str, Any]:
    """Path, size and mtime of the QEMU binary (a new QEMU package changes them)."""
    found = shutil.which(binary)
    if found is None:
        raise TemplateError(f"QEMU binary {binary} not found")
    real = os.path.realpath(found)
    st = os.stat(real)
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.encode()).hexdigest()[:16]
    return ""


def key_for(config: QemuConfig, boot: BootFiles, accel: Accel) -> TemplateKey:
    """The key of the template for ``config`` (booting ``boot``) on accelerator ``accel``."""
    resolved = dataclasses.replace(config, accel=accel, ram="anonymous")
    placeholder = dataclasses.replace(
        resolved, kernel=Path("<kernel>"), initrd=Path("<initrd>"), base_dir=None, ram="clone"
    )
    argv = build_argv(
        placeholder, MachinePaths(Path("<state>")), accel=accel, qmp_fd=-1, agent_fd=-1, ram_fd=-1
    )
    material: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "boot": boot.key,
        "qemu": qemu_identity(config.qemu_binary),
        "argv": argv,
        "memory_mb": config.memory_mb,
        "preloaded": list(PRELOAD_MODULE_GROUPS),  # what the guest state already holds
    }
    if accel == "kvm":
        material["host_cpu"] = _cpu_flags()
    blob = json.dumps(material, sort_keys=True).encode()
    return TemplateKey(hashlib.sha256(blob).hexdigest()[:24], material, resolved)


async def resolve_key(config: QemuConfig, boot: BootFiles) -> TemplateKey:
    """:func:`key_for`, resolving ``accel="auto"`` with the process-wide KVM probe."""
    accel = await default_kvm_probe().accel() if config.accel == "auto" else config.accel
    return key_for(config, boot, accel)


# Section: opening a template for a clone


@dataclass
class TemplateFiles:
    """A checked template, opened: the descriptors a clone needs. :meth:`close` them."""

    path: Path
    key: str
    manifest: dict[str, Any]
    state_fd: int
    ram_fd: int

    def close(self) -> None:
        for fd in (self.state_fd, self.ram_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.state_fd = self.ram_fd = -1


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _read_manifest(dfd: int) -> dict[str, Any]:
    fd = os.open(MANIFEST, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    with os.fdopen(fd, "rb") as f:
        data = json.loads(f.read(1 << 20))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def open_template(key: TemplateKey, root: Path | None = None) -> TemplateFiles | None:
    """Open and check the template for ``key``; None if there is none.

    :raise TemplateError: it exists but is stale or damaged (the message says how); the caller
        should :func:`discard` it.
    """
    path = (root or hostpath.template_dir()) / key.key
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise TemplateError(f"template {path}: {err.strerror}") from err
    files = TemplateFiles(path, key.key, {}, -1, -1)
    try:
        try:
            manifest = _read_manifest(dfd)
            files.manifest = manifest
            if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != key.key:
                raise TemplateError(f"template {path} is stale: its manifest names another key")
            if manifest.get("material") != key.material:
                raise TemplateError(f"template {path} is stale: built for another machine")
            files.state_fd = os.open(STATE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
            files.ram_fd = os.open(RAM, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
            state, ram = manifest["state"], manifest["ram"]
            st = os.fstat(files.state_fd)
            if st.st_size != state["size"]:
                raise TemplateError(
                    f"template {path} is damaged: state file has {st.st_size} bytes, "
                    f"not {state['size']}")
            if _sha256_fd(files.state_fd) != state["sha256"]:
                raise TemplateError(f"template {path} is damaged: state file checksum differs")
            rt = os.fstat(files.ram_fd)
            if rt.st_size != ram["size"] or rt.st_size != key.config.memory_mb << 20:
                raise TemplateError(
                    f"template {path} is damaged: RAM file has {rt.st_size} bytes, "
                    f"not {ram['size']}")
            if rt.st_mtime_ns != ram["mtime_ns"]:
                raise TemplateError(f"template {path} is damaged: its RAM file was modified")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TemplateError(f"template {path} is damaged: {err}") from err
    except BaseException:
        files.close()
        raise
    finally:
        os.close(dfd)
    return files


# Section: the directory


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_path(root: Path) -> Path:
    return root / LOCK


@contextlib.asynccontextmanager
async def _build_lock(root: Path) -> Any:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(_lock_path(root), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # flock in a thread: a second builder waits here without blocking the event loop. If we
        # are cancelled meanwhile, the thread still takes the lock; closing the fd drops it.
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_in_progress(root: Path | None = None) -> bool:
    """True if some process holds the build lock right now."""
    path = _lock_path(root or hostpath.template_dir())
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


def _remove_tree(path: Path) -> None:
    """Rename ``path`` out of the way (atomic: no half template under its name), delete it."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def discard(path: Path) -> None:
    """Remove a stale or damaged template (clones running from it keep their mapping)."""
    _remove_tree(path)


def leftover_builds(root: Path | None = None) -> list[Path]:
    """``.build-*`` and ``.trash-*`` directories no running build owns (empty while a build
    holds the lock: it may own them)."""
    base = root or hostpath.template_dir()
    if not base.is_dir() or build_in_progress(base):
        return []
    return sorted(p for p in base.iterdir()
                  if p.name.startswith((BUILD_PREFIX, TRASH_PREFIX)) and p.is_dir())


@dataclass
class TemplateInfo:
    """A template directory, as ``uvmshim uvm template ls`` and ``uvmshim leaks`` show it."""

    path: Path
    manifest: dict[str, Any]
    #: Disk space actually used (the RAM file is sparse).
    disk_bytes: int
    #: QEMU processes mapping its RAM file (clones running from it).
    users: list[int]

    @property
    def key(self) -> str:
        return self.path.name

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "key": self.key, "path": str(self.path), "memory_mb": m.get("material", {})
            .get("memory_mb"), "boot_key": m.get("material", {}).get("boot"),
            "qemu_version": m.get("qemu_version"), "created": m.get("created"),
            "build_seconds": m.get("build_seconds"), "state_bytes": m.get("state", {})
            .get("size"), "disk_bytes": self.disk_bytes, "users": self.users,
            "ready_nic": any(str(a).startswith("virtio-net-pci,id=nic-ready")
                             for a in m.get("material", {}).get("argv", [])),
        }  # fmt: skip


def _qemu_pids() -> list[int]:
    return [pid for pid, argv in procscan.command_lines()
            if argv and any(b"qemu-system" in a for a in argv[:12])]


def ram_users(ram: Path, pids: list[int] | None = None) -> list[int]:
    """QEMU processes that map the file ``ram`` (matched by device and inode in their maps)."""
    try:
        st = os.stat(ram)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    users = []
    for pid in _qemu_pids() if pids is None else pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) >= 5 and fields[4] == ino and fields[3] == dev:
                        users.append(pid)
                        break
        except OSError:
            continue
    return users


def list_templates(root: Path | None = None) -> list[TemplateInfo]:
    """Every complete template directory (newest first), with its users."""
    base = root or hostpath.template_dir()
    if not base.is_dir():
        return []
    pids = _qemu_pids()
    found = []
    for d in base.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        disk = 0
        for f in d.iterdir():
            with contextlib.suppress(OSError):
                disk += f.stat().st_blocks * 512
        found.append(TemplateInfo(d, manifest if isinstance(manifest, dict) else {}, disk,
                                  ram_users(d / RAM, pids)))
    found.sort(key=lambda t: str(t.manifest.get("created", "")), reverse=True)
    return found


def remove_template(key: str, *, force: bool = False, root: Path | None = None) -> None:
    """Remove template ``key``.

    :raise TemplateError: no such template, or clones run from it (unless ``force``: they keep
        running on their mapping of the removed file).
    """
    base = root or hostpath.template_dir()
    if not key or "/" in key or key.startswith("."):
        raise TemplateError(f"bad template key {key!r}")
    path = base / key
    if not path.is_dir():
        raise TemplateError(f"no template {key} in {base}")
    users = ram_users(path / RAM)
    if users and not force:
        raise TemplateError(f"template {key} is in use by QEMU pid {', '.join(map(str, users))}",
                            hint="stop those VMs first, or remove it anyway with --force")
    _remove_tree(path)


def _prune(root: Path, keep: str) -> None:
    """Keep the newest :data:`KEEP_TEMPLATES` templates and any in use; drop leftovers."""
    for left in leftover_builds_locked(root):
        shutil.rmtree(left, ignore_errors=True)
    others = [t for t in list_templates(root) if t.key != keep]
    for t in others[KEEP_TEMPLATES - 1:]:
        if not t.users:
            _remove_tree(t.path)


def leftover_builds_locked(root: Path) -> list[Path]:
    """Like :func:`leftover_builds`, for a caller that holds the build lock itself."""
    return sorted(p for p in root.iterdir()
                  if p.name.startswith((BUILD_PREFIX, TRASH_PREFIX)) and p.is_dir())


# Section: building


async def ensure_template(
    key: TemplateKey,
    boot: BootFiles,
    *,
    progress: Progress | None = None,
    root: Path | None = None,
    rebuild: bool = False,
    retry_failed: bool = True,
) -> TemplateFiles:
    """Open the template for ``key``, building it first if there is none (or it is damaged).

    :param retry_failed: build even if a build of this key failed less than
        :data:`RETRY_FAILED_AFTER` seconds ago (else: raise at once).
    :raise TemplateError: it could not be built (the message says why).
    """
    base = root or hostpath.template_dir()
    if not rebuild:
        try:
            found = open_template(key, base)
        except TemplateError as err:
            log.warning("%s; rebuilding it", err)
            found = None
        if found is not None:
            return found
    failed = base / (key.key + FAILED_SUFFIX)
    with contextlib.suppress(OSError):
        if not retry_failed and time.time() - failed.stat().st_mtime < RETRY_FAILED_AFTER:
            raise TemplateError(f"building template {key.key} failed recently: "
                                f"{failed.read_text().strip()}")
    async with _build_lock(base):
        if not rebuild:
            try:
                found = open_template(key, base)
            except TemplateError:
                discard(base / key.key)
                found = None
            if found is not None:
                return found
        try:
            await _build(key, boot, base, progress or (lambda _m: None))
        except TemplateError as err:
            with contextlib.suppress(OSError):
                failed.write_text(str(err) + "\n")
            raise
        with contextlib.suppress(OSError):
            failed.unlink()
        _prune(base, key.key)
        found = open_template(key, base)
    if found is None:
        raise TemplateError(f"template {key.key} vanished right after it was built")
    return found


def _check_space(base: Path, memory_mb: int) -> None:
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    need = (memory_mb << 20) + SPACE_MARGIN
    if free < need:
        raise TemplateError(
            f"not enough disk space for a template in {base}: {free >> 20} MiB free, "
            f"{need >> 20} MiB wanted", hint=f"free some space or set {hostpath.TEMPLATE_DIR_ENV}")


async def _build(key: TemplateKey, boot: BootFiles, base: Path, say: Progress) -> None:
    """Boot, settle, save and publish the template for ``key`` (the caller holds the lock)."""
    _check_space(base, key.config.memory_mb)
    for left in leftover_builds_locked(base):  # a killed build's
        shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=base))
    started = time.monotonic()
    try:
        say("building the UVM template (first use)")
        manifest = await _boot_and_save(key, boot, tmp)
        manifest["build_seconds"] = round(time.monotonic() - started, 3)
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_path(tmp)
        final = base / key.key
        if final.exists():
            _remove_tree(final)
        tmp.rename(final)  # atomic: complete or absent
        _fsync_path(base)
        log.info("template %s built in %.1f s", key.key, manifest["build_seconds"])
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TemplateError(f"building the template in {base}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


async def _boot_and_save(key: TemplateKey, boot: BootFiles, tmp: Path) -> dict[str, Any]:
    config = dataclasses.replace(key.config, kernel=boot.kernel, initrd=boot.initrd,
                                 ram="template")
    if not config.ready_nic:
        return await _boot_and_save_with(key, config, tmp, None)
    # A ready NIC's features are negotiated with the tap it has as its driver binds: the
    # template's gets one (in a namespace of its own), its clones a tap each, of the same kind.
    try:
        tap_fd, ns_fd = await asyncio.to_thread(hostnet.scratch_tap)
    except (OSError, UvmshimError) as err:
        raise TemplateError(f"a tap for the template's ready NIC: {err}") from err
    try:
        return await _boot_and_save_with(key, config, tmp, tap_fd)
    finally:
        # QEMU is gone, and with it the tap (our copy was closed as it started): the namespace
        # goes too.
        os.close(tap_fd)
        os.close(ns_fd)


async def _boot_and_save_with(key: TemplateKey, config: QemuConfig, tmp: Path,
                              tap_fd: int | None) -> dict[str, Any]:
    ram_path = tmp / RAM
    ram_fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    machine = QemuMachine(config, vm_id=f"template-{uuid.uuid4().hex[:8]}", ram_fd=ram_fd,
                          nic_fd=tap_fd)
    try:
        try:
            os.ftruncate(ram_fd, config.memory_mb << 20)
            await machine.launch()
        finally:
            os.close(ram_fd)
        agent = await AgentClient.connect(machine.agent_socket_path, timeout=AGENT_TIMEOUT)
        try:
            info = dict(agent.guest_info)
            # Warm up what every clone uses first (the fresh_start handler, exec and its
            # subprocess module) while waiting for /init's early set-up to finish.
            await agent.request(FreshStart(entropy=os.urandom(64), time_ns=time.time_ns(),
                                           hostname="uvmshim-template"))
            wait = (f"i=0; while [ ! -e {BOOT_DONE_MARKER} ]; do "
                    f"[ $i -ge {int(BOOT_DONE_TIMEOUT * 20)} ] && exit 1; i=$((i+1)); "
                    "sleep 0.05; done")
            res = await agent.exec(["sh", "-c", wait], timeout=BOOT_DONE_TIMEOUT + 5)
            if res.exit_code != 0:
                raise TemplateError("the template VM did not finish its early set-up "
                                    f"({BOOT_DONE_MARKER} missing)")
            await agent.request(LoadModules(groups=PRELOAD_MODULE_GROUPS))
            if config.ready_nic:
                await agent.request(ParkReadyNic())
        finally:
            await agent.close()
        # Let QEMU see the host side of the agent port close before the state is saved: the
        # guest then waits for a host, and a clone's first connection opens the port anew.
        await asyncio.sleep(0.1)
        version = await machine.qmp.execute("query-version")
        state_fd = os.open(tmp / STATE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o600)
        try:
            size = await save_state(machine, state_fd)
            await asyncio.to_thread(os.fsync, state_fd)
        finally:
            os.close(state_fd)
        if size <= 0:
            raise TemplateError("QEMU wrote an empty device state")
    except UvmshimError as err:
        if not isinstance(err, TemplateError):
            raise TemplateError(f"building the template: {err}") from err
        raise
    finally:
        await finish_despite_cancel(machine.shutdown())
    # QEMU is gone: nothing writes the RAM file any more. Sync it, then note its mtime.
    await asyncio.to_thread(_fsync_path, ram_path)
    state_fd = os.open(tmp / STATE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        digest = _sha256_fd(state_fd)
    finally:
        os.close(state_fd)
    qemu = version.get("qemu", {}) if isinstance(version, dict) else {}
    return {
        "format": FORMAT_VERSION,
        "key": key.key,
        "material": key.material,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "qemu_version": f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}",
        "guest": info,
        "state": {"size": size, "sha256": digest},
        "ram": {"size": ram_path.stat().st_size, "mtime_ns": ram_path.stat().st_mtime_ns},
    }
