"""Small guest-side helpers: the agent's error type, running tools, mounting. STDLIB ONLY.

The initrd has no ctypes (it is stripped out), so mount(2) is reached through busybox
``mount``/``umount``; their messages are reworded into the kernel's reason, which is what the
host reports to the user (``mount /dev/sdb on /run/mounts/m1: Invalid argument``).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence

from uvmshim.protocol.messages import ErrorKind


class AgentError(Exception):
    """A request failed; ``str(err)`` is the reason and ``kind`` the :class:`ErrorKind` sent
    back to the host."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.FAILED) -> None:
        super().__init__(message)
        self.kind = kind


#: What busybox says (after :func:`_reason`) when the target is in use.
_BUSY = "Device or resource busy"


def _os_kind(err: OSError) -> ErrorKind:
    """The kind of failure an ``OSError`` is."""
    if err.errno == errno.ENOENT:
        return ErrorKind.NOT_FOUND
    if err.errno == errno.EBUSY:
        return ErrorKind.BUSY
    return ErrorKind.FAILED


def run(argv: Sequence[str], *, timeout: float | None = 120.0) -> str:
    """Run ``argv`` and return its stdout.

    :raises AgentError: with the tool's stderr (or exit status) if it fails or is missing.
    """
    import subprocess  # lazily: not needed to answer the host's hello (boot time)

    try:
        proc = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise AgentError(f"{argv[0]}: not found in the guest", ErrorKind.NOT_FOUND) from err
    except subprocess.TimeoutExpired as err:
        raise AgentError(f"{argv[0]}: timed out after {timeout} s", ErrorKind.TIMEOUT) from err
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise AgentError(msg)
    return proc.stdout.decode(errors="replace")


def _reason(stderr: str) -> str:
    # busybox: "mount: mounting /dev/sdb on /x failed: Invalid argument"
    #          "umount: can't unmount /x: Device or resource busy"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else stderr
    for marker in (" failed: ", ": "):
        if marker in last:
            return last.rsplit(marker, 1)[1]
    return last


def mount(source: str, target: str, *, fstype: str | None = None, options: str = "") -> None:
    """mount(8) ``source`` on ``target``.

    :raises AgentError: ``mount <source> on <target>: <reason>``.
    """
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", options]
    try:
        run([*argv, source, target])
    except AgentError as err:
        raise _tool_error(f"mount {source} on {target}", err) from None


def umount(target: str) -> None:
    """Unmount ``target`` if something is mounted there.

    :raises AgentError: ``unmount <target>: <reason>``.
    """
    if not is_mountpoint(target):
        return
    try:
        run(["umount", target])
    except AgentError as err:
        raise _tool_error(f"unmount {target}", err) from None


def _tool_error(what: str, err: AgentError) -> AgentError:
    """``<what>: <reason>`` for a failed mount(8)/umount(8), with the kind that reason is."""
    reason = _reason(str(err))
    kind = ErrorKind.BUSY if reason == _BUSY else err.kind
    return AgentError(f"{what}: {reason}", kind)


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts(proc_mounts: str = "/proc/mounts") -> list[tuple[str, str, str, str]]:
    """Return ``(source, target, fstype, options)`` for every mount, oldest first."""
    out = []
    with open(proc_mounts, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                out.append((_unescape(parts[0]), _unescape(parts[1]), parts[2], parts[3]))
    return out


def is_mountpoint(path: str, proc_mounts: str = "/proc/mounts") -> bool:
    """True if ``path`` (normalised) is a mount target."""
    path = os.path.normpath(path)
    return any(target == path for _, target, _, _ in mounts(proc_mounts))


def wait_for(check: Callable[[], str | None], *, timeout: float, interval: float = 0.01,
             on_slow: Callable[[], None] | None = None, slow_after: float = 0.5) -> str | None:
    """Poll ``check`` until it returns a value or ``timeout`` seconds pass.

    ``on_slow`` runs once after ``slow_after`` seconds (e.g. to trigger a SCSI rescan).
    """
    start = time.monotonic()
    nudged = False
    while True:
        value = check()
        if value is not None:
            return value
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return None
        if on_slow is not None and not nudged and elapsed >= slow_after:
            nudged = True
            on_slow()
        time.sleep(interval)


def makedirs(path: str, mode: int | None = None) -> None:
    """``mkdir -p``; if ``mode`` is given, chmod the leaf (mkdir's mode obeys the umask)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise AgentError(f"mkdir {path}: {err.strerror}", _os_kind(err)) from None
    if mode is not None:
        os.chmod(path, mode)


def remove_dir(path: str) -> None:
    """Remove the (now empty) mount point ``path``; a missing one is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise AgentError(f"remove {path}: {err.strerror}", _os_kind(err)) from None
