"""Boot the product's utility VM and talk to its agent (``-m vm``).

Every test boots the real kernel and initrd through :class:`QemuMachine`, so QEMU runs with the
production command line (TCG wherever the KVM probe fails); only the state directory is private
to the test. Disks, shares and vPMEM devices are hot-added by the QMP host backend, as the
device managers do, and the guest is driven through the agent client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from uvmshim.errors import BackendError, GuestError
from uvmshim.protocol import CRUN_ROOT, ErrorKind
from uvmshim.uvm.backend import LayerRef
from uvmshim.uvm.bootfiles import BootFiles, ensure_boot_files
from uvmshim.uvm.qemu import QemuConfig, QemuHostBackend, QemuMachine, list_leftovers
from uvmshim.uvm.qemu.agent_client import AgentClient
from uvmshim.uvm.qemu.guest import AgentGuestBackend

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]


@pytest.fixture(scope="module")
def boot_files() -> BootFiles:
    return asyncio.run(ensure_boot_files())


@contextlib.asynccontextmanager
async def booted(boot: BootFiles, tmp_path: Path, **config: Any) -> AsyncIterator[QemuMachine]:
    """A launched :class:`QemuMachine` with the default config plus ``config``; afterwards
    nothing of it (process, mounts, state directory) may remain."""
    base = tmp_path / "vm"
    cfg = QemuConfig(kernel=boot.kernel, initrd=boot.initrd, base_dir=base, **config)
    async with QemuMachine(cfg) as vm:
        yield vm
    assert vm.returncode is not None
    assert list_leftovers(base) == []


def console(vm: QemuMachine) -> str:
    """The guest serial console so far."""
    try:
        return vm.console_log.read_text(errors="replace")
    except OSError:
        return ""


async def exits(vm: QemuMachine, timeout: float = 30) -> bool:
    """True once QEMU has exited (the guest powered off), False after ``timeout`` seconds."""
    try:
        await asyncio.wait_for(vm.wait(), timeout)
    except TimeoutError:
        return False
    return True


def test_boot_ping_exec_shutdown(boot_files: BootFiles, tmp_path: Path) -> None:
    async def main() -> None:
        async with booted(boot_files, tmp_path) as vm:
            t0 = time.monotonic()
            try:
                client = await AgentClient.connect(vm.agent_socket_path, timeout=60)
            except BackendError:
                pytest.fail(f"agent did not answer; console:\n{console(vm)}")
            ready = time.monotonic() - t0
            print(f"agent ready after {ready:.2f} s; guest info {client.guest_info}")
            backend = AgentGuestBackend(client)
            try:
                pong = await client.ping()
                assert pong["uptime"] > 0

                mounts = await backend.exec(["cat", "/proc/mounts"])
                assert mounts.exit_code == 0
                text = mounts.stdout.decode()
                for fs in ("proc", "sysfs", "devtmpfs", "cgroup2", "tmpfs"):
                    assert f" {fs} " in text, text

                py = await backend.exec(["python3", "-I", "-c", "import json,sys; "
                                         "print(json.dumps(sys.version_info[:2]))"])
                assert (py.exit_code, py.stdout.strip()) == (0, b"[3, 11]"), py

                crun = await backend.exec(["crun", "--version"])
                assert crun.exit_code == 0, crun
                assert b"crun version" in crun.stdout

                err = await backend.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
                assert (err.exit_code, err.stdout, err.stderr) == (3, b"out\n", b"err\n")

                # Concurrency: a slow command does not hold up a quick one.
                slow = asyncio.ensure_future(backend.exec(["sleep", "2"]))
                t = time.monotonic()
                await client.ping()
                assert time.monotonic() - t < 1.5
                assert (await slow).exit_code == 0

                with pytest.raises(BackendError, match="guest add_vpci: .*not supported"):
                    await backend.add_vpci("guid")

                sandbox = await backend.sandbox_dir("sb1", "data/../x")
                assert sandbox == "/run/gcs/c/sb1/sandboxMounts/x"
                with pytest.raises(BackendError, match="outside"):
                    await backend.sandbox_dir("sb1", "../../etc")

                # The host may drop the connection and come back (the guest sees EOF, then
                # data again); ids from the old connection do not leak into the new one.
                await client.close()
                client = await AgentClient.connect(vm.agent_socket_path, timeout=20)
                backend = AgentGuestBackend(client)
                assert (await backend.exec(["echo", "again"])).stdout == b"again\n"

                await backend.shutdown()
                assert await exits(vm), "QEMU did not exit after shutdown"
            finally:
                await client.close()

    asyncio.run(main())


def _mkfs_ext4(path: Path, size: str, tree: Path | None = None) -> None:
    argv = ["mkfs.ext4", "-q", "-F", *(["-d", str(tree)] if tree else []), str(path), size]
    subprocess.run(argv, check=True, capture_output=True)


def _busybox_image(image: Path, lower: Path) -> None:
    """An ext4 image holding a busybox rootfs and /etc/marker."""
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/marker").write_text("from-lower\n")
    (lower / "bin").mkdir()
    shutil.copy(shutil.which("busybox") or "/bin/busybox", lower / "bin/busybox")
    for applet in ("sh", "cat", "echo", "sleep"):
        (lower / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "sys", "tmp"):
        (lower / d).mkdir()
    _mkfs_ext4(image, "16M", lower)


needs_images = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("busybox") is None,
    reason="needs e2fsprogs and busybox-static")


@needs_images
def test_storage_requests_and_crun(boot_files: BootFiles, tmp_path: Path) -> None:
    """SCSI disks (two controllers), overlay, crun on the overlay, 9p share, hugepages."""
    _busybox_image(tmp_path / "lower.ext4", tmp_path / "lowertree")
    _mkfs_ext4(tmp_path / "scratch.ext4", "32M")
    _mkfs_ext4(tmp_path / "other.ext4", "8M")
    shared = tmp_path / "export"
    shared.mkdir()
    (shared / "hello.txt").write_text("hi from the host\n")

    async def main() -> None:
        async with booted(boot_files, tmp_path) as vm:
            host = QemuHostBackend(vm)
            for c, lun, f, writable in ((0, 0, "lower.ext4", False), (0, 1, "scratch.ext4", True),
                                        (1, 3, "other.ext4", True)):
                await host.scsi_attach(c, lun, str(tmp_path / f), read_only=not writable,
                                       passthrough=False)
            # Writable on the host: the guest's read-only mount is what refuses writes below.
            await host.plan9_add("3", str(shared), read_only=False, allowed_files=())
            client = await AgentClient.connect(vm.agent_socket_path, timeout=60)
            g = AgentGuestBackend(client)

            async def sh(script: str) -> str:
                res = await g.exec(["sh", "-c", script])
                assert res.exit_code == 0, (script, res)
                return res.stdout.decode()

            try:
                await g.mount_scsi(0, 0, "/run/mounts/m1", read_only=True, options=[])
                await g.mount_scsi(0, 1, "/run/mounts/m2", read_only=False, options=[])
                assert await sh("cat /run/mounts/m1/etc/marker") == "from-lower\n"
                mounts = await sh("cat /proc/mounts")
                assert "/run/mounts/m1 ext4 ro" in mounts and "/run/mounts/m2 ext4 rw" in mounts

                rootfs = "/run/gcs/c/c1/rootfs"
                await g.combine_layers("c1", rootfs, [LayerRef("/run/mounts/m1")],
                                       "/run/mounts/m2/scratch/c1")
                await sh(f"echo new > {rootfs}/etc/new")
                assert await sh("cat /run/mounts/m2/scratch/c1/upper/etc/new") == "new\n"

                # crun on the overlay rootfs: needs the pivot_root fix in /init.
                await sh("cd /run/gcs/c/c1 && crun spec && python3 -I -c \"import json; "
                         "c=json.load(open('config.json')); c['process']['terminal']=False; "
                         "c['process']['args']=['/bin/sh','-c','cat /etc/marker /etc/new']; "
                         "c['root']['readonly']=False; json.dump(c, open('config.json','w'))\"")
                out = await sh("crun run --bundle /run/gcs/c/c1 c1")
                assert out == "from-lower\nnew\n"

                await g.remove_combined_layers(rootfs)
                # Controller 1 is found through its own PCI slot; a bad option is reported
                # with the kernel's reason.
                with pytest.raises(BackendError, match=r"guest mount_scsi: mount /dev/sd\w+ on "
                                   r"/run/mounts/m3: Invalid argument"):
                    await g.mount_scsi(1, 3, "/run/mounts/m3", read_only=False,
                                       options=["no_such_option"])
                await g.mount_scsi(1, 3, "/run/mounts/m3", read_only=False, options=["noatime"])
                assert "/run/mounts/m3 ext4 rw,noatime" in await sh("cat /proc/mounts")

                for c, lun, path in ((0, 0, "/run/mounts/m1"), (0, 1, "/run/mounts/m2"),
                                     (1, 3, "/run/mounts/m3")):
                    await g.unmount_scsi(c, lun, path)
                assert "/run/mounts/m" not in await sh("cat /proc/mounts")
                assert (await sh("ls /sys/block")).split() == []  # all let go
                # The disk is still attached on the host: a new mount finds it again
                # (the agent asks the SCSI host to rescan that LUN).
                await g.mount_scsi(0, 0, "/run/mounts/m4", read_only=True, options=[])
                assert await sh("cat /run/mounts/m4/etc/marker") == "from-lower\n"
                await g.unmount_scsi(0, 0, "/run/mounts/m4")

                await g.mount_plan9("3", "/run/gcs/c/c1/mounts/m0", read_only=True)
                assert await sh("cat /run/gcs/c/c1/mounts/m0/hello.txt") == "hi from the host\n"
                ro = await g.exec(["touch", "/run/gcs/c/c1/mounts/m0/x"])
                assert ro.exit_code != 0
                await g.unmount_plan9("3", "/run/gcs/c/c1/mounts/m0")

                hp = await g.hugepages_dir("sb", "2M/hp")
                assert f"{hp} hugetlbfs" in await sh("cat /proc/mounts")

                await g.shutdown()
                assert await exits(vm)
            finally:
                await client.close()

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_vpmem_mount(boot_files: BootFiles, tmp_path: Path) -> None:
    """vPMEM device 1 (behind root port 1) holding an ext4 layer mounts read-only."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("pmem\n")
    img = tmp_path / "layer.ext4"
    _mkfs_ext4(img, "16M", tree)

    async def main() -> None:
        # A UVM with vPMEM has one SCSI controller by default (UvmOptions.scsi_controller_count).
        async with booted(boot_files, tmp_path, vpmem_slots=2, scsi_controllers=1) as vm:
            await QemuHostBackend(vm).vpmem_add(1, str(img))
            client = await AgentClient.connect(vm.agent_socket_path, timeout=60)
            g = AgentGuestBackend(client)
            try:
                await g.mount_vpmem(1, "/run/layers/p1")
                res = await g.exec(["cat", "/run/layers/p1/f"])
                assert res.stdout == b"pmem\n", (res, console(vm))
                assert b"/run/layers/p1 ext4 ro" in (await g.exec(["cat", "/proc/mounts"])).stdout
                await g.unmount_vpmem(1, "/run/layers/p1")
                assert b"/run/layers" not in (await g.exec(["cat", "/proc/mounts"])).stdout
                await g.shutdown()
                assert await exits(vm)
            finally:
                await client.close()

    asyncio.run(main())


