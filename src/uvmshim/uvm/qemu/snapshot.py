"""Save a paused VM's device state to a file, and load it into a new QEMU: QEMU migration to and
from a descriptor, with guest RAM left out of the stream.

Both sides run with RAM in a ``memory-backend-file`` (:data:`~.config.RamMode`). The saving VM
maps the file shared (``share=on``), so RAM *is* the file; with the ``x-ignore-shared``
capability the migration stream carries only the device state (a few hundred KB, ~20 ms). The
loading VM maps the same file privately (``share=off``): it starts from the saved RAM, shares its
pages with the page cache until it writes one, and never writes the file.

QEMU runs with ``-sandbox ...,spawn=deny`` (no ``exec:`` URIs) and opens no host file by name,
so uvmshim opens the state file itself and hands the descriptor over QMP (``SCM_RIGHTS`` +
``getfd``); the URI is ``fd:<name>``. QEMU closes it when the migration ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from qemu.qmp import QMPError

from ...errors import BackendError
from .machine import QemuMachine

log = logging.getLogger(__name__)

#: The ``getfd`` name of the state file's descriptor.
STATE_FD_NAME = "uvmshim-state"
#: How often the migration status is polled (saving or loading takes 10-50 ms).
POLL_INTERVAL = 0.005


class SnapshotError(BackendError):
    """Saving or loading a VM's device state failed (QEMU's reason in the message)."""


async def _execute(machine: QemuMachine, cmd: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await machine.qmp.execute(cmd, args)
    except (QMPError, OSError, EOFError) as err:
        raise SnapshotError(f"VM {machine.vm_id}: QMP {cmd}: {err}") from err


async def _hand_fd(machine: QemuMachine, fd: int) -> None:
    try:
        machine.qmp.send_fd_scm(fd)
    except (QMPError, OSError) as err:
        raise SnapshotError(f"VM {machine.vm_id}: passing the state file to QEMU: {err}") from err
    await _execute(machine, "getfd", {"fdname": STATE_FD_NAME})


async def _ignore_shared(machine: QemuMachine) -> None:
    await _execute(machine, "migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True},
    ]})


async def _wait_migration(machine: QemuMachine, what: str, timeout: float) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration completed; return its last answer."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                info = await _execute(machine, "query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    return info if isinstance(info, dict) else {}
                if status in ("failed", "cancelled"):
                    reason = info.get("error-desc", status) if isinstance(info, dict) else status
                    raise SnapshotError(f"VM {machine.vm_id}: {what} failed: {reason}")
                await asyncio.sleep(POLL_INTERVAL)
    except TimeoutError:
        raise SnapshotError(f"VM {machine.vm_id}: {what} did not finish in {timeout:g} s") \
            from None


async def save_state(machine: QemuMachine, fd: int, *, timeout: float = 60.0) -> int:
    """Pause ``machine`` and write its device state (not its RAM) to ``fd``.

    The VM stays paused; the caller quits it. ``fd`` stays the caller's (QEMU closes its copy).

    :return: the number of bytes QEMU wrote.
    :raise SnapshotError: QEMU refused or the migration failed (e.g. the disk is full, or a
        device that blocks migration, such as a mounted 9p share, is in use).
    """
    await _execute(machine, "stop")
    await _ignore_shared(machine)
    await _hand_fd(machine, fd)
    await _execute(machine, "migrate", {"uri": f"fd:{STATE_FD_NAME}"})
    info = await _wait_migration(machine, "saving the device state", timeout)
    ram = info.get("ram", {})
    log.debug("VM %s: device state saved (%s ms, ram %s)", machine.vm_id,
              info.get("total-time"), ram)
    return os.fstat(fd).st_size


async def load_state(machine: QemuMachine, fd: int, *, timeout: float = 60.0) -> None:
    """Load the device state in ``fd`` into ``machine`` (started with ``ram="clone"``) and run it.

    :raise SnapshotError: QEMU refused the state (another machine configuration or QEMU, a
        truncated or damaged file) or did not finish in ``timeout``.
    """
    await _ignore_shared(machine)
    await _hand_fd(machine, fd)
    await _execute(machine, "migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
    await _wait_migration(machine, "loading the device state", timeout)
    await _execute(machine, "cont")
