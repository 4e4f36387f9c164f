"""Interactive terminals (issue #16): a pty in the guest for ``process.terminal``, relayed to the
user's terminal (``uvmshim run -it``, ``pod run -it``, ``exec -it``) or to the pty whose master a
runtime caller holds (podman through conmon, containerd's shim); window sizes and resizes;
Ctrl-C and Ctrl-D through the terminal; the host terminal's mode restored.

Each command runs on a pty of the test's (:mod:`ptydriver`), as if a person typed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ptydriver import PtyProcess
from test_oci_clients import _need, containerd, make_rootfs, sandbox_fixes
from uvmsession import UvmSession
from uvmshim.cli.entry import is_runc_argv
from uvmshim.runtime import terminal
from uvmshim.runtime.container import Container
from uvmshim.runtime.specgen import RunOptions, build_spec

from helpers import uvmshim_binary

__all__ = ["containerd", "sandbox_fixes"]  # fixtures, used by name

APPLETS = ["tty", "stty", "vi", "clear", "kill"]
PROMPT = r"# "


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_rootfs(tmp_path_factory.mktemp("tty") / "rootfs")
    for applet in APPLETS:
        if not (path / "bin" / applet).exists():
            os.symlink("busybox", path / "bin" / applet)
    return path


def shell_checks(p: PtyProcess, rows: int, cols: int) -> None:
    """At a shell prompt: a pty, the outer size, a resize, a full-screen program, Ctrl-C.

    (``\r+\n``: ctr leaves output processing on in the outer terminal, which turns the
    container's ``\r\n`` into ``\r\r\n``, with runc and crun as with uvmshim.)
    """
    p.expect(PROMPT)
    p.write("tty; stty size\r")
    p.expect(rf"\r+\n(/dev/pts/\d+)\r+\n{rows} {cols}\r+\n")
    p.resize(rows + 7, cols + 13)
    deadline = time.monotonic() + 30
    while True:  # the new size reaches the guest asynchronously
        p.write("stty size\r")
        m = p.expect(r"\r+\n(\d+ \d+)\r+\n")
        if m.group(1) == f"{rows + 7} {cols + 13}".encode():
            break
        assert time.monotonic() < deadline, f"size still {m.group(1)!r}"
        time.sleep(0.2)
    p.write("clear; echo cleared\r")
    p.expect(rb"\x1b\[H\x1b\[J.*cleared")  # the escape sequences arrive as they are
    p.write("echo hello-vi > /tmp/f; vi /tmp/f\r")
    p.expect(rb"hello-vi\x1b\[2;1H~")  # vi draws its screen: the text, then ~ lines
    p.write(":q\r")
    p.expect(PROMPT)
    p.write("sleep 300\r")
    time.sleep(1.0)
    p.write("\x03")  # Ctrl-C: SIGINT to the foreground process group of the guest's pty
    p.expect(r"\^C")
    p.write("echo after-$((6*7))\r")
    p.expect(r"\r+\nafter-42\r+\n", timeout=30)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (ours: started by the test)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


# Without a VM -------------------------------------------------------------------------------


def test_raw_mode_is_restored_and_sizes_read() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(RuntimeError), terminal.raw_mode(slave):
            mode = termios.tcgetattr(slave)
            assert not mode[3] & (termios.ECHO | termios.ICANON |
                                  termios.ISIG)
            raise RuntimeError
        assert termios.tcgetattr(slave) == before
        import fcntl
        import struct

        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 12, 34, 0, 0))
        assert terminal.window_size(-1, slave) == (12, 34)
        assert terminal.window_size(-1) is None
    finally:
        os.close(master)
        os.close(slave)


def test_console_size_goes_into_the_spec(tmp_path: Path) -> None:
    spec = build_spec(RunOptions(args=["sh"], rootfs=str(tmp_path), terminal=True))
    sized = terminal.spec_with_console_size(spec, (30, 100))
    assert sized.raw["process"]["consoleSize"] == {"height": 30, "width": 100}
    assert terminal.spec_with_console_size(sized, (1, 2)) is sized  # the spec's own wins
    plain = build_spec(RunOptions(args=["sh"], rootfs=str(tmp_path)))
    assert terminal.spec_with_console_size(plain, (30, 100)) is plain


def test_exec_goes_to_runc_or_to_the_people() -> None:
    assert not is_runc_argv(["exec", "-it", "c1", "sh"])
    assert not is_runc_argv(["--debug", "exec", "--pod", "p", "c1", "sh"])
    assert is_runc_argv(["exec", "-t", "c1", "sh"])
    assert is_runc_argv(["exec", "--console-socket", "/s", "--tty", "--process", "p", "-d",
                         "--pid-file", "f", "c1"])
    assert is_runc_argv(["--root", "/r", "exec", "-i", "c1"])


# The guest side, through the agent --------------------------------------------------------


@pytest.mark.vm
def test_guest_pty_size_resize_eof_and_exec(session: UvmSession, rootfs: Path) -> None:
    spec = build_spec(RunOptions(args=["sh", "-c", "tty; stty size; cat; echo cat-done; "
                                       "stty size; sleep 30 & exec sleep 300"],
                                 rootfs=str(rootfs), terminal=True))
    spec = replace(spec, raw={**spec.raw, "process": {**spec.raw["process"],
                                                       "consoleSize": {"height": 33,
                                                                       "width": 77}}})
    c = Container(session.uvm.vm, session.uvm.agent, "tty1", spec)

    async def until(out: bytearray, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in out:
            assert time.monotonic() < deadline, f"no {text!r} in {bytes(out)!r}"
            await asyncio.sleep(0.05)

    async def go() -> tuple[bytes, bytes, int, int]:
        await c.create(stdin=True)
        out = bytearray()

        async def collect() -> None:
            async for stream, data in c.output():
                assert stream == "stdout"  # one stream: the pty
                out.extend(data)

        relay = asyncio.create_task(collect())
        try:
            await c.start()
            await until(out, b"33 77\r\n")
            await c.write_stdin(b"typed\n")
            await until(out, b"typed\r\ntyped\r\n")  # the pty echoes, cat repeats
            await c.resize(40, 100)
            await c.close_stdin()  # ^D: cat reads EOF
            await until(out, b"cat-done\r\n40 100\r\n")
            proc = await c.exec({"args": ["sh", "-c", "tty; stty size; exit 3"],
                                 "terminal": True, "cwd": "/", "env": ["PATH=/bin"],
                                 "consoleSize": {"height": 5, "width": 50}})
            exec_out = bytearray()
            async for _stream, data in proc.output():
                exec_out.extend(data)
            exec_code = await proc.wait()
            await c.kill(signal.SIGKILL)
            code = await c.wait()
            await relay
            return bytes(out), bytes(exec_out), exec_code, code
        finally:
            relay.cancel()
            await c.delete()

    out, exec_out, exec_code, code = session.run(go())
    assert out.startswith(b"/dev/pts/0\r\n33 77\r\n"), out
    assert exec_out.endswith(b"\r\n5 50\r\n") and exec_out.startswith(b"/dev/pts/"), exec_out
    assert exec_code == 3
    assert code == 128 + signal.SIGKILL


# The people's CLI ---------------------------------------------------------------------------


@pytest.mark.vm
def test_uvmshim_run_it(rootfs: Path) -> None:
    with PtyProcess([uvmshim_binary(), "run", "-it", "--rootfs", str(rootfs), "--", "sh"],
                    rows=31, cols=97) as p:
        shell_checks(p, 31, 97)
        p.write("exit 5\r")
        assert p.wait() == 5
        assert p.mode() == p.initial_mode
    # The shell killed: its status, and the terminal back as it was.
    with PtyProcess([uvmshim_binary(), "run", "-it", "--rootfs", str(rootfs), "--",
                     "sh", "-c", "sh; exit $?"], rows=20, cols=60) as p:
        p.expect(PROMPT)
        p.write("kill -9 $$\r")
        assert p.wait() == 128 + signal.SIGKILL
        assert p.mode() == p.initial_mode
    # The whole UVM killed under the container: an error, and the terminal back as it was.
    with PtyProcess([uvmshim_binary(), "run", "-it", "--rootfs", str(rootfs), "--", "sh"],
                    rows=20, cols=60) as p:
        p.expect(PROMPT)
        qemu = [pid for pid in descendants(p.proc.pid) if b"qemu-system" in cmdline(pid)]
        assert len(qemu) == 1
        os.kill(qemu[0], signal.SIGKILL)
        assert p.wait() != 0
        assert p.mode() == p.initial_mode
    # -t without -i: a terminal in the guest, the user's terminal left alone.
    with PtyProcess([uvmshim_binary(), "run", "-t", "--rootfs", str(rootfs), "--",
                     "sh", "-c", "tty; stty size"], rows=22, cols=66) as p:
        p.expect(r"/dev/pts/\d+\r+\n22 66\r+\n")  # (our terminal adds a \r: not raw)
        assert p.wait() == 0
        assert p.mode() == p.initial_mode


@pytest.mark.vm
def test_pod_run_it_and_exec_it(rootfs: Path) -> None:
    name = f"ttypod{os.getpid()}"
    uvmshim = uvmshim_binary()
    subprocess.run([uvmshim, "pod", "create", name, "--rootfs", str(rootfs)], check=True,
                   capture_output=True, timeout=300)
    try:
        with PtyProcess([uvmshim, "pod", "run", "-it", "--name", f"{name}-w", name, "--",
                         "sh"], rows=25, cols=70) as p:
            p.expect(PROMPT)
            with PtyProcess([uvmshim, "exec", "-it", f"{name}-w", "--", "sh"],
                            rows=26, cols=71) as q:
                shell_checks(q, 26, 71)
                q.write("exit 4\r")
                assert q.wait() == 4
                assert q.mode() == q.initial_mode
            p.write("tty; stty size\r")
            p.expect(r"/dev/pts/\d+\r\n25 70\r\n")
            p.write("\x04")  # Ctrl-D at the prompt: the shell's input ends
            assert p.wait() == 0
            assert p.mode() == p.initial_mode
    finally:
        subprocess.run([uvmshim, "pod", "stop", name], check=False, timeout=120)


# podman and containerd ----------------------------------------------------------------------


@pytest.fixture
def podman_env(sandbox_fixes: dict[str, str]) -> Iterator[dict[str, str]]:
    _need("podman", "conmon")
    yield sandbox_fixes


@pytest.mark.vm
def test_podman_run_it(rootfs: Path, podman_env: dict[str, str]) -> None:
    argv = ["podman", "--runtime", uvmshim_binary(), "run", "--rm", "-it", "--network=none",
            "--rootfs", str(rootfs), "sh"]
    with PtyProcess(argv, rows=31, cols=97, env=podman_env) as p:
        shell_checks(p, 31, 97)
        p.write("exit 5\r")
        assert p.wait() == 5
        assert p.mode() == p.initial_mode


@pytest.mark.vm
def test_podman_exec_it_attach_logs_and_kill(rootfs: Path, podman_env: dict[str, str]) -> None:
    podman = ["podman", "--runtime", uvmshim_binary()]
    name = f"uvmshim-tty-{os.getpid()}"
    subprocess.run([*podman, "run", "-dit", "--name", name, "--network=none", "--rootfs",
                    str(rootfs), "sh"], env=podman_env, check=True, capture_output=True,
                   timeout=300)
    try:
        with PtyProcess([*podman, "exec", "-it", name, "sh"], rows=21, cols=55,
                        env=podman_env) as p:
            shell_checks(p, 21, 55)
            p.write("exit 3\r")
            assert p.wait() == 3
            assert p.mode() == p.initial_mode
        with PtyProcess([*podman, "attach", name], rows=21, cols=55, env=podman_env) as p:
            time.sleep(1)
            p.write("echo attached-$((40+2))\r")
            p.expect(r"attached-42\r\n")
            p.write("\x10")
            time.sleep(0.3)
            p.write("\x11")  # Ctrl-P Ctrl-Q: detach, the container keeps running
            assert p.wait() == 0
            assert p.mode() == p.initial_mode
        logs = subprocess.run([*podman, "logs", name], env=podman_env, capture_output=True,
                              timeout=60).stdout
        assert b"attached-42\r\n" in logs
        # Attached when the container is killed from outside: the terminal is restored.
        with PtyProcess([*podman, "attach", name], rows=21, cols=55, env=podman_env) as p:
            time.sleep(1)
            p.write("echo again\r")
            p.expect(r"again\r\n")
            subprocess.run([*podman, "kill", name], env=podman_env, check=True,
                           capture_output=True, timeout=60)
            p.wait()
            assert p.mode() == p.initial_mode
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "0", name], env=podman_env,
                       capture_output=True, timeout=120)


@pytest.mark.vm
def test_ctr_run_t(containerd: list[str], rootfs: Path) -> None:
    argv = [*containerd, "run", "--rm", "-t", "--runc-binary", uvmshim_binary(), "--rootfs",
            str(rootfs), f"tty{os.getpid()}", "sh"]
    with PtyProcess(argv, rows=23, cols=88) as p:
        shell_checks(p, 23, 88)
        p.write("exit 7\r")
        assert p.wait() == 7
        assert p.mode() == p.initial_mode
