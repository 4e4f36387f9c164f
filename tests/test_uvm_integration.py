"""The QEMU UVM through the same device managers the allocator uses (issue #3), real VM."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmsession import UvmSession
from uvmshim.runtime.leaks import find_holdings

from helpers import ext4

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True)
def nothing_left_attached(session: UvmSession) -> Iterator[None]:
    yield
    assert session.uvm.vm.inventory() == {"scsi": [], "plan9": [], "vpmem": [], "vpci": []}
    _, out, _ = session.sh("grep -E ' /run/(mounts|shares)' /proc/mounts || true")
    assert out == "", f"guest mounts left: {out}"
    export_root = str(session.state_dir / "share")
    host_binds = [m for m in find_holdings().mounts
                  if m.startswith(str(session.state_dir)) and m != export_root]
    assert host_binds == [], f"host bind mounts left: {host_binds}"


def debugfs_cat(img: str, path: str) -> str:
    res = subprocess.run(["debugfs", "-R", f"cat {path}", img], capture_output=True, text=True,
                         check=True)
    return res.stdout


def test_ro_and_rw_disks(session: UvmSession, tmp_path: Path) -> None:
    vm = session.uvm.vm
    ro_img = ext4(tmp_path, "ro", {"hello.txt": "from ro\n"})
    rw_img = ext4(tmp_path, "rw", {"hello.txt": "from rw\n"})

    async def attach() -> tuple[object, object]:
        ro = await vm.add_scsi(ro_img, "/run/mounts/m101", read_only=True, options=("ro",))
        rw = await vm.add_scsi(rw_img, "/run/mounts/m102", read_only=False)
        return ro, rw

    ro, rw = session.run(attach())
    code, out, err = session.sh(
        "cat /run/mounts/m101/hello.txt /run/mounts/m102/hello.txt; "
        "echo written > /run/mounts/m102/new.txt && sync; "
        "if touch /run/mounts/m101/nope 2>/dev/null; then echo WROTE; else echo refused; fi")
    assert code == 0, err
    assert out.splitlines() == ["from ro", "from rw", "refused"]
    session.run(ro.release())  # type: ignore[attr-defined]
    session.run(rw.release())  # type: ignore[attr-defined]
    assert debugfs_cat(rw_img, "/new.txt") == "written\n"


def test_same_image_twice_is_one_attachment_and_detach_removes_the_device(
        session: UvmSession, tmp_path: Path) -> None:
    vm = session.uvm.vm
    img = ext4(tmp_path, "twice", {"a": "a"})
    _, disks_before, _ = session.sh("ls /sys/block | grep '^sd' || true")

    # QEMU gets images as file descriptors (/dev/fdset/N): the second attach of the same
    # image must not give QEMU another descriptor of it.
    fds = Path(f"/proc/{session.uvm.machine.pid}/fd")

    def qemu_fds_on_image() -> int:
        return sum(1 for fd in fds.iterdir()
                   if os.path.realpath(fd) == os.path.realpath(img))

    a = session.run(vm.add_scsi(img, "/run/mounts/m201", read_only=True, options=("ro",)))
    once = qemu_fds_on_image()
    b = session.run(vm.add_scsi(img, "/run/mounts/m202", read_only=True, options=("ro",)))
    assert b.guest_path == a.guest_path == "/run/mounts/m201"
    assert len(vm.scsi.attachments()) == 1
    assert qemu_fds_on_image() == once > 0
    _, disks_during, _ = session.sh("ls /sys/block | grep '^sd' || true")
    assert len(disks_during.split()) == len(disks_before.split()) + 1
    session.run(a.release())
    _, still, _ = session.sh("grep -c ' /run/mounts/m201 ' /proc/mounts || true")
    assert still.strip() == "1"  # b still holds it
    session.run(b.release())
    _, disks_after, _ = session.sh("ls /sys/block | grep '^sd' || true")
    assert disks_after.split() == disks_before.split()


def test_directory_and_single_file_shares(session: UvmSession, tmp_path: Path) -> None:
    vm = session.uvm.vm
    d = tmp_path / "dir"
    d.mkdir()
    (d / "one.txt").write_text("one\n")
    (d / "sibling.txt").write_text("sibling\n")

    async def share() -> list[object]:
        whole = await vm.add_plan9(str(d), "/run/shares/whole", read_only=False)
        single = await vm.add_plan9(str(d) + "/", "/run/shares/single", read_only=True,
                                    restrict=True, allowed_names=["one.txt"])
        return [whole, single]

    handles = session.run(share())
    code, out, err = session.sh(
        "ls /run/shares/whole | sort; echo --; ls -a /run/shares/single; echo --; "
        "cat /run/shares/single/one.txt; echo guest > /run/shares/whole/from-guest.txt; "
        "if echo x > /run/shares/single/one.txt 2>/dev/null; then echo WROTE; "
        "else echo refused; fi")
    assert code == 0, err
    whole, single, rest = out.split("--\n")
    assert whole.split() == ["one.txt", "sibling.txt"]
    assert sorted(single.split()) == [".", "..", "one.txt"]
    assert rest.split() == ["one", "refused"]
    assert (d / "from-guest.txt").read_text() == "guest\n"
    assert (d / "one.txt").read_text() == "one\n"
    for h in reversed(handles):
        session.run(h.release())  # type: ignore[attr-defined]


def test_share_symlinks_do_not_reach_host_files(session: UvmSession, tmp_path: Path) -> None:
    secret = tmp_path / f"secret-{secrets.token_hex(4)}"
    secret.write_text(secrets.token_hex(16))
    d = tmp_path / "shared"
    d.mkdir()
    os.symlink(str(secret), d / "abs-link")
    os.symlink(os.path.relpath(secret, d), d / "rel-link")
    share = session.run(session.uvm.vm.add_plan9(str(d), "/run/shares/links", read_only=True))
    _, out, _ = session.sh("cat /run/shares/links/abs-link /run/shares/links/rel-link 2>&1; "
                           "ls /run/shares/links/../ 2>&1")
    assert secret.read_text() not in out
    session.run(share.release())


def test_guest_cannot_leave_setuid_or_root_owned_files(session: UvmSession,
                                                       tmp_path: Path) -> None:
    d = tmp_path / "writable"
    d.mkdir()
    os.chmod(d, 0o777)
    share = session.run(session.uvm.vm.add_plan9(str(d), "/run/shares/w", read_only=False))
    session.sh("cd /run/shares/w && cp /bin/busybox suid && chown 0:0 suid; chmod 4755 suid; "
               "touch plain; chown 0:0 plain; mkdir dir; chmod 2777 dir; true")
    session.run(share.release())
    made = sorted(p.name for p in d.iterdir())
    assert made == ["dir", "plain", "suid"]
    for p in d.iterdir():
        st = p.lstat()
        assert st.st_uid != 0 and st.st_gid != 0, f"{p.name} is root-owned on the host"
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{p.name} is set[ug]id"


def test_uvm_exec_cli(tmp_path: Path) -> None:
    img = ext4(tmp_path, "cli", {"hello.txt": "hello from disk\n"})
    base = tmp_path / "vms"  # a private VM directory: other VMs on the host don't count
    res = subprocess.run(["uvmshim", "uvm", "exec", "--disk", f"{img}:ro", "--",
                          "sh", "-c", "cat /run/mounts/m1/hello.txt; cat /proc/mounts; exit 3"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "UVMSHIM_VM_DIR": str(base)})
    assert res.returncode == 3, res.stderr
    assert "hello from disk" in res.stdout
    assert " /run/mounts/m1 ext4 ro" in res.stdout
    assert base.is_dir()
    held = find_holdings(base)
    assert held.vms == [] and held.qemu_pids == [] and list(base.iterdir()) == []
    assert [m for m in find_holdings(base).mounts if m.startswith(str(base))] == []
