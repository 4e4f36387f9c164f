"""OCI hooks: which run on the host, which in the guest, and running the host's.

The host runs the hooks that the runtime spec calls in the *runtime namespace*:

``prestart`` (deprecated) and ``createRuntime``
    At ``create``, in the shim, once the guest's ``crun create`` has made the container (its
    init exists and waits), before ``create`` reports. A failure fails ``create``: the
    container is deleted and nothing is left (runc's behaviour).
``poststart``
    At ``start``, once the init runs, before ``start`` returns. A failure fails ``start``
    and the container is killed (runc's behaviour; the runtime spec only asks for a warning
    here, but engines and runc users expect the error).
``poststop``
    At ``delete``, after the container and its UVM are gone. Failures are only warned.

Each hook gets the OCI state (``ociVersion``, ``id``, ``status``, ``pid``, ``bundle``,
``annotations``) on its stdin, runs ``path`` with exactly ``args`` (``args[0]`` is its
``argv[0]``) and exactly ``env``, and is killed after ``timeout`` seconds (an error). Its
output is captured and quoted in the error.

``createContainer`` and ``startContainer`` are called in the *container namespace*: the guest's
crun runs them (they stay in the guest's document, :mod:`uvmshim.allocator`); the host only
checks them (:func:`check`); :func:`uvmshim.allocator.guest_hooks` makes a ``createContainer``
path resolve in the container's root, as the host's runtime namespace means nothing in the UVM.

Used by the runc path (``create`` checks, the shim runs the host hooks, ``delete`` runs
``poststop``) and by ``uvmshim run --bundle`` (:func:`uvmshim.runtime.oneshot.run_container`,
the same points of the lifecycle in one process); the agent never sees this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from uvmshim.errors import UvmshimError

log = logging.getLogger(__name__)

#: Run on the host, in this order at their points of the lifecycle.
HOST_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
#: What ``features`` reports.
ALL_HOOKS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
             "poststop")


class HookError(UvmshimError):
    """A hook is malformed, failed or timed out."""


def check(hooks: Mapping[str, Any] | None, rootfs: str = "") -> None:
    """Validate every hook of the spec (at ``create``, before anything is started).

    :param rootfs: the container's root on the host, if it is a directory there: a guest hook
        must exist in it (it is looked up in the container's root in the guest).
    :raises HookError: a malformed hook, or a guest hook that does not exist in the root.
    """
    if not hooks:
        return
    from uvmshim.allocator import GUEST_HOOKS

    for name, entries in hooks.items():
        where = f"hooks.{name}"
        if name not in ALL_HOOKS:
            raise HookError(f"unknown hook kind {name!r}", where="hooks",
                            hint=f"one of {', '.join(ALL_HOOKS)}")
        if not isinstance(entries, list):
            raise HookError("expected a list of hooks", where=where)
        for i, hook in enumerate(entries):
            _check_one(hook, f"{where}[{i}]")
            if name in GUEST_HOOKS and rootfs and os.path.isdir(rootfs):
                _check_in_root(rootfs, str(hook["path"]), f"{where}[{i}].path")


def _check_one(hook: Any, where: str) -> None:
    if not isinstance(hook, dict):
        raise HookError("expected an object", where=where)
    path = hook.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise HookError("a hook's path must be an absolute path", where=f"{where}.path")
    for key in ("args", "env"):
        value = hook.get(key)
        if value is not None and not (isinstance(value, list) and
                                      all(isinstance(v, str) for v in value)):
            raise HookError("expected a list of strings", where=f"{where}.{key}")
    timeout = hook.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or
                                timeout <= 0):
        raise HookError("a hook's timeout must be a positive number of seconds",
                        where=f"{where}.timeout")


def _check_in_root(rootfs: str, path: str, where: str) -> None:
    """``path`` exists in ``rootfs`` (absolute symlinks followed inside the root)."""
    current = rootfs
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = rootfs if current == rootfs else os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate) and hops < 40:
            hops += 1
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = rootfs
            parts = [p for p in target.split("/") if p] + parts
            continue
        current = candidate
    if not os.path.exists(current):
        raise HookError(f"the hook {path} does not exist in the container's root", where=where,
                        hint="createContainer and startContainer hooks run in the container's "
                             "namespaces in the utility VM: their path is looked up in the "
                             "container's root filesystem")


def hook_state(state: Mapping[str, Any], status: str) -> bytes:
    """The OCI state a hook gets on stdin."""
    doc = {"ociVersion": state.get("ociVersion", "1.0.2"), "id": state.get("id"),
           "status": status, "pid": state.get("pid") or 0, "bundle": state.get("bundle", ""),
           "annotations": state.get("annotations") or {}}
    return json.dumps(doc).encode()


def _argv(hook: Mapping[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    path = str(hook["path"])
    args = list(hook.get("args") or [path])
    env = dict(e.split("=", 1) if "=" in e else (e, "") for e in hook.get("env") or [])
    return path, args, env


def _failure(name: str, i: int, path: str, what: str, out: bytes, err: bytes) -> HookError:
    text = f"error running {name} hook #{i} ({path}): {what}"
    if out.strip():
        text += f", stdout: {out.decode(errors='replace').strip()}"
    if err.strip():
        text += f", stderr: {err.decode(errors='replace').strip()}"
    return HookError(text)


async def run_hooks(hooks: Mapping[str, Any] | None, name: str, state: Mapping[str, Any],
                    status: str) -> None:
    """Run the ``name`` hooks one after another, each with the state on stdin.

    :raises HookError: the first that fails (exits non-zero, cannot run, times out).
    """
    data = hook_state(state, status)
    for i, hook in enumerate((hooks or {}).get(name) or []):
        await _run_one(name, i, hook, data)


async def run_create_hooks(hooks: Mapping[str, Any] | None, state: Mapping[str, Any]) -> None:
    """``prestart`` then ``createRuntime`` (status ``creating``): the container exists in the
    guest and waits.

    :raises HookError: the first that fails; the caller deletes the container.
    """
    for name in ("prestart", "createRuntime"):
        await run_hooks(hooks, name, state, "creating")


async def run_hooks_warn(hooks: Mapping[str, Any] | None, name: str,
                         state: Mapping[str, Any], status: str) -> list[str]:
    """Run every ``name`` hook (``poststop``) even if one fails; return the failures (they
    are only warnings: the caller shows them)."""
    problems = []
    data = hook_state(state, status)
    for i, hook in enumerate((hooks or {}).get(name) or []):
        try:
            await _run_one(name, i, hook, data)
        except HookError as err:
            problems.append(str(err))
    return problems


async def _run_one(name: str, i: int, hook: Mapping[str, Any], data: bytes) -> None:
    path, args, env = _argv(hook)
    try:
        proc = await asyncio.create_subprocess_exec(
            args[0], *args[1:], executable=path, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as err:
        raise _failure(name, i, path, err.strerror or str(err), b"", b"") from None
    timeout = hook.get("timeout")
    try:
        out, err_out = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise _failure(name, i, path, f"timed out after {timeout} s", b"", b"") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise _failure(name, i, path, f"exit status {proc.returncode}", out, err_out)


def run_hooks_sync(hooks: Mapping[str, Any] | None, name: str, state: Mapping[str, Any],
                   status: str) -> list[str]:
    """:func:`run_hooks_warn` for callers without an event loop (``poststop``, from
    ``delete``); each failure is also logged (they are only warnings)."""
    problems = asyncio.run(run_hooks_warn(hooks, name, state, status))
    for p in problems:
        log.warning("%s", p)
    return problems
