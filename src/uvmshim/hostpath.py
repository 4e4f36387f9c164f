"""Every host directory uvmshim uses, and what overrides it, in one place.

The host counterpart of :mod:`uvmshim.guestpath`. Each function reads the environment when it is
called (not at import), so an override set by a parent process or a test always applies.

* **OCI runtime root** (:func:`runtime_root`): ``--root``, else ``$UVMSHIM_ROOT``, else
  ``/run/uvmshim`` for every user. Container ``<id>``'s state is ``<root>/containers/<id>/``.
* **VM state directories** (:func:`vm_dir`): ``$UVMSHIM_VM_DIR``, else ``/run/uvmshim/vm`` as
  root, else ``$XDG_RUNTIME_DIR/uvmshim/vm`` if that directory exists, else
  ``/tmp/uvmshim-<uid>/vm``. The KVM probe's verdict is kept beside it (``../kvm-probe.json``).
* **Pod daemons** (:func:`pods_dir`): ``$UVMSHIM_POD_DIR``, else ``/run/uvmshim/pods``.
* **Scratch disks of** ``run --image`` (:func:`scratch_dir`): ``/run/uvmshim/scratch`` as root,
  else ``<temp dir>/uvmshim-<uid>-scratch`` (``$TMPDIR``, else ``/tmp``). No override.
* **Image store** (:func:`image_store_dir`): ``$UVMSHIM_IMAGE_ROOT``, else
  ``/var/lib/uvmshim/images`` as root, else ``${XDG_DATA_HOME:-~/.local/share}/uvmshim/images``.
* **Boot file cache** (:func:`cache_dir`): ``${XDG_CACHE_HOME:-~/.cache}/uvmshim``.
* **Owners' journals** (:func:`owners_dir`): ``$UVMSHIM_OWNERS_DIR``, else ``/run/uvmshim/owners``
  as root, else beside the default VM state directories; a registry of the directories used
  (``places``) beside it.
* **UVM templates** (:func:`template_dir`): ``$UVMSHIM_TEMPLATE_DIR``, else
  ``<boot file cache>/templates``. One directory per template key; like the boot files, they
  outlive every VM (see :mod:`uvmshim.uvm.qemu.template`).

The containers, pods and scratch directories hold entries only while something runs, as the VM
state directories do; :func:`transient_dirs` names the first three for ``uvmshim leaks``, which
lists the VM state directories on their own.

STDLIB ONLY: imported by every CLI call.
"""

from __future__ import annotations

import os
from pathlib import Path

from uvmshim.errors import UvmshimError

#: Overrides the OCI runtime's state root (runc's ``--root``).
ROOT_ENV = "UVMSHIM_ROOT"
#: Overrides the parent of the VM state directories.
VM_DIR_ENV = "UVMSHIM_VM_DIR"
#: Overrides the parent of the pod daemons' directories.
POD_DIR_ENV = "UVMSHIM_POD_DIR"
#: Overrides the image store root.
IMAGE_ROOT_ENV = "UVMSHIM_IMAGE_ROOT"
#: Overrides the directory of the owners' journals.
OWNERS_DIR_ENV = "UVMSHIM_OWNERS_DIR"
#: Overrides the UVM template directory.
TEMPLATE_DIR_ENV = "UVMSHIM_TEMPLATE_DIR"

#: The runtime root (and parent of the other run-time directories) as root.
RUN_DIR = Path("/run/uvmshim")


def _is_root() -> bool:
    return os.geteuid() == 0


def runtime_root() -> Path:
    """The OCI runtime's state root: ``$UVMSHIM_ROOT``, else ``/run/uvmshim`` (for every user)."""
    return Path(os.environ.get(ROOT_ENV) or RUN_DIR)


def containers_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/containers``: one state directory per OCI runtime container.

    :param root: the runtime root (``--root``); default :func:`runtime_root`.
    """
    return (Path(root) if root is not None else runtime_root()) / "containers"


def _run_subdir(name: str, env_var: str) -> Path:
    """``$<env_var>``, else ``/run/uvmshim/<name>`` as root, else
    ``$XDG_RUNTIME_DIR/uvmshim/<name>`` if that directory exists, else
    ``/tmp/uvmshim-<uid>/<name>``."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    if _is_root():
        return RUN_DIR / name
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "uvmshim" / name
    return Path(f"/tmp/uvmshim-{os.geteuid()}") / name


def vm_dir() -> Path:
    """The parent of the VM state directories (see the module docstring)."""
    return _run_subdir("vm", VM_DIR_ENV)


def owners_dir() -> Path:
    """The owners' journals (:mod:`uvmshim.owners`): ``$UVMSHIM_OWNERS_DIR``, else
    ``/run/uvmshim/owners`` as root, else ``$XDG_RUNTIME_DIR/uvmshim/owners`` if that
    directory exists, else ``/tmp/uvmshim-<uid>/owners``. Not moved by the other overrides:
    every process of a user finds every other's journal, wherever its resources are."""
    return _run_subdir("owners", OWNERS_DIR_ENV)


def kvm_probe_cache() -> Path:
    """The cached KVM-or-TCG verdict of this host boot, beside the VM state directories."""
    return vm_dir().parent / "kvm-probe.json"


def pods_dir() -> Path:
    """The parent of the pod daemons' directories: ``$UVMSHIM_POD_DIR``, else
    ``/run/uvmshim/pods``."""
    return Path(os.environ.get(POD_DIR_ENV) or RUN_DIR / "pods")


def pod_dir(name: str) -> Path:
    """``<pods dir>/<name>``: pod ``name``'s directory (socket, log, ready file).

    :raise UvmshimError: ``name`` is not usable as a directory name.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UvmshimError(f"bad pod name {name!r}", hint="use letters, digits, - and _")
    return pods_dir() / name


def scratch_dir() -> Path:
    """The parent of ``run --image`` containers' scratch disks (see the module docstring)."""
    if _is_root():
        return RUN_DIR / "scratch"
    import tempfile  # only here: the OCI runtime's CLI never needs it

    return Path(tempfile.gettempdir()) / f"uvmshim-{os.geteuid()}-scratch"


def image_store_dir() -> Path:
    """The image store root: ``$UVMSHIM_IMAGE_ROOT``, else ``/var/lib/uvmshim/images`` as
    root, else ``${XDG_DATA_HOME:-~/.local/share}/uvmshim/images``."""
    env = os.environ.get(IMAGE_ROOT_ENV)
    if env:
        return Path(env)
    if _is_root():
        return Path("/var/lib/uvmshim/images")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "uvmshim" / "images"


def cache_dir() -> Path:
    """The boot file cache: ``${XDG_CACHE_HOME:-~/.cache}/uvmshim``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "uvmshim"


def template_dir() -> Path:
    """The UVM templates: ``$UVMSHIM_TEMPLATE_DIR``, else ``<cache_dir()>/templates``."""
    env = os.environ.get(TEMPLATE_DIR_ENV)
    return Path(env) if env else cache_dir() / "templates"


def transient_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories whose entries exist only while something runs, besides the VM state
    directories: the ``run --image`` scratch directory, the pods directory and the OCI runtime's
    containers directory (under ``root``, default :func:`runtime_root`). Without duplicates.
    """
    found: list[Path] = []
    for d in (scratch_dir(), pods_dir(), containers_dir(root)):
        if d not in found:
            found.append(d)
    return found
