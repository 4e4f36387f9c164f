"""Decide between KVM and TCG: use KVM only when it demonstrably runs a guest.

On the hosts this project runs on, ``/dev/kvm`` exists but nested KVM *hangs* (even QEMU's
start-up with ``-accel kvm -S`` never finishes). So "``/dev/kvm`` is there" is not enough: we
start a tiny KVM guest (SeaBIOS, which prints its banner on the debug console port) and wait a
couple of seconds for the banner. The verdict is cached per host boot (keyed by
``/proc/sys/kernel/random/boot_id``) in memory and in a small JSON file, because a hanging probe
costs its whole timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ... import tools
from ...errors import ToolError
from .config import Accel

#: An async function answering "does KVM work here?".
Prober = Callable[[], Awaitable[bool]]

PROBE_TIMEOUT = 3.0


def host_boot_id() -> str:
    """The kernel's per-boot random id."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


async def probe_kvm(
    qemu_binary: str = "qemu-system-x86_64", timeout: float = PROBE_TIMEOUT
) -> bool:
    """Start a firmware-only KVM guest; True if SeaBIOS's banner shows up within ``timeout``.

    The process is always killed and reaped (KVM_RUN is interruptible by SIGKILL even when hung).
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        qemu_binary, "-accel", "kvm", "-machine", "q35", "-nodefaults", "-no-user-config",
        "-display", "none", "-m", "32", "-debugcon", "stdio", "-no-reboot",
    ]  # fmt: skip
    try:
        async with tools.running(argv, stdout=tools.PIPE) as proc:
            stdout = proc.stdout
            if stdout is None:  # not reached: stdout is a pipe
                return False
            async with asyncio.timeout(timeout):
                seen = b""
                while b"SeaBIOS" not in seen:
                    chunk = await stdout.read(4096)
                    if not chunk:
                        return False
                    seen = (seen + chunk)[-4096:]
                return True
    except TimeoutError:
        return False
    except (OSError, ToolError):  # QEMU could not be started
        return False


class KvmProbe:
    """Resolve ``accel="auto"``, caching the verdict per host boot.

    :param cache_file: where the verdict survives process restarts (None: memory only).
    :param prober: the check itself (injectable for tests); default :func:`probe_kvm`.
    :param boot_id: returns the current boot id (injectable for tests).
    """

    def __init__(
        self,
        cache_file: Path | None = None,
        *,
        prober: Prober | None = None,
        boot_id: Callable[[], str] = host_boot_id,
    ) -> None:
        self._cache_file = cache_file
        self._prober: Prober = prober or probe_kvm
        self._boot_id = boot_id
        self._verdict: tuple[str, bool] | None = None
        self._lock = asyncio.Lock()
        #: How many times the prober ran (for tests and diagnostics).
        self.probes = 0

    def _load(self, boot: str) -> bool | None:
        if self._verdict and self._verdict[0] == boot:
            return self._verdict[1]
        if self._cache_file is None:
            return None
        try:
            data = json.loads(self._cache_file.read_text())
        except (OSError, ValueError):
            return None
        if (
            isinstance(data, dict)
            and data.get("boot_id") == boot
            and isinstance(data.get("kvm"), bool)
        ):
            self._verdict = (boot, data["kvm"])
            return bool(data["kvm"])
        return None

    def _store(self, boot: str, kvm: bool) -> None:
        self._verdict = (boot, kvm)
        if self._cache_file is None:
            return
        # A failed write only costs a re-probe later.
        with contextlib.suppress(OSError):
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"boot_id": boot, "kvm": kvm}))
            tmp.replace(self._cache_file)

    async def kvm_works(self) -> bool:
        """The cached verdict for this host boot, probing once if there is none."""
        async with self._lock:
            boot = self._boot_id()
            cached = self._load(boot)
            if cached is not None:
                return cached
            self.probes += 1
            verdict = await self._prober()
            self._store(boot, verdict)
            return verdict

    async def accel(self) -> Accel:
        """``kvm`` if KVM works on this host, else ``tcg``."""
        return "kvm" if await self.kvm_works() else "tcg"
