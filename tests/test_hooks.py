"""OCI hooks on the host (uvmshim.runtime.hooks): checks, stdin state, args, env, timeout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from uvmshim.errors import UvmshimError
from uvmshim.runtime.hooks import (
    HookError,
    check,
    run_create_hooks,
    run_hooks,
    run_hooks_sync,
    run_hooks_warn,
)

STATE = {"ociVersion": "1.0.2", "id": "c1", "pid": 42, "bundle": "/b",
         "annotations": {"a": "b"}, "vm_id": "private"}


def _hook(script: str, **extra: object) -> dict[str, object]:
    return {"path": "/bin/sh", "args": ["hook-name", "-c", script], **extra}


def test_state_args_env_and_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_LEAK", "leaked")
    out = tmp_path / "out"
    hooks = {"poststart": [
        _hook(f'cat > {out}.json; echo "$0 $FOO ${{HOOK_LEAK:-none}}" >> {out}', env=["FOO=bar"]),
        _hook(f"echo second >> {out}")]}
    asyncio.run(run_hooks(hooks, "poststart", STATE, "running"))
    assert json.loads(Path(f"{out}.json").read_text()) == {
        "ociVersion": "1.0.2", "id": "c1", "status": "running", "pid": 42, "bundle": "/b",
        "annotations": {"a": "b"}}  # the OCI state, nothing private
    assert out.read_text() == "hook-name bar none\nsecond\n"  # exactly env; args[0] is argv0


def test_failure_and_timeout_fail_and_stop_the_list(tmp_path: Path) -> None:
    never = tmp_path / "never"
    hooks = {"createRuntime": [_hook("echo out; echo bad >&2; exit 3"), _hook(f"touch {never}")]}
    with pytest.raises(HookError, match=r"createRuntime hook #0 .*exit status 3.*stdout: out.*"
                                        r"stderr: bad"):
        asyncio.run(run_hooks(hooks, "createRuntime", STATE, "creating"))
    assert not never.exists()
    with pytest.raises(HookError, match="timed out after 1 s"):
        asyncio.run(run_hooks({"prestart": [_hook("sleep 30", timeout=1)]}, "prestart",
                              STATE, "creating"))
    with pytest.raises(HookError, match="#0 .*/no/such"):
        asyncio.run(run_hooks({"prestart": [{"path": "/no/such"}]}, "prestart", STATE, "c"))


def test_poststop_failures_are_warnings(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    problems = run_hooks_sync({"poststop": [_hook("exit 1"), _hook(f"cat > {ran}")]},
                              "poststop", STATE, "stopped")
    assert len(problems) == 1 and "exit status 1" in problems[0]
    assert json.loads(ran.read_text())["status"] == "stopped"  # the next one still ran


def test_create_hooks_and_async_poststop(tmp_path: Path) -> None:
    """What ``uvmshim run`` and the shim share: prestart then createRuntime ("creating");
    poststop runs every hook and returns the failures."""
    order = tmp_path / "order"
    hooks = {name: [_hook(f'cat > {tmp_path}/{name}.json; echo {name} >> {order}')]
             for name in ("createRuntime", "prestart")}
    asyncio.run(run_create_hooks(hooks, STATE))
    assert order.read_text() == "prestart\ncreateRuntime\n"
    assert json.loads((tmp_path / "createRuntime.json").read_text())["status"] == "creating"
    ran = tmp_path / "ran"
    problems = asyncio.run(run_hooks_warn(
        {"poststop": [_hook("echo no >&2; exit 2"), _hook(f"cat > {ran}")]}, "poststop",
        STATE, "stopped"))
    assert len(problems) == 1 and "poststop hook #0" in problems[0] and \
        "exit status 2, stderr: no" in problems[0]
    assert json.loads(ran.read_text())["status"] == "stopped"


@pytest.mark.parametrize(("hooks", "where"), [
    ({"prestart": [{"path": "rel"}]}, "hooks.prestart[0].path"),
    ({"poststop": [{"path": "/x", "timeout": 0}]}, "hooks.poststop[0].timeout"),
    ({"poststop": [{"path": "/x", "args": [1]}]}, "hooks.poststop[0].args"),
    ({"bogus": []}, "hooks"),
    ({"startContainer": [{"path": "/bin/missing"}]}, "hooks.startContainer[0].path"),
])
def test_bad_hooks_are_refused(tmp_path: Path, hooks: dict[str, object], where: str) -> None:
    (tmp_path / "bin").mkdir()
    with pytest.raises(UvmshimError) as err:
        check(hooks, str(tmp_path))
    assert err.value.where == where


def test_guest_hook_found_through_absolute_symlink(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_text("")
    (tmp_path / "bin" / "sh").symlink_to("/bin/busybox")  # absolute: inside the root
    check({"createContainer": [{"path": "/bin/sh"}]}, str(tmp_path))
