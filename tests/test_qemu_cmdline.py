"""The QEMU argv builder (pure), the config checks, the seccomp program and the KVM probe cache."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest

from uvmshim.uvm.qemu.cmdline import build_argv, kernel_cmdline
from uvmshim.uvm.qemu.config import MachinePaths, QemuConfig
from uvmshim.uvm.qemu.kvm import KvmProbe
from uvmshim.uvm.qemu.sandbox import seccomp_program, setpriv_prefix

KERNEL = Path("/boot/uvm/vmlinux")
INITRD = Path("/boot/uvm/initrd.img")
PATHS = MachinePaths(Path("/run/uvmshim/vm/abc"))


def test_default_argv_exact() -> None:
    cfg = QemuConfig(kernel=KERNEL, initrd=INITRD)
    assert build_argv(cfg, PATHS, accel="tcg", qmp_fd=5, agent_fd=6) == [
        "qemu-system-x86_64",
        "-name", "uvmshim,debug-threads=on",
        "-machine", "q35",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "512M",
        "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", "/boot/uvm/vmlinux",
        "-initrd", "/boot/uvm/initrd.img",
        "-append", "console=ttyS0 quiet cryptomgr.notests tsc=reliable no_timer_check panic=-1",
        "-chardev", "file,id=con0,path=/run/uvmshim/vm/abc/console.log",
        "-serial", "chardev:con0",
        "-chardev", "socket,id=qmp,fd=5",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vs0,addr=0x3",
        "-chardev", "socket,id=agent,fd=6,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent,bus=vs0.0",
        "-fsdev", "local,id=fs0,path=/run/uvmshim/vm/abc/share,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,id=p9share0,fsdev=fs0,mount_tag=share0,addr=0x4",
        "-device", "virtio-scsi-pci,id=scsi0,addr=0x5",
        "-device", "virtio-scsi-pci,id=scsi1,addr=0x6",
        "-device", "virtio-scsi-pci,id=scsi2,addr=0x7",
        "-device", "virtio-scsi-pci,id=scsi3,addr=0x8",
        "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,addr=0x10",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2,addr=0x11",
        "-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=3,slot=3,addr=0x12",
        "-device", "pcie-root-port,id=rp3,bus=pcie.0,chassis=4,slot=4,addr=0x13",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]  # fmt: skip


def test_argv_variants() -> None:
    cfg = QemuConfig(
        kernel=KERNEL, initrd=INITRD, memory_mb=1024, cpus=4, scsi_controllers=1,
        hotplug_ports=2, vpmem_slots=2, vpmem_max_mb=512, kernel_args=("debug", "x=1"),
        p9_security_model="mapped-xattr", qemu_sandbox=False, extra_args=("-S",),
        qemu_binary="/opt/qemu/bin/qemu-system-x86_64",
    )  # fmt: skip
    argv = build_argv(cfg, PATHS, accel="kvm", qmp_fd=3, agent_fd=4)
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-m") + 1] == "1024M,slots=2,maxmem=1536M"
    assert argv[argv.index("-smp") + 1] == "4"
    assert argv[argv.index("-append") + 1].endswith("panic=-1 debug x=1")
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert [d for d in devices if d.startswith("virtio-scsi-pci")] == [
        "virtio-scsi-pci,id=scsi0,addr=0x5"
    ]
    assert [d.split(",")[1] for d in devices if d.startswith("pcie-root-port")] == [
        "id=rp0", "id=rp1"
    ]
    assert "security_model=mapped-xattr" in argv[argv.index("-fsdev") + 1]
    assert "-sandbox" not in argv
    assert argv[-1] == "-S"


def test_argv_has_no_network_and_no_other_host_files() -> None:
    cfg = QemuConfig(kernel=KERNEL, initrd=INITRD)
    argv = build_argv(cfg, PATHS, accel="tcg", qmp_fd=3, agent_fd=4)
    joined = " ".join(argv)
    for forbidden in ("-netdev", "-nic", "-net ", "virtio-net", "-drive", "-hda", "-cdrom"):
        assert forbidden not in joined
    # Every absolute path is a boot file or inside the state directory.
    words = [w for a in argv for w in a.replace(",", " ").replace("=", " ").split()]
    paths = [w for w in words if w.startswith("/")]
    assert paths
    for p in paths:
        assert p in (str(KERNEL), str(INITRD)) or p.startswith("/run/uvmshim/vm/abc/"), p


def test_cpu_model_override_and_cmdline() -> None:
    cfg = QemuConfig(kernel=KERNEL, initrd=INITRD, cpu_model="qemu64,+rdrand")
    argv = build_argv(cfg, PATHS, accel="tcg", qmp_fd=3, agent_fd=4)
    assert argv[argv.index("-cpu") + 1] == "qemu64,+rdrand"
    assert kernel_cmdline(cfg).split()[0] == "console=ttyS0"


@pytest.mark.parametrize(
    "kw",
    [{"scsi_controllers": 5}, {"scsi_controllers": -1}, {"memory_mb": 16}, {"cpus": 0},
     {"hotplug_ports": 17}, {"vpmem_slots": -1}, {"vpmem_slots": 1, "vpmem_max_mb": 0},
     {"vpmem_slots": 5, "hotplug_ports": 4}],
)  # fmt: skip
def test_config_rejects(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        QemuConfig(kernel=KERNEL, initrd=INITRD, **kw)  # type: ignore[arg-type]


def test_machine_paths_layout() -> None:
    assert PATHS.console_log == Path("/run/uvmshim/vm/abc/console.log")
    assert PATHS.agent_socket == Path("/run/uvmshim/vm/abc/agent.sock")
    assert PATHS.share_dir == Path("/run/uvmshim/vm/abc/share")
    assert PATHS.exports_dir == Path("/run/uvmshim/vm/abc/exports")
    assert PATHS.pid_file == Path("/run/uvmshim/vm/abc/qemu.pid")


def test_setpriv_prefix() -> None:
    assert setpriv_prefix(65534, 65534) == [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "--inh-caps=-all,+dac_override", "--ambient-caps=+dac_override",
        "--bounding-set=-all,+dac_override", "--pdeathsig=keep", "--",
    ]  # fmt: skip


def _bpf_run(prog: bytes, nr: int, args: list[int], arch: int = 0xC000003E) -> int:
    """A tiny classic-BPF interpreter for the opcodes the seccomp program uses."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(args + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            (acc,) = struct.unpack_from("=I", data, k)
        elif code == 0x06:
            return int(k)
        elif code in (0x15, 0x35, 0x45):
            cond = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += jt if cond else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


