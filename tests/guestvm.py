"""A minimal test-only QEMU launcher for the guest boot tests (to be swapped for the real
machine class). TCG only: /dev/kvm exists on the test hosts but hangs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from uvmshim.protocol import SCSI_CONTROLLER_PCI_SLOTS


def qemu_argv(kernel: Path, initrd: Path, run_dir: Path, *, scsi_controllers: int = 1,
              share_dir: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The recommended TCG command line (q35, PVH vmlinux, uncompressed cpio)."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-machine", "q35", "-m", "512", "-smp", "2",
        "-cpu", "qemu64,+rdrand",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet cryptomgr.notests tsc=reliable no_timer_check",
        "-chardev", f"file,id=ser0,path={run_dir / 'console.log'}", "-serial", "chardev:ser0",
        "-device", "virtio-serial-pci,id=vs0",
        "-chardev", f"socket,id=agent,path={run_dir / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent,bus=vs0.0",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
    ]  # fmt: skip
    for i in range(scsi_controllers):
        argv += ["-device", f"virtio-scsi-pci,id=scsi{i},addr={SCSI_CONTROLLER_PCI_SLOTS[i]:#x}"]
    if share_dir is not None:
        argv += ["-fsdev", f"local,id=fs0,path={share_dir},security_model=none,multidevs=remap",
                 "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=share0"]
    return [*argv, *extra]


class GuestVM:
    """A running QEMU process; ``agent_socket`` is where :class:`AgentClient` connects."""

    def __init__(self, proc: asyncio.subprocess.Process, run_dir: Path) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.agent_socket = run_dir / "agent.sock"
        self.qmp_socket = run_dir / "qmp.sock"
        self.started = time.monotonic()

    def console(self) -> str:
        """The guest serial console so far."""
        try:
            return (self.run_dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    async def wait_exit(self, timeout: float) -> int | None:
        """Wait for QEMU to exit; return its status, or None on timeout."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def kill(self) -> None:
        """Kill QEMU (by pid) and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@contextlib.asynccontextmanager
async def launch(kernel: Path, initrd: Path, run_dir: Path, **kw: object) -> AsyncIterator[GuestVM]:
    """Start QEMU; always kill it on exit from the block."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = qemu_argv(kernel, initrd, run_dir, **kw)  # type: ignore[arg-type]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=open(run_dir / "qemu.stderr", "wb"))  # noqa: SIM115 - handed to the child
    vm = GuestVM(proc, run_dir)
    try:
        yield vm
    finally:
        await vm.kill()
