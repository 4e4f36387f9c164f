"""Seccomp filters compiled on the host, so that the guest's crun need not compile them.

crun turns ``linux.seccomp`` into a BPF program with libseccomp at every ``create``. Under TCG
that costs the guest a good part of ``create`` (~0.1–0.2 s for podman's or our default profile),
and every container of a fresh clone pays it again. The host compiles it natively in ~10 ms
with the same crun, once per distinct profile, keeps the program in a cache, and hands it to the
guest's crun in crun's ``run.oci.seccomp_bpf_data`` annotation (the raw program, base64), which
crun then loads instead of compiling the profile; the ``seccomp`` section stays in the spec for
its flags. podman does the same with its own seccomp cache.

How the host compiles: ``crun create`` of a throw-away container (an empty root with one empty
executable, only a mount namespace, no cgroup) writes the program it made into the container's
state directory (``seccomp.bpf``, kept there for ``crun exec``). crun runs as PID 1 of a new PID
namespace (``unshare --pid --fork --kill-child``), so the container's init dies when crun exits
and nothing of it outlives the call, even if we are killed; the temporary directory is in the
owner journal until it is gone.

Only what came from the host is trusted: the cache holds programs the host's crun made, never
anything from a guest. Anything that stops the host from compiling (not root, no crun, a profile
crun refuses) leaves the spec as it was: the guest compiles it, and reports its errors, as
before.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uvmshim import hostpath, owners
from uvmshim.errors import UvmshimError
from uvmshim.tools import run_tool

log = logging.getLogger(__name__)

#: crun's annotation for a precompiled filter (base64 of the ``struct sock_filter`` array).
BPF_ANNOTATION = "run.oci.seccomp_bpf_data"
#: crun's annotation that makes unknown syscall names an error; it changes the compilation.
FAIL_UNKNOWN_ANNOTATION = "run.oci.seccomp_fail_unknown_syscall"
#: Largest program the kernel loads (BPF_MAXINSNS instructions of 8 bytes).
MAX_PROGRAM = 4096 * 8


def cache_dir() -> Path:
    return hostpath.cache_dir() / "seccomp"


def _crun() -> str | None:
    return shutil.which("crun")


def _key(seccomp: Mapping[str, Any], fail_unknown: str | None, crun: str) -> str:
    st = os.stat(crun)
    ident = {"seccomp": seccomp, "fail_unknown": fail_unknown,
             "crun": [crun, st.st_size, st.st_mtime_ns, st.st_ino]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _compilable(seccomp: Mapping[str, Any]) -> bool:
    """Whether the host may compile this profile for the guest: not one that hands a listener
    to a process (``SCMP_ACT_NOTIFY``, ``listenerPath``), which crun sets up around the load."""
    if seccomp.get("listenerPath") or seccomp.get("defaultAction") == "SCMP_ACT_NOTIFY":
        return False
    syscalls = seccomp.get("syscalls") or []
    return isinstance(syscalls, list) and not any(
        isinstance(s, dict) and s.get("action") == "SCMP_ACT_NOTIFY" for s in syscalls)


async def precompile(oci: dict[str, Any]) -> bool:
    """Add the compiled filter of ``oci``'s ``linux.seccomp`` to its annotations (in place).

    :return: whether it did (False: no profile, or the host cannot compile it; the guest will).
    """
    linux = oci.get("linux")
    seccomp = linux.get("seccomp") if isinstance(linux, dict) else None
    annotations = oci.get("annotations")
    if not isinstance(seccomp, dict) or not _compilable(seccomp):
        return False
    if isinstance(annotations, dict) and BPF_ANNOTATION in annotations:
        return False  # the caller brought its own program
    if os.geteuid() != 0:
        return False  # a PID namespace and crun's mounts need root
    crun = _crun()
    if crun is None:
        return False
    fail_unknown = annotations.get(FAIL_UNKNOWN_ANNOTATION) \
        if isinstance(annotations, dict) else None
    try:
        key = _key(seccomp, fail_unknown, crun)
        path = cache_dir() / f"{key}.bpf"
        try:
            program = path.read_bytes()
            _check(program)
        except (FileNotFoundError, UvmshimError):  # not there yet, or damaged: made anew
            program = await _compile(crun, seccomp, fail_unknown)
            _store(path, program)
    except (OSError, UvmshimError) as err:
        log.debug("seccomp profile not precompiled (the guest compiles it): %s", err)
        return False
    oci["annotations"] = {**(annotations if isinstance(annotations, dict) else {}),
                          BPF_ANNOTATION: base64.b64encode(program).decode()}
    return True


def _check(program: bytes) -> None:
    if not program or len(program) % 8 or len(program) > MAX_PROGRAM:
        raise UvmshimError(f"not a seccomp program: {len(program)} bytes")


def _store(path: Path, program: bytes) -> None:
    _check(program)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(program)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def _compile(crun: str, seccomp: Mapping[str, Any], fail_unknown: str | None) -> bytes:
    """The program the host's crun makes of ``seccomp`` (see the module's docstring)."""
    base = cache_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix="compile-"))
    owners.acquire(owners.DIR, work)
    try:
        root = work / "rootfs"
        for d in ("dev", "proc"):
            (root / d).mkdir(parents=True)
        (root / "init").touch(mode=0o755)
        spec: dict[str, Any] = {
            "ociVersion": "1.0.2",
            "process": {"args": ["/init"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": []},
            "root": {"path": str(root), "readonly": True},
            "mounts": [],
            "linux": {"namespaces": [{"type": "mount"}], "seccomp": seccomp},
        }
        if fail_unknown is not None:
            spec["annotations"] = {FAIL_UNKNOWN_ANNOTATION: fail_unknown}
        (work / "config.json").write_text(json.dumps(spec))
        await run_tool(["unshare", "--pid", "--fork", "--kill-child", crun,
                        "--cgroup-manager=disabled", "--root", str(work / "state"),
                        "create", "--bundle", str(work), "compile"])
        return (work / "state" / "compile" / "seccomp.bpf").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not work.exists():
            owners.release(owners.DIR, work)