def test_seccomp_program_semantics() -> None:
    prog = seccomp_program()
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    assert _bpf_run(prog, 268, [0, 0, 0o755]) == allow  # fchmodat 0755
    assert _bpf_run(prog, 268, [0, 0, 0o4755]) == eperm  # fchmodat setuid
    assert _bpf_run(prog, 90, [0, 0o2755]) == eperm  # chmod setgid
    assert _bpf_run(prog, 91, [3, 0o644]) == allow  # fchmod
    assert _bpf_run(prog, 257, [0, 0, 0o101, 0o6755]) == eperm  # openat O_CREAT setuid
    assert _bpf_run(prog, 257, [0, 0, 0, 0]) == allow  # plain openat
    assert _bpf_run(prog, 258, [0, 0, 0o2777]) == eperm  # mkdirat setgid
    assert _bpf_run(prog, 259, [0, 0, 0o100644 | 0o4000, 0]) == eperm  # mknodat
    assert _bpf_run(prog, 437, []) == enosys  # openat2: mode not inspectable
    assert _bpf_run(prog, 0x40000000 | 90, [0, 0o4755]) == enosys  # x32 ABI
    assert _bpf_run(prog, 15, [0, 0o4755], arch=0x40000003) == enosys  # i386 ABI
    assert _bpf_run(prog, 0, [0, 0o4755]) == allow  # read(): args are not modes
    # No symlinks through a share, no open by file handle (past the mount namespace).
    assert _bpf_run(prog, 88, [0, 0]) == eperm  # symlink
    assert _bpf_run(prog, 266, [0, 0, 0]) == eperm  # symlinkat
    assert _bpf_run(prog, 304, [0, 0, 0]) == eperm  # open_by_handle_at
    for nr in (101, 310, 311, 438):  # ptrace, process_vm_readv/writev, pidfd_getfd
        assert _bpf_run(prog, nr, [0, 0, 0]) == eperm
    assert _bpf_run(prog, 265, [0, 0, 0, 0, 0]) == allow  # linkat: can't leave its bind mount
    assert _bpf_run(prog, 89, [0, 0, 0]) == allow  # readlink: existing host links keep working


