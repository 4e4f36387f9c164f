"""Drive a command on a pty, as a person at a terminal would (tests of interactive terminals).

The command runs in a new session with the pty's slave as its controlling terminal, so that the
kernel sends it ``SIGWINCH`` when :meth:`PtyProcess.resize` changes the size. The test keeps the
slave open too: :meth:`PtyProcess.mode` reads its mode (``stty -g``) at any time.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Sequence


def _make_controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProcess:
    def __init__(self, argv: Sequence[str], *, rows: int = 24, cols: int = 80,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.master, False)
        self.set_size(rows, cols)
        self.initial_mode = self.mode()
        self.proc = subprocess.Popen(
            list(argv), stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env,
            cwd=cwd, start_new_session=True, preexec_fn=_make_controlling_terminal)
        os.set_blocking(self.master, False)
        self.output = bytearray()
        self._seen = 0  # where the next expect() starts looking

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, rows: int, cols: int) -> None:
        """Change the size (the session's foreground process group gets SIGWINCH)."""
        self.set_size(rows, cols)

    def mode(self) -> str:
        """The terminal's mode as ``stty -g`` prints it."""
        return subprocess.run(["stty", "-g"], stdin=self.slave, capture_output=True, text=True,
                              check=True).stdout.strip()

    def write(self, data: bytes | str) -> None:
        os.write(self.master, data.encode() if isinstance(data, str) else data)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return False
        self.output.extend(data)
        return bool(data)

    def expect(self, pattern: bytes | str, timeout: float = 120) -> re.Match[bytes]:
        """Wait until ``pattern`` (a regex) appears after the previous match; return it."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output, self._seen)
            if m:
                self._seen = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {rx.pattern!r}; got "
                                     f"{bytes(self.output[self._seen:])[-2000:]!r}")
            self._read(min(left, 0.5))

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; output {bytes(self.output)[-2000:]!r}")
            self._read(0.1)
        while self._read(0.05):
            pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)

    def __enter__(self) -> PtyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
