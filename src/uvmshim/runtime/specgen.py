"""Build an OCI spec from ``uvmshim run`` arguments, with podman's defaults for a container.

The spec is what a user of a container runtime expects: the command as the init process, the
usual ``/proc``, ``/dev``, ``/sys`` mounts, fresh pid/ipc/uts/mount/network/cgroup namespaces,
and podman's confinement: its default capability set (no ``CAP_MKNOD``, ``CAP_NET_RAW``,
``CAP_AUDIT_WRITE`` or ``CAP_SYS_ADMIN``), a device cgroup that denies every device but the
usual character devices, masked and read-only ``/proc`` and ``/sys`` paths, no new
privileges and the default seccomp profile of :mod:`uvmshim.runtime.seccomp`. Mounts the user
asks for are added after the default ones, so their indexes (and so their ``/mounts/m<i>``
share paths) follow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uvmshim.errors import UvmshimError
from uvmshim.runtime.seccomp import default_profile
from uvmshim.spec import Spec
from uvmshim.uvm.network import network_annotations

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: podman's default capability set.
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
                "CAP_SYS_CHROOT"]


def _char_device(major: int, minor: int | None) -> dict[str, Any]:
    rule: dict[str, Any] = {"allow": True, "type": "c", "major": major}
    if minor is not None:
        rule["minor"] = minor
    return {**rule, "access": "rwm"}


#: The device cgroup of runc and podman: deny every device, then allow /dev/null, zero, full,
#: random, urandom, tty, ptmx and the pseudo-terminals (the last matching rule wins).
DEFAULT_DEVICE_RULES: list[dict[str, Any]] = [
    {"allow": False, "access": "rwm"},
    _char_device(1, 3), _char_device(1, 5), _char_device(1, 7), _char_device(1, 8),
    _char_device(1, 9), _char_device(5, 0), _char_device(5, 2), _char_device(136, None),
]

#: Paths hidden from the container (podman's and Docker's lists; those absent are skipped).
MASKED_PATHS = ["/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
                "/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware",
                "/sys/fs/selinux"]

#: Paths the container may read but not write.
READONLY_PATHS = ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                  "/proc/sysrq-trigger"]


def _default_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]


@dataclass
class RunOptions:
    """What ``uvmshim run`` was asked for. Mount arguments are kept as the user wrote them."""

    args: Sequence[str]
    rootfs: str | None = None
    layers: Sequence[str] = ()
    volumes: Sequence[str] = ()  # HOST:CTR[:ro]
    disks: Sequence[str] = ()  # IMAGE:CTR[:ro]
    physical_disks: Sequence[str] = ()  # DEV:CTR[:ro]
    hugepages: Sequence[str] = ()  # NAME:CTR
    sandbox_mounts: Sequence[str] = ()  # NAME:CTR
    env: Sequence[str] = ()
    cwd: str = "/"
    user: tuple[int, int] = (0, 0)
    hostname: str = "uvmshim"
    read_only_root: bool = False
    terminal: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    network: str = "none"  # or "nat": QEMU's user-mode network (uvmshim.uvm.network)
    publish: Sequence[str] = ()  # [IP:]HOST:CTR[/tcp|udp]


def _split(value: str, flag: str, *, ro_allowed: bool = True) -> tuple[str, str, bool]:
    parts = value.split(":")
    ro = False
    if ro_allowed and len(parts) == 3 and parts[2] in ("ro", "rw"):
        ro = parts[2] == "ro"
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        form = "SOURCE:DEST[:ro]" if ro_allowed else "SOURCE:DEST"
        raise UvmshimError(f"expected {form}, got {value!r}", where=flag,
                           hint=f"e.g. {flag} /srv/data:/data:ro")
    if not parts[1].startswith("/"):
        raise UvmshimError(f"the container path must be absolute, got {parts[1]!r}", where=flag)
    return parts[0], parts[1], ro


def build_spec(opts: RunOptions) -> Spec:
    """The OCI spec for ``opts`` (host paths made absolute).

    :raises UvmshimError: a mount argument is malformed, or neither a rootfs nor layers given.
    """
    if not opts.args:
        raise UvmshimError("no command given", hint="uvmshim run [OPTIONS] -- CMD [ARGS...]")
    mounts = _default_mounts()
    for value in opts.volumes:
        src, dst, ro = _split(value, "-v")
        mounts.append({"destination": dst, "type": "bind", "source": os.path.abspath(src),
                       "options": ["rbind", "ro"] if ro else ["rbind"]})
    for value in opts.disks:
        src, dst, ro = _split(value, "--disk")
        mounts.append({"destination": dst, "type": "virtual-disk",
                       "source": os.path.abspath(src), "options": ["ro"] if ro else []})
    for value in opts.physical_disks:
        src, dst, ro = _split(value, "--physical-disk")
        mounts.append({"destination": dst, "type": "physical-disk",
                       "source": os.path.abspath(src), "options": ["ro"] if ro else []})
    for value in opts.hugepages:
        name, dst, _ = _split(value, "--hugepages", ro_allowed=False)
        mounts.append({"destination": dst, "type": "bind", "source": f"hugepages://2M/{name}",
                       "options": ["rbind"]})
    for value in opts.sandbox_mounts:
        name, dst, ro = _split(value, "--sandbox-mount")
        mounts.append({"destination": dst, "type": "bind", "source": f"sandbox:///{name}",
                       "options": ["rbind", "ro"] if ro else ["rbind"]})
    env = [f"PATH={DEFAULT_PATH}", "TERM=xterm", *opts.env]
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": opts.terminal,
            "user": {"uid": opts.user[0], "gid": opts.user[1]},
            "args": list(opts.args),
            "env": env,
            "cwd": opts.cwd,
            "capabilities": {k: list(DEFAULT_CAPS) for k in
                             ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": opts.read_only_root},
        "hostname": opts.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in
                           ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "resources": {"devices": [dict(r) for r in DEFAULT_DEVICE_RULES]},
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": default_profile(DEFAULT_CAPS),
        },
    }
    annotations = {**opts.annotations, **network_annotations(opts.network, opts.publish)}
    if annotations:
        spec["annotations"] = annotations
    if opts.layers:
        spec["windows"] = {"layerFolders": [os.path.abspath(p) for p in opts.layers]}
    elif opts.rootfs:
        spec["root"]["path"] = os.path.abspath(opts.rootfs)
    else:
        raise UvmshimError("no root filesystem given",
                           hint="pass --rootfs DIR, --layers LAYER,...,SCRATCH or --image NAME")
    return Spec.from_json(spec)
