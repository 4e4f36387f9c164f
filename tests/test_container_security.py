"""A container cannot reach the UVM's disks or the kernel's riskier calls (issue #14, point 1).

Real UVMs. Each test runs what a hostile container would: ``mknod`` a node for every block
device of the UVM and read and write through it (the issue's reproduction), ``unshare -U``,
and single syscalls made by a tiny static x86_64 program written here (no compiler needed).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from uvmsession import UvmSession, run_spec, run_to_end
from uvmshim.runtime.container import Container
from uvmshim.runtime.leaks import find_holdings
from uvmshim.runtime.pod import Pod, pause_spec
from uvmshim.runtime.specgen import RunOptions, build_spec
from uvmshim.spec import Spec

from helpers import busybox_rootfs, ext4, write_bundle

pytestmark = pytest.mark.vm

APPLETS = ["sh", "cat", "echo", "grep", "head", "mknod", "unshare", "sleep", "true", "tr",
           "ls"]

#: Docker's default capabilities: what an engine's spec grants (CAP_MKNOD among them).
ENGINE_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
               "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
               "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]

EPERM, EINVAL, ENOSYS = 1, 22, 38
SIGSYS_STATUS = 128 + signal.SIGSYS

#: For every block device the container can see in sysfs (all of the UVM's): make a node,
#: then read it (counting SECRET) and write it. One line per device.
RAW_DISKS = r"""
for d in $(cat /sys/class/block/*/dev); do
  n=/dev/raw-$(echo $d | tr : -)
  if ! mknod $n b $(echo $d | tr : ' ') 2>/dev/null; then echo "$d mknod-denied"; continue; fi
  r=$(grep -ac SECRET $n 2>&1)
  w=$( (echo CLOBBER > $n) 2>&1 && echo written)
  echo "$d mknod-ok read=[$r] write=[$w]"
done
"""


def syscall_probe(nr: int, a0: int = 0, a1: int = 0, *, i386: bool = False) -> bytes:
    """A static x86_64 ELF that makes one syscall and exits with its errno (0 on success).

    ``i386``: make it through ``int 0x80`` (the 32-bit ABI) instead of ``syscall``.
    """
    def imm(value: int) -> bytes:
        return struct.pack("<I", value & 0xFFFFFFFF)

    if i386:  # eax = nr, ebx, ecx = args; errno = -eax
        code = (b"\xb8" + imm(nr) + b"\xbb" + imm(a0) + b"\xb9" + imm(a1) + b"\xcd\x80"
                b"\x31\xff\x85\xc0\x79\x04\x89\xc7\xf7\xdf")
    else:  # rax = nr, rdi, rsi = args; errno = -rax
        code = (b"\xb8" + imm(nr) + b"\xbf" + imm(a0) + b"\xbe" + imm(a1) + b"\x0f\x05"
                b"\x31\xff\x48\x85\xc0\x79\x05\x48\x89\xc7\xf7\xdf")
    code += b"\xb8" + imm(60) + b"\x0f\x05"  # exit(edi)
    base, headers = 0x400000, 64 + 56
    size = headers + len(code)
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1,
                       base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


#: name -> (probe, errno under the default profile, errno without any filter).
PROBES: dict[str, tuple[bytes, int, int]] = {
    "getpid": (syscall_probe(39), 0, 0),
    # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING): fine for any process, but the
    # keyrings are not namespaced.
    "keyctl": (syscall_probe(250, 0, -3), EPERM, 0),
    "unshare-user": (syscall_probe(272, 0x10000000), EPERM, 0),  # unshare(CLONE_NEWUSER)
    "clone3": (syscall_probe(435), ENOSYS, EINVAL),  # clone3(NULL, 0)
    "personality-no-aslr": (syscall_probe(135, 0x0040000), EPERM, 0),
    "fchmodat2": (syscall_probe(452), ENOSYS, ENOSYS),  # not in the 6.1 kernel either way
}


def make_rootfs(path: Path) -> str:
    busybox_rootfs(path, dirs=("bin", "proc", "sys", "dev", "etc", "tmp"), applets=APPLETS,
                   files={})
    for name, (code, _, _) in PROBES.items():
        (path / "bin" / f"probe-{name}").write_bytes(code)
        (path / "bin" / f"probe-{name}").chmod(0o755)
    (path / "bin" / "probe-i386-getpid").write_bytes(syscall_probe(20, i386=True))
    (path / "bin" / "probe-i386-getpid").chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rootfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture
def secret(tmp_path: Path) -> str:
    img = ext4(tmp_path, "secret", {"f.txt": "SECRET\n"})
    assert not clobbered(img)
    return img


@pytest.fixture(autouse=True)
def nothing_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "session" in request.fixturenames:
        session: UvmSession = request.getfixturevalue("session")
        assert session.uvm.vm.inventory() == {"scsi": [], "plan9": [], "vpmem": [], "vpci": []}


def clobbered(image: str) -> bool:
    """Whether RAW_DISKS's write reached ``image`` (its first 1 KiB, which ext4 leaves alone:
    the rest changes when the disk is merely mounted read-write)."""
    return Path(image).read_bytes()[:1024] != bytes(1024)


def sh_spec(rootfs: str, script: str, **kw: Any) -> Spec:
    return build_spec(RunOptions(args=["sh", "-c", script], rootfs=rootfs, **kw))


def engine_spec(spec: Spec, device_rules: list[dict[str, Any]] | None,
                devices: list[dict[str, Any]] | None = None) -> Spec:
    """``spec`` as an engine might send it: CAP_MKNOD, no seccomp, its own device rules."""
    obj = spec.to_json()
    obj["process"]["capabilities"] = {k: list(ENGINE_CAPS)
                                      for k in ("bounding", "effective", "permitted")}
    obj["linux"].pop("seccomp", None)
    if device_rules is None:
        obj["linux"].pop("resources", None)
    else:
        obj["linux"]["resources"] = {"devices": device_rules}
    if devices is not None:
        obj["linux"]["devices"] = devices
    return Spec.from_json(obj)


def raw_results(out: str) -> dict[str, str]:
    """``major:minor`` -> what RAW_DISKS reported for it."""
    lines = [line.split(" ", 1) for line in out.splitlines() if " mknod-" in line]
    return {dev: rest for dev, rest in lines}


def assert_mknod_denied(out: str, devices: set[str]) -> None:
    results = raw_results(out)
    assert devices and devices <= set(results), (devices, out)
    assert all(r == "mknod-denied" for r in results.values()), out


def assert_raw_io_denied(out: str, devices: set[str]) -> None:
    """Each device could be made (CAP_MKNOD) but neither read nor written."""
    results = raw_results(out)
    assert devices and devices <= set(results), (devices, out)
    for dev, result in results.items():
        assert result.startswith("mknod-ok "), (dev, result)
        read, write = result.split(" write=")
        assert "Operation not permitted" in read and "SECRET" not in read, (dev, result)
        assert "Operation not permitted" in write and "written" not in write, (dev, result)


async def uvm_disks(session: UvmSession, content: str) -> set[str]:
    """``major:minor`` of the UVM's block devices holding ``content`` (from the event loop)."""
    script = (f"for b in /sys/class/block/*; do grep -qa {content} /dev/$(basename $b) && "
              "cat $b/dev; done; true")
    res = await session.uvm.agent.exec(["sh", "-c", script])
    assert res.exit_code == 0, res.stderr
    return set(res.stdout.decode().split())


# --- a plain container (uvmshim run) -----------------------------------------------------


def test_default_spec_is_confined(session: UvmSession, rootfs: str) -> None:
    code, out, err = run_spec(session, "s-status", sh_spec(
        rootfs, "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
                "cat /proc/self/cgroup; head -c 16 /proc/kcore | grep -c . ; true"))
    assert code == 0, err
    status = dict(line.split(":\t") for line in out.splitlines()[:3])
    caps = int(status["CapBnd"], 16)
    for cap in (27, 21, 13, 29):  # CAP_MKNOD, CAP_SYS_ADMIN, CAP_NET_RAW, CAP_AUDIT_WRITE
        assert not caps & (1 << cap), cap
    assert caps & (1 << 0) and caps & (1 << 18)  # CAP_CHOWN, CAP_SYS_CHROOT
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"  # a seccomp filter
    assert out.splitlines()[3:] == ["0::/", "0"]  # own cgroup namespace; /proc/kcore masked


def test_plain_container_cannot_open_uvm_disks(session: UvmSession, rootfs: str,
                                               secret: str) -> None:
    code, out, err = run_spec(session, "s-plain", sh_spec(
        rootfs, "cat /data/f.txt;" + RAW_DISKS, disks=[f"{secret}:/data"]))
    assert code == 0, err
    assert out.startswith("SECRET\n")  # the disk given as a mount works
    assert_mknod_denied(out, {"8:0"})
    assert not clobbered(secret)


@pytest.mark.parametrize("rules", [
    None,  # no device rules at all
    [{"allow": True, "access": "rwm"}],  # a privileged container's
    [{"allow": False, "access": "rwm"}, {"allow": True, "type": "b", "access": "rwm"}],
], ids=["no-rules", "allow-all", "allow-block"])
def test_engine_spec_with_cap_mknod_cannot_open_uvm_disks(
        session: UvmSession, rootfs: str, secret: str, rules: list[dict[str, Any]] | None
) -> None:
    spec = engine_spec(sh_spec(rootfs, "cat /data/f.txt;" + RAW_DISKS,
                               disks=[f"{secret}:/data"]), rules)
    code, out, err = run_spec(session, "s-engine", spec)
    assert code == 0, err
    assert out.startswith("SECRET\n")
    assert_raw_io_denied(out, {"8:0"})
    assert not clobbered(secret)


def test_exec_in_engine_container_cannot_open_uvm_disks(session: UvmSession, rootfs: str,
                                                       secret: str) -> None:
    """A process exec'd into the container later is in the same device cgroup."""
    spec = engine_spec(sh_spec(rootfs, "exec sleep 600", disks=[f"{secret}:/data"]),
                       [{"allow": True, "access": "rwm"}])
    c = Container(session.uvm.vm, session.uvm.agent, "s-exec", spec)

    async def go() -> tuple[int, str]:
        await c.create()
        try:
            await c.start()
            proc = await c.exec({"args": ["sh", "-c", "cat /data/f.txt;" + RAW_DISKS],
                                 "cwd": "/", "env": ["PATH=/bin"],
                                 "capabilities": {k: list(ENGINE_CAPS) for k in
                                                  ("bounding", "effective", "permitted")}})
            out = bytearray()
            async for _, data in proc.output():
                out.extend(data)
            return await proc.wait(), out.decode()
        finally:
            await c.delete()

    code, out = session.run(go())
    assert code == 0, out
    assert out.startswith("SECRET\n")
    assert_raw_io_denied(out, {"8:0"})
    assert not clobbered(secret)


# --- seccomp -----------------------------------------------------------------------------


def _probe_script() -> str:
    runs = [f"/bin/probe-{name}; echo {name}=$?" for name in PROBES]
    return "; ".join([*runs, "/bin/probe-i386-getpid; echo i386=$?",
                      "unshare -U true && echo unshare-ok || echo unshare-failed"])


def _probe_results(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_default_profile_blocks_syscalls(session: UvmSession, rootfs: str) -> None:
    code, out, err = run_spec(session, "s-seccomp", sh_spec(rootfs, _probe_script()))
    assert code == 0, err
    got = _probe_results(out)
    assert {k: int(v) for k, v in got.items() if k in PROBES} == \
        {name: errno for name, (_, errno, _) in PROBES.items()}
    assert got["i386"] == str(SIGSYS_STATUS)  # 32-bit syscalls: not in the filter, killed
    assert "unshare-failed" in out
    assert "unshare(0x10000000): Operation not permitted" in err


def test_same_calls_succeed_without_the_profile(session: UvmSession, rootfs: str) -> None:
    """The control: what the profile blocks works in the same UVM without it."""
    spec = engine_spec(sh_spec(rootfs, _probe_script()), None)
    code, out, err = run_spec(session, "s-noseccomp", spec)
    assert code == 0, err
    got = _probe_results(out)
    assert {k: int(v) for k, v in got.items() if k in PROBES} == \
        {name: errno for name, (_, _, errno) in PROBES.items()}
    assert got["i386"] == "0" and "unshare-ok" in out


# --- pods: another container's disk ------------------------------------------------------


def test_pod_container_cannot_read_another_containers_disk(
        session: UvmSession, rootfs: str, secret: str, tmp_path: Path) -> None:
    other = ext4(tmp_path, "other", {"f.txt": "OTHER\n"})
    pod = Pod(session.uvm, "secpod")

    async def go() -> tuple[str, str, dict[str, tuple[int, str, str]]]:
        await pod.start_sandbox(pause_spec(rootfs))
        try:
            holder = await pod.add_container("holder", sh_spec(
                rootfs, "cat /data/f.txt; exec sleep 600", disks=[f"{secret}:/data"]))
            await holder.start()
            await pod.add_container("spare", sh_spec(rootfs, "true", disks=[f"{other}:/o"]))
            secret_dev, = await uvm_disks(session, "SECRET")
            other_dev, = await uvm_disks(session, "OTHER")
            major, minor = (int(n) for n in other_dev.split(":"))
            results = {}
            plain = await pod.add_container("plain", sh_spec(rootfs, RAW_DISKS))
            results["plain"] = await run_to_end(plain)
            engine = await pod.add_container("engine", engine_spec(
                sh_spec(rootfs, RAW_DISKS), [{"allow": True, "access": "rwm"}]))
            results["engine"] = await run_to_end(engine)
            # An engine that gives a container one disk as a device, read-only.
            given = await pod.add_container("given", engine_spec(
                sh_spec(rootfs, "grep -c OTHER /dev/given; (echo x > /dev/given) 2>&1;"
                        + RAW_DISKS),
                [{"allow": False, "access": "rwm"},
                 {"allow": True, "type": "b", "major": major, "minor": minor, "access": "r"}],
                devices=[{"path": "/dev/given", "type": "b", "major": major, "minor": minor,
                          "fileMode": 0o600, "uid": 0, "gid": 0}]))
            results["given"] = await run_to_end(given)
            return secret_dev, other_dev, results
        finally:
            await pod.stop()

    secret_dev, other_dev, results = session.run(go())
    code, out, err = results["plain"]
    assert code == 0, err
    assert_mknod_denied(out, {secret_dev, other_dev})
    code, out, err = results["engine"]
    assert code == 0, err
    assert_raw_io_denied(out, {secret_dev, other_dev})
    code, out, err = results["given"]
    assert code == 0, err
    assert out.splitlines()[0] == "1"  # the given device reads...
    assert "Operation not permitted" in out.splitlines()[1]  # ...but only reads, as granted
    raw = raw_results(out)
    # A second node for the given device, by number: reads (it has no SECRET), cannot write.
    assert raw[other_dev].startswith("mknod-ok read=[0] write=[")
    assert "Operation not permitted" in raw[other_dev].split(" write=")[1]
    assert_raw_io_denied("\n".join(f"{d} {r}" for d, r in raw.items() if d != other_dev),
                         {secret_dev})
    assert not clobbered(secret)


# --- the CLI: an engine's bundle, and the pod reproduction -----------------------


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "UVMSHIM_VM_DIR": str(tmp_path / "vms"),
            "UVMSHIM_POD_DIR": str(tmp_path / "pods")}


def test_run_bundle_with_cap_mknod_cannot_open_raw_disk(rootfs: str, secret: str,
                                                        tmp_path: Path) -> None:
    obj = engine_spec(sh_spec(rootfs, "cat /data/f.txt;" + RAW_DISKS, disks=[f"{secret}:/data"]),
                      [{"allow": True, "access": "rwm"}]).to_json()
    bundle = write_bundle(tmp_path / "bundle", obj)
    res = subprocess.run(["uvmshim", "run", "--bundle", str(bundle)], capture_output=True,
                         text=True, timeout=300, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("SECRET\n")
    assert_raw_io_denied(res.stdout, {"8:0"})
    assert not clobbered(secret)
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []


def test_pod_cli_reproduction(rootfs: str, secret: str, tmp_path: Path) -> None:
    """The issue's reproduction: a pod container mknods the disk of another one and greps it."""
    env = _env(tmp_path)

    def uvmshim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["uvmshim", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    created = uvmshim("pod", "create", "p", "--rootfs", rootfs)
    holder = None
    try:
        assert created.returncode == 0, created.stderr
        holder = subprocess.Popen(
            ["uvmshim", "pod", "run", "p", "--disk", f"{secret}:/data", "--", "sh", "-c",
             "cat /data/f.txt; exec sleep 120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert holder.stdout is not None
        assert holder.stdout.readline() == "SECRET\n"  # its disk is attached and mounted
        res = uvmshim("pod", "run", "p", "--", "sh", "-c",
                      "mknod /dev/sda b 8 0; grep -ac SECRET /dev/sda; echo done")
        assert res.stdout == "done\n", res.stdout
        assert "mknod: /dev/sda: Operation not permitted" in res.stderr
    finally:
        stopped = uvmshim("pod", "stop", "p")
        if holder is not None:
            try:
                holder.wait(60)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
    assert stopped.returncode == 0, stopped.stderr
    assert not clobbered(secret)
    deadline = time.monotonic() + 30
    while find_holdings(tmp_path / "vms").qemu_pids and time.monotonic() < deadline:
        time.sleep(0.5)
    held = find_holdings(tmp_path / "vms")
    assert held.vms == [] and held.qemu_pids == []
