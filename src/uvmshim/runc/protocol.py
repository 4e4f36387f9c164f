"""The shim's private socket, and the console socket handshake. STDLIB ONLY.

One request per connection: the client sends one JSON line (optionally with file descriptors
attached as ``SCM_RIGHTS``), the shim answers with JSON lines: ``{"ok": true, ...}`` or
``{"error": "...", "kind": "..."}``. For ``exec`` the connection stays open: the first answer
says the process started, a second one ``{"exit": N}`` comes when it exits, so the client that
waits on the connection can exit with the process's status.

Requests (``op``, and ``id``: the container, the shim's own by default): ``start``, ``kill``
(``signal``, ``all``), ``exec`` (``process``; fds stdin/stdout/stderr attached), ``ps``,
``pause``, ``resume``, ``state``, ``update`` (``resources``: the guest's and, for the shim's own
container, the host cgroup's limits), ``stats`` (the container's cgroup files in the guest:
``files``), ``shutdown`` (kill the container; for the shim's own container
the shim then tears the UVM down and exits), ``add`` (a pod member joins this UVM: ``spec``, fds
attached; answered once created and again with ``{"exit": N}``), ``guest-exec`` (``argv`` run in
the UVM itself, for diagnostics).
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

from uvmshim.errors import UvmshimError

#: A request or answer line may not be longer than this (a process spec is a few KiB).
MAX_LINE = 1 << 20


class ShimGone(UvmshimError):
    """The shim does not answer: it exited (the container stopped) or was killed."""


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` attached (``SCM_RIGHTS``), as runc's ``utils.SendFds``."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def recv_line_with_fds(sock: socket.socket, max_fds: int = 3) -> tuple[bytes, list[int]]:
    """Receive one line and the fds that came with its first bytes."""
    fds: list[int] = []
    buf = bytearray()
    while b"\n" not in buf:
        data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(max_fds * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(got)
        if not data:
            break
        buf += data
        if len(buf) > MAX_LINE:
            raise UvmshimError("request too long")
    return bytes(buf), fds


def send_console(console_socket: str, master_fd: int) -> None:
    """Give the pty master to the caller's console socket, as runc does.

    runc sends one message whose payload is the pty's name and which carries the fd; conmon and
    containerd read the fd and ignore the name.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(console_socket)
        except OSError as err:
            raise UvmshimError(f"console socket {console_socket}: {err.strerror or err}") \
                from None
        send_fds(sock, b"/dev/ptmx", [master_fd])


def open_pty() -> tuple[int, int]:
    """A new pty pair ``(master, slave)``, both close-on-exec."""
    master, slave = os.openpty()
    os.set_inheritable(master, False)
    os.set_inheritable(slave, False)
    return master, slave


class Connection:
    """A client connection to a shim (blocking)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise ShimGone("the container's shim is not running") from None
        except OSError as err:
            self.sock.close()
            raise ShimGone(f"the container's shim does not answer: {err}") from None
        self._file = self.sock.makefile("rb")

    def send(self, request: dict[str, Any], fds: list[int] | None = None) -> None:
        send_fds(self.sock, json.dumps(request).encode() + b"\n", fds or [])

    def receive(self) -> dict[str, Any]:
        """The next answer; raises the shim's error as :class:`UvmshimError`."""
        try:
            line = self._file.readline(MAX_LINE)
        except TimeoutError:
            raise UvmshimError("the container's shim did not answer in time") from None
        except OSError as err:
            raise ShimGone(f"lost the container's shim: {err}") from None
        if not line:
            raise ShimGone("the container's shim exited before answering")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise UvmshimError("bad answer from the shim")
        if "error" in answer:
            raise UvmshimError(str(answer["error"]))
        return answer

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(path: str | os.PathLike[str], request: dict[str, Any],
         timeout: float | None = 60.0) -> dict[str, Any]:
    """Send one request and return the answer."""
    with Connection(path, timeout) as conn:
        conn.send(request)
        return conn.receive()
