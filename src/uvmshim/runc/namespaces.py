"""Namespace paths in a runtime spec: joining another uvmshim container, or a clear error.

A container's processes live in a utility VM; a host namespace (``/proc/<pid>/ns/ipc``,
``/run/netns/x``) means nothing there. What engines pass, though, is mostly a path into
*another container of this runtime*: podman pods and CRI sandboxes give every member the infra
container's namespaces as ``/proc/<its pid>/ns/<type>``, and its pid is that container's shim.
Such a container joins the other one's UVM (as a pod member, :func:`uvmshim.runc.create`), and
each of those paths becomes ``container://<id>``, which the guest agent resolves to the same
namespace of that container's init in the guest.

Network namespace paths that do not point at a uvmshim container are left as they are: the
networking code keeps them on the host side. Any other host namespace path is an error at
``create``.

Imported by ``create`` only.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

from uvmshim.errors import UvmshimError
from uvmshim.protocol.constants import CONTAINER_NS_PREFIX
from uvmshim.runc.state import ContainerDir, list_ids, shim_alive
from uvmshim.spec import Spec

_PROC_NS = re.compile(r"/proc/(\d+)/ns/[a-z_]+")


def _owner(root: str, pid: int) -> str | None:
    """The id of the live container of ``root`` whose shim (or pod-member process) is ``pid``.

    A pod member's recorded pid stands for it on the host; its namespaces are the sandbox's
    (it joined them), so the sandbox's id is returned for it.
    """
    for cid in list_ids(root):
        try:
            st = ContainerDir.of(root, cid).read()
        except UvmshimError:
            continue
        if st.get("pid") == pid and st.get("status") != "stopped" and shim_alive(st):
            sandbox = st.get("sandbox")
            return str(sandbox) if sandbox else cid
    return None


def join_target(root: str, spec: Spec) -> tuple[str | None, Spec]:
    """The container whose UVM ``spec``'s namespace paths ask to join (None: no such path),
    and the spec with those paths rewritten to ``container://<id>``.

    :raises UvmshimError: a path names a host namespace (not one of this runtime's
        containers), or paths name two different containers.
    """
    linux = spec.linux or {}
    namespaces = linux.get("namespaces")
    if not isinstance(namespaces, list):
        return None, spec
    target: str | None = None
    out: list[Any] = []
    for i, ns in enumerate(namespaces):
        path = ns.get("path") if isinstance(ns, dict) else None
        if not isinstance(path, str) or not path:
            out.append(ns)
            continue
        kind = str(ns.get("type", ""))
        where = f"linux.namespaces[{i}].path"
        m = _PROC_NS.fullmatch(os.path.normpath(path))
        owner = _owner(root, int(m.group(1))) if m else None
        if owner is None:
            if kind == "network":  # host networking's business (uvmshim.uvm.hostnet)
                out.append(ns)
                continue
            raise UvmshimError(
                f"the {kind} namespace {path} is a host namespace: a container in a utility "
                f"VM can only join the namespaces of another uvmshim container", where=where,
                hint="leave the path out (the container gets its own namespace in its VM), "
                     "or give /proc/<pid>/ns/<type> of a container of this runtime (its pid "
                     "from `state`)")
        if target is not None and owner != target:
            raise UvmshimError(f"namespace paths name two containers ({target}, {owner}): a "
                               f"container can join one other container's VM", where=where)
        target = owner
        out.append({**ns, "path": f"{CONTAINER_NS_PREFIX}{owner}"})
    if target is None:
        return None, spec
    return target, replace(spec, linux={**linux, "namespaces": out})
