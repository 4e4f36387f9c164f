"""Seccomp filters compiled by the host's crun (runtime/seccomp_bpf.py): what the guest's crun
gets, the cache, and what happens when the host cannot compile a profile. The filters' effect
in containers is checked by the VM tests (test_container_security.py), which run with them."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from uvmshim.runtime import seccomp_bpf
from uvmshim.runtime.seccomp import default_profile
from uvmshim.runtime.seccomp_bpf import BPF_ANNOTATION, FAIL_UNKNOWN_ANNOTATION, precompile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compiling needs root (PID namespace)")

#: BPF_RET | BPF_K: a filter's return instructions.
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("UVMSHIM_OWNERS_DIR", str(tmp_path / "owners"))
    return tmp_path / "uvmshim" / "seccomp"


def _spec(seccomp: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "annotations": {"keep": "me"},
            "linux": {"seccomp": copy.deepcopy(seccomp or default_profile())}}


def _program(spec: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    data = base64.b64decode(spec["annotations"][BPF_ANNOTATION])
    return list(struct.iter_unpack("=HBBI", data))


def test_the_guest_gets_the_program_and_keeps_the_profile(cache: Path) -> None:
    spec = _spec()
    before = copy.deepcopy(spec["linux"])
    assert asyncio.run(precompile(spec))
    program = _program(spec)
    returns = {k for code, _jt, _jf, k in program if code == BPF_RET_K}
    # The profile's two outcomes are in it: allow, and EPERM (its default action).
    assert SECCOMP_RET_ALLOW in returns
    assert SECCOMP_RET_ERRNO | EPERM in returns
    assert spec["linux"] == before  # the section stays (crun reads its flags)
    assert spec["annotations"]["keep"] == "me"
    assert [p.suffix for p in cache.iterdir()] == [".bpf"]  # no temporary directory left


def test_the_cache_answers_the_second_time(monkeypatch: pytest.MonkeyPatch) -> None:
    first = _spec()
    assert asyncio.run(precompile(first))

    async def no_compile(*_a: object) -> bytes:
        raise AssertionError("compiled again")

    monkeypatch.setattr(seccomp_bpf, "_compile", no_compile)
    second = _spec()
    assert asyncio.run(precompile(second))
    assert second["annotations"][BPF_ANNOTATION] == first["annotations"][BPF_ANNOTATION]


def test_different_profiles_different_programs() -> None:
    a, b = _spec(), _spec()
    b["linux"]["seccomp"]["defaultErrnoRet"] = 38  # ENOSYS
    assert asyncio.run(precompile(a)) and asyncio.run(precompile(b))
    assert a["annotations"][BPF_ANNOTATION] != b["annotations"][BPF_ANNOTATION]
    c = _spec()
    c["annotations"][FAIL_UNKNOWN_ANNOTATION] = "1"
    c["linux"]["seccomp"]["syscalls"].append({"names": ["no_such_syscall"],
                                              "action": "SCMP_ACT_ALLOW"})
    # crun refuses the unknown name when asked to: the host leaves it to the guest's crun,
    # which reports the error at create.
    assert not asyncio.run(precompile(c))
    assert BPF_ANNOTATION not in c["annotations"]


@pytest.mark.parametrize("change", [
    {"defaultAction": "SCMP_ACT_BOGUS"},
    {"listenerPath": "/run/notify.sock"},
    {"syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]},
])
def test_left_to_the_guest(change: dict[str, Any], cache: Path) -> None:
    spec = _spec({**default_profile(), **change})
    before = copy.deepcopy(spec)
    assert not asyncio.run(precompile(spec))
    assert spec == before
    assert not [p for p in cache.parent.rglob("compile-*")]


def test_a_callers_own_program_wins() -> None:
    spec = _spec()
    spec["annotations"][BPF_ANNOTATION] = "AAAA"
    assert not asyncio.run(precompile(spec))
    assert spec["annotations"][BPF_ANNOTATION] == "AAAA"


def test_no_profile_nothing_to_do() -> None:
    spec: dict[str, Any] = {"linux": {}}
    assert not asyncio.run(precompile(spec))
    assert spec == {"linux": {}}


def test_a_damaged_cache_entry_is_made_anew(cache: Path) -> None:
    first = _spec()
    assert asyncio.run(precompile(first))
    (entry,) = cache.iterdir()
    good = entry.read_bytes()
    entry.write_bytes(b"\x00" * 7)  # not a whole number of instructions
    spec = _spec()
    assert asyncio.run(precompile(spec))
    assert spec["annotations"][BPF_ANNOTATION] == first["annotations"][BPF_ANNOTATION]
    assert entry.read_bytes() == good