# Section: KVM probe cache


def test_kvm_probe_caches_per_boot(tmp_path: Path) -> None:
    calls: list[int] = []
    boot = ["boot-1"]

    async def prober() -> bool:
        calls.append(1)
        return False

    cache = tmp_path / "kvm.json"

    async def main() -> None:
        probe = KvmProbe(cache, prober=prober, boot_id=lambda: boot[0])
        assert await probe.accel() == "tcg"
        assert await probe.accel() == "tcg"
        assert len(calls) == 1 and probe.probes == 1
        assert json.loads(cache.read_text()) == {"boot_id": "boot-1", "kvm": False}
        # A new process on the same boot reuses the file.
        probe2 = KvmProbe(cache, prober=prober, boot_id=lambda: boot[0])
        assert await probe2.accel() == "tcg" and probe2.probes == 0
        # A reboot invalidates the verdict.
        boot[0] = "boot-2"
        assert await probe2.accel() == "tcg" and probe2.probes == 1
        assert len(calls) == 2

    asyncio.run(main())


def test_kvm_probe_concurrent_callers_probe_once(tmp_path: Path) -> None:
    async def prober() -> bool:
        await asyncio.sleep(0.05)
        return True

    async def main() -> None:
        probe = KvmProbe(None, prober=prober, boot_id=lambda: "b")
        results = await asyncio.gather(*(probe.accel() for _ in range(5)))
        assert results == ["kvm"] * 5 and probe.probes == 1

    asyncio.run(main())


def test_kvm_probe_ignores_bad_cache(tmp_path: Path) -> None:
    cache = tmp_path / "kvm.json"
    cache.write_text("{not json")

    async def prober() -> bool:
        return True

    async def main() -> None:
        probe = KvmProbe(cache, prober=prober, boot_id=lambda: "b")
        assert await probe.accel() == "kvm" and probe.probes == 1
        assert json.loads(cache.read_text())["kvm"] is True

    asyncio.run(main())


def test_ready_nic_and_its_tap() -> None:
    """The ready NIC is a fixed device; its only possible peer is the tap passed in, which
    is not part of the device (so a template without one serves clones with one)."""
    cfg = QemuConfig(kernel=KERNEL, initrd=INITRD, ready_nic=True)
    bare = build_argv(cfg, PATHS, accel="tcg", qmp_fd=3, agent_fd=4)
    nic = [a for a in bare if a.startswith("virtio-net-pci")]
    assert nic == ["virtio-net-pci,id=nic-ready,addr=0x9,mac=52:54:00:75:76:ff"]
    assert "-netdev" not in bare
    tapped = build_argv(cfg, PATHS, accel="tcg", qmp_fd=3, agent_fd=4, nic_fd=7)
    assert tapped[tapped.index("-netdev") + 1] == "tap,id=net-ready,fd=7,vhost=off"
    assert f"{nic[0]},netdev=net-ready" in tapped
    with pytest.raises(ValueError, match="has none"):
        build_argv(QemuConfig(kernel=KERNEL, initrd=INITRD), PATHS, accel="tcg", qmp_fd=3,
                   agent_fd=4, nic_fd=7)