@needs_images
def test_containers(boot_files: BootFiles, tmp_path: Path) -> None:
    """container_create/start/exec/signal/delete with streamed output and stdin."""
    _busybox_image(tmp_path / "lower.ext4", tmp_path / "lowertree")

    async def main() -> None:
        async with booted(boot_files, tmp_path) as vm:
            await QemuHostBackend(vm).scsi_attach(0, 0, str(tmp_path / "lower.ext4"),
                                                  read_only=True, passthrough=False)
            client = await AgentClient.connect(vm.agent_socket_path, timeout=60)
            g = AgentGuestBackend(client)
            try:
                await g.mount_scsi(0, 0, "/run/mounts/m1", read_only=True, options=[])
                spec_text = await g.exec(["sh", "-c", "cd /tmp && crun spec && cat config.json"])
                base = json.loads(spec_text.stdout)

                def spec(cid: str, args: list[str]) -> dict[str, object]:
                    return {**base, "root": {"path": f"/run/gcs/c/{cid}/rootfs",
                                             "readonly": False},
                            # crun spec asks for a terminal; these checks read plain pipes.
                            "process": {**base["process"], "args": args, "terminal": False},
                            "mounts": [*base["mounts"], {"destination": "/shared",
                                                         "type": "bind", "options": ["rbind"],
                                                         "source": "sandbox://data"}]}

                # 1. Output, stdin and the exit status of an init process.
                await g.combine_layers("c1", "/run/gcs/c/c1/rootfs",
                                       [LayerRef("/run/mounts/m1")], "/run/scratch/c1")
                init = await client.container_create(
                    "c1", "/run/gcs/c/c1", spec("c1", ["/bin/sh", "-c",
                                                      "cat /etc/marker; cat; "
                                                      "echo hi > /shared/f; exit 7"]),
                    sandbox_id="sb", stdin=True)
                await client.container_start("c1")
                await init.write_stdin(b"from-stdin\n")
                await init.close_stdin()
                out = b"".join([d async for s, d in init.output() if s == "stdout"])
                assert out == b"from-lower\nfrom-stdin\n"
                assert await init.wait() == 7
                shared = await g.exec(["cat", "/run/gcs/c/sb/sandboxMounts/data/f"])
                assert shared.stdout == b"hi\n"  # sandbox:// resolved by the guest
                await client.container_delete("c1")

                # 2. exec into a running container, then kill it.
                await g.combine_layers("c2", "/run/gcs/c/c2/rootfs",
                                       [LayerRef("/run/mounts/m1")], "/run/scratch/c2")
                init2 = await client.container_create(
                    "c2", "/run/gcs/c/c2", spec("c2", ["/bin/sleep", "300"]), sandbox_id="sb")
                await client.container_start("c2")
                for _ in range(100):  # crun run needs a moment to have the container running
                    state = await g.exec(["crun", "--root", CRUN_ROOT, "state", "c2"])
                    if b'"running"' in state.stdout:
                        break
                    await asyncio.sleep(0.1)
                proc = await client.container_exec("c2", "e1", {
                    **base["process"], "args": ["/bin/cat", "/etc/marker"], "terminal": False})
                chunks = [d async for _s, d in proc.output()]
                assert (b"".join(chunks), await proc.wait()) == (b"from-lower\n", 0)
                await client.container_signal("c2", 9)
                assert await asyncio.wait_for(init2.wait(), 20) == 137
                await client.container_delete("c2")
                with pytest.raises(GuestError, match="does not exist") as gone:
                    await client.container_start("c2")
                assert gone.value.kind is ErrorKind.NOT_FOUND
                await g.shutdown()
                assert await exits(vm)
            finally:
                await client.close()

    asyncio.run(main())
