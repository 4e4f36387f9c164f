"""Container defaults (issue #14): the seccomp profile, the generated spec, the guest's rules.

The profile and the device rules are checked by what they *decide*, through small evaluators
of the OCI semantics crun implements: seccomp rules for one syscall are OR-ed and a rule's
argument conditions AND-ed, anything unmatched gets the default action; device rules are
looked at last-to-first after crun's own defaults, and the first that matches decides.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from uvmshim.agent.confine import deny_uvm_block_devices, given_block_devices
from uvmshim.runtime import seccomp
from uvmshim.runtime.seccomp import default_profile
from uvmshim.runtime.specgen import DEFAULT_CAPS, RunOptions, build_spec

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
SIGCHLD = 17
#: What glibc's pthread_create passes to clone (no namespace flag).
THREAD_FLAGS = 0x003D0F00
AF_INET, AF_NETLINK, AF_ALG, AF_VSOCK, AF_XDP = 2, 16, 38, 40, 44

ALLOW = "allow"
Decision = str | int  # ALLOW or an errno


def _arg_ok(cond: dict[str, Any], args: tuple[int, ...]) -> bool:
    value = args[cond["index"]] if cond["index"] < len(args) else 0
    op = cond["op"]
    if op == "SCMP_CMP_EQ":
        return bool(value == cond["value"])
    if op == "SCMP_CMP_NE":
        return bool(value != cond["value"])
    if op == "SCMP_CMP_LT":
        return bool(value < cond["value"])
    if op == "SCMP_CMP_GT":
        return bool(value > cond["value"])
    if op == "SCMP_CMP_MASKED_EQ":
        return bool(value & cond["value"] == cond["valueTwo"])
    raise AssertionError(f"operator the evaluator does not know: {op}")


def decide(profile: dict[str, Any], name: str, *args: int) -> Decision:
    """What a native x86_64 call of ``name(args)`` gets under ``profile``."""
    matched: set[Decision] = set()
    for rule in profile["syscalls"]:
        if name in rule["names"] and all(_arg_ok(c, args) for c in rule.get("args") or []):
            matched.add(ALLOW if rule["action"] == "SCMP_ACT_ALLOW"
                        else rule.get("errnoRet", seccomp.EPERM))
    assert len(matched) <= 1, f"{name}{args}: conflicting rules {matched}"
    if matched:
        return matched.pop()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    return int(profile["defaultErrnoRet"])


# --- the syscall table and its classification -------------------------------------------


def test_table_is_linux_6_1_x86_64() -> None:
    table = seccomp.SYSCALLS_X86_64
    assert len(table) == 362 and len(set(table.values())) == 362
    assert table["read"] == 0 and table["keyctl"] == 250 and table["clone3"] == 435
    assert max(table.values()) == 450  # set_mempolicy_home_node, the last call of Linux 6.1
    assert set(seccomp.NEWER_THAN_GUEST_KERNEL.values()) == {451, 452, 453}


@pytest.mark.skipif(not UNISTD_64.exists(), reason="no linux-libc-dev headers on this host")
def test_table_matches_the_kernel_headers() -> None:
    header = {name: int(nr) for name, nr in
              re.findall(r"#define __NR_(\w+)\s+(\d+)", UNISTD_64.read_text())}
    for name, nr in seccomp.SYSCALLS_X86_64.items():
        assert header.get(name) == nr, name
    newer = {n: nr for n, nr in header.items() if n not in seccomp.SYSCALLS_X86_64}
    assert all(nr > 450 for nr in newer.values()), newer  # only calls newer than Linux 6.1
    for name, nr in seccomp.NEWER_THAN_GUEST_KERNEL.items():
        assert header.get(name, nr) == nr


def test_every_syscall_is_classified_exactly_once() -> None:
    by_cap = set().union(*seccomp.BY_CAPABILITY.values())
    classes = [seccomp.ALLOWED, seccomp.ARG_RULED, frozenset(seccomp.DENIED), by_cap]
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            assert not a & b, sorted(a & b)
    assert set().union(*classes) == set(seccomp.SYSCALLS_X86_64)


def _libseccomp() -> Any:
    path = ctypes.util.find_library("seccomp")
    if path is None:
        pytest.skip("libseccomp is not installed on this host")
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    return lib


def test_libseccomp_knows_every_name() -> None:
    """crun skips (and warns on the container's stderr about) a name libseccomp cannot resolve."""
    lib = _libseccomp()
    profile = default_profile(["CAP_SYS_ADMIN", *seccomp.BY_CAPABILITY])
    names = {n for rule in profile["syscalls"] for n in rule["names"]}
    known = {**seccomp.SYSCALLS_X86_64, **seccomp.NEWER_THAN_GUEST_KERNEL}
    assert names <= set(known)
    for name in names:
        assert lib.seccomp_syscall_resolve_name(name.encode()) == known[name], name


# --- what the default profile decides ----------------------------------------------------


@pytest.fixture(scope="module")
def default() -> dict[str, Any]:
    return default_profile(DEFAULT_CAPS)


def test_profile_frame(default: dict[str, Any]) -> None:
    assert default["defaultAction"] == "SCMP_ACT_ERRNO"
    assert default["defaultErrnoRet"] == seccomp.EPERM
    assert default["architectures"] == ["SCMP_ARCH_X86_64"]
    assert default_profile(reversed(DEFAULT_CAPS)) == default  # deterministic


@pytest.mark.parametrize("name", [
    "read", "write", "openat", "mmap", "execve", "fork", "vfork", "wait4", "futex", "socketpair",
    "mknod", "chroot", "ptrace", "kcmp", "process_vm_readv", "setuid", "capset", "prctl",
    "seccomp", "getrandom", "statx", "rseq", "pidfd_open", "close_range", "openat2",
    "epoll_pwait2", "landlock_create_ruleset", "io_setup", "memfd_create", "name_to_handle_at",
])
def test_ordinary_calls_are_allowed(default: dict[str, Any], name: str) -> None:
    assert decide(default, name) == ALLOW


@pytest.mark.parametrize("name", [
    "add_key", "keyctl", "request_key", "bpf", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "mount", "umount2", "pivot_root", "move_mount", "fsopen",
    "fsmount", "fsconfig", "fspick", "open_tree", "mount_setattr", "unshare", "setns",
    "open_by_handle_at", "perf_event_open", "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "userfaultfd",
    "iopl", "ioperm", "io_uring_setup", "io_uring_enter", "io_uring_register", "sethostname",
    "quotactl", "lookup_dcookie", "vhangup", "uselib", "_sysctl", "modify_ldt", "mbind",
    "move_pages", "pidfd_getfd", "fanotify_init", "memfd_secret",
])
def test_dangerous_calls_are_denied(default: dict[str, Any], name: str) -> None:
    assert decide(default, name) == seccomp.EPERM


def test_clone_without_namespace_flags_only(default: dict[str, Any]) -> None:
    assert decide(default, "clone", SIGCHLD) == ALLOW  # fork()
    assert decide(default, "clone", THREAD_FLAGS) == ALLOW  # pthread_create()
    for flag in (CLONE_NEWUSER, CLONE_NEWNS, 0x02000000, 0x04000000, 0x08000000, 0x20000000,
                 0x40000000):
        assert decide(default, "clone", flag | SIGCHLD) == seccomp.EPERM, hex(flag)
    assert decide(default, "clone3") == seccomp.ENOSYS  # libc falls back to clone


def test_personality_safe_values_only(default: dict[str, Any]) -> None:
    for persona in (0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF):
        assert decide(default, "personality", persona) == ALLOW
    for persona in (0x0040000, 0x0400000, 0x0200000):  # no ASLR, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO
        assert decide(default, "personality", persona) == seccomp.EPERM


def test_socket_families(default: dict[str, Any]) -> None:
    for family in (AF_INET, AF_NETLINK, 10, 17, 39, AF_XDP):
        assert decide(default, "socket", family) == ALLOW, family
    assert decide(default, "socket", AF_ALG) == seccomp.EPERM
    assert decide(default, "socket", AF_VSOCK) == seccomp.EPERM


def test_calls_the_guest_kernel_lacks_get_enosys(default: dict[str, Any]) -> None:
    for name in ("cachestat", "fchmodat2", "map_shadow_stack"):
        assert decide(default, name) == seccomp.ENOSYS


@pytest.mark.parametrize(("cap", "names"), [
    ("CAP_SYS_ADMIN", ["mount", "umount2", "unshare", "setns", "pivot_root", "fsopen", "bpf"]),
    ("CAP_SYS_TIME", ["settimeofday", "clock_settime", "adjtimex"]),
    ("CAP_SYS_MODULE", ["init_module", "finit_module", "delete_module"]),
    ("CAP_SYS_BOOT", ["reboot"]),
    ("CAP_SYS_PTRACE", ["pidfd_getfd", "process_madvise"]),
    ("CAP_DAC_READ_SEARCH", ["open_by_handle_at"]),
    ("CAP_SYS_RAWIO", ["iopl", "ioperm"]),
])
def test_capabilities_widen_the_profile(default: dict[str, Any], cap: str,
                                        names: list[str]) -> None:
    granted = default_profile([*DEFAULT_CAPS, cap])
    for name in names:
        assert decide(default, name) == seccomp.EPERM
        assert decide(granted, name) == ALLOW
    for name in ("keyctl", "kexec_load", "userfaultfd", "io_uring_setup", "swapon"):
        assert decide(granted, name) == seccomp.EPERM  # never, whatever the capability


def test_sys_admin_allows_namespaces_in_clone() -> None:
    admin = default_profile(["CAP_SYS_ADMIN"])
    assert decide(admin, "clone", CLONE_NEWUSER | SIGCHLD) == ALLOW
    assert decide(admin, "clone3") == ALLOW


def test_chroot_follows_cap_sys_chroot() -> None:
    assert decide(default_profile(DEFAULT_CAPS), "chroot") == ALLOW
    assert decide(default_profile([]), "chroot") == seccomp.EPERM


# --- the spec of uvmshim run / pod run ---------------------------------------------------


@pytest.fixture(scope="module")
def spec_json() -> dict[str, Any]:
    return build_spec(RunOptions(args=["true"], rootfs="/r")).to_json()


def test_podman_capabilities(spec_json: dict[str, Any]) -> None:
    caps = spec_json["process"]["capabilities"]
    podman = {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
              "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
              "CAP_SYS_CHROOT"}
    for kind in ("bounding", "effective", "permitted"):
        assert set(caps[kind]) == podman
    assert not {"inheritable", "ambient"} & set(caps)
    assert spec_json["process"]["noNewPrivileges"] is True


def test_seccomp_matches_the_capabilities(spec_json: dict[str, Any]) -> None:
    caps = spec_json["process"]["capabilities"]["bounding"]
    assert spec_json["linux"]["seccomp"] == default_profile(caps)


def _crun_device_decision(rules: Iterable[dict[str, Any]], kind: str, major: int, minor: int,
                          access: str) -> bool:
    """Whether crun 1.8.1's cgroup v2 device program allows ``access`` to ``kind major:minor``.

    Its program checks crun's built-in devices first (mknod of any device; null, zero, full,
    random, urandom, tty, console, ptmx, pts), then the spec's rules last-to-first; the first
    match decides; nothing matching denies.
    """
    builtin = [("c", -1, -1, "m"), ("b", -1, -1, "m"), ("c", 1, 3, "rwm"), ("c", 1, 8, "rwm"),
               ("c", 1, 7, "rwm"), ("c", 5, 0, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 9, "rwm"),
               ("c", 5, 1, "rwm"), ("c", 136, -1, "rwm"), ("c", 5, 2, "rwm")]
    program = [{"allow": True, "type": t, "major": ma, "minor": mi, "access": acc}
               for t, ma, mi, acc in builtin] + list(reversed(list(rules)))
    for rule in program:
        rtype = rule.get("type") or "a"
        rmajor = -1 if rule.get("major") is None else rule["major"]
        rminor = -1 if rule.get("minor") is None else rule["minor"]
        if rtype not in ("a", kind):
            continue
        if not set(access) <= set(rule.get("access") or ""):
            continue
        if (rmajor >= 0 and rmajor != major) or (rminor >= 0 and rminor != minor):
            continue
        return bool(rule.get("allow"))
    return False


def test_default_device_rules(spec_json: dict[str, Any]) -> None:
    rules = spec_json["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    allowed = {(r["type"], r["major"], r.get("minor")) for r in rules[1:] if r["allow"]}
    assert allowed == {("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                       ("c", 5, 0), ("c", 5, 2), ("c", 136, None)}
    for dev in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, 4)]:
        assert _crun_device_decision(rules, "c", *dev, "rw")
    for kind, dev in [("c", (1, 1)), ("c", (10, 200)), ("c", (4, 1)), ("b", (8, 0)),
                      ("b", (259, 0))]:
        assert not _crun_device_decision(rules, kind, *dev, "r"), (kind, dev)


def test_masked_readonly_paths_and_namespaces(spec_json: dict[str, Any]) -> None:
    linux = spec_json["linux"]
    for path in ("/proc/kcore", "/proc/keys", "/proc/acpi", "/proc/scsi", "/sys/firmware",
                 "/proc/timer_list", "/proc/sched_debug", "/sys/devices/virtual/powercap"):
        assert path in linux["maskedPaths"]
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq"):
        assert path in linux["readonlyPaths"]
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "network", "ipc", "uts", "mount",
                                                         "cgroup"]


def test_each_spec_gets_its_own_rules() -> None:
    a = build_spec(RunOptions(args=["true"], rootfs="/r")).to_json()
    a["linux"]["resources"]["devices"][0]["allow"] = True
    a["linux"]["seccomp"]["syscalls"][0]["names"].append("keyctl")
    b = build_spec(RunOptions(args=["true"], rootfs="/r")).to_json()
    assert b["linux"]["resources"]["devices"][0]["allow"] is False
    assert "keyctl" not in b["linux"]["seccomp"]["syscalls"][0]["names"]


# --- the guest's block device rules (agent/confine.py) -----------------------------------

UVM_DISKS = [(8, 0), (8, 16), (8, 32), (259, 0)]


def _confined(linux: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    if linux is not None:
        spec["linux"] = linux
    before = copy.deepcopy(spec)
    out = deny_uvm_block_devices(spec)
    assert spec == before, "the input spec was changed"
    return out


def _rules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = spec["linux"]["resources"]["devices"]
    return rules


@pytest.mark.parametrize("linux", [
    None,  # no linux section at all
    {},  # no device rules: crun would install no device program
    {"resources": {"memory": {"limit": 1 << 30}}},
    {"resources": {"devices": [{"allow": True, "access": "rwm"}]}},  # privileged
    {"resources": {"devices": [{"allow": True, "type": "b", "access": "rwm"}]}},
    {"resources": {"devices": [{"allow": False, "access": "rwm"},
                               {"allow": True, "type": "b", "major": 8, "access": "rwm"}]}},
])
def test_uvm_disks_are_denied_whatever_the_spec(linux: dict[str, Any] | None) -> None:
    rules = _rules(_confined(linux))
    for dev in UVM_DISKS:
        for access in ("r", "w", "rw"):
            assert not _crun_device_decision(rules, "b", *dev, access), (dev, access)
        assert _crun_device_decision(rules, "b", *dev, "m")  # crun's built-in rule: mknod only


def test_character_devices_keep_what_the_spec_says() -> None:
    unruled = _rules(_confined({}))
    assert _crun_device_decision(unruled, "c", 10, 229, "rw")  # /dev/fuse: as without rules
    podman = [{"allow": False, "access": "rwm"},
              {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"}]
    confined = _rules(_confined({"resources": {"devices": podman}}))
    assert confined[:2] == podman
    assert _crun_device_decision(confined, "c", 10, 229, "rw")
    assert not _crun_device_decision(confined, "c", 10, 200, "r")
    memory = _confined({"resources": {"memory": {"limit": 5}}})["linux"]["resources"]
    assert memory["memory"] == {"limit": 5}


def _given(major: int, minor: int) -> dict[str, Any]:
    return {"path": "/dev/given", "type": "b", "major": major, "minor": minor}


def test_given_block_device_keeps_the_specs_access() -> None:
    # No rules: the given device stays fully usable, the others are denied.
    rules = _rules(_confined({"devices": [_given(8, 16)]}))
    assert _crun_device_decision(rules, "b", 8, 16, "rw")
    assert not _crun_device_decision(rules, "b", 8, 0, "r")
    # podman --device /dev/sdb:/dev/given:r — read only, as the engine said.
    rules = _rules(_confined({"devices": [_given(8, 16)], "resources": {"devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": 8, "minor": 16, "access": "r"}]}}))
    assert _crun_device_decision(rules, "b", 8, 16, "r")
    assert not _crun_device_decision(rules, "b", 8, 16, "w")
    assert not _crun_device_decision(rules, "b", 8, 32, "r")
    # Given, but the spec's rules deny it: still denied (the guest only ever narrows).
    rules = _rules(_confined({"devices": [_given(8, 16)],
                              "resources": {"devices": [{"allow": False, "access": "rwm"}]}}))
    assert not _crun_device_decision(rules, "b", 8, 16, "r")


def test_given_block_devices_parsing() -> None:
    spec = {"linux": {"devices": [
        _given(8, 0), _given(8, 0), {"type": "c", "major": 1, "minor": 3},
        {"type": "b", "major": True, "minor": 1}, {"type": "b", "major": 8}, "junk",
        _given(259, 1)]}}
    assert given_block_devices(spec) == [(8, 0), (259, 1)]
    assert given_block_devices({"linux": "junk"}) == []
