"""Kernel modules: which ones the UVM needs, their dependency order, idempotent loading.

STDLIB ONLY. The pure parts (:func:`parse_modules_dep`, :func:`parse_modinfo`,
:func:`load_order`) are also used on the host by the boot-file builder, so the module set is
defined once, here.

In the guest the initrd holds every module flat as ``/lib/modules/<name>.ko`` plus
``/etc/uvmshim/modules.json`` (``{"deps": {name: [direct deps]}}``) written at build time.
Only ``EARLY_MODULES`` are loaded by /init before the agent starts; everything else is loaded by
the first request that needs it (loading all of them up front costs ~0.5 s of boot under TCG).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence

from uvmshim.agent.util import AgentError, run

#: Loaded by /init before the agent starts: the agent needs its virtio-serial port.
EARLY_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_console")

#: Modules a request kind needs, in load order (dependencies are added automatically).
#: crc32c_generic is listed explicitly because ext4/xfs/erofs ask for "crc32c" through the
#: crypto API at mount time, which modules.dep does not record (mount fails without it).
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "scsi": ("virtio_scsi", "sd_mod"),
    "ext4": ("crc32c_generic", "ext4"),
    "xfs": ("crc32c_generic", "xfs"),
    "erofs": ("crc32c_generic", "erofs"),
    "9p": ("9pnet_virtio", "9p"),
    "overlay": ("overlay",),
    "pmem": ("virtio_pmem", "nd_pmem"),
    "dm-verity": ("dm_mod", "dm_verity"),
    "rng": ("virtio_rng",),
    "net": ("virtio_net",),
}


def all_wanted() -> list[str]:
    """Every module the initrd must ship (before dependency closure)."""
    names = list(EARLY_MODULES)
    for group in MODULE_GROUPS.values():
        names += [n for n in group if n not in names]
    return names


def module_name(path: str) -> str:
    """``kernel/fs/ext4/ext4.ko.xz`` → ``ext4``; ``crc-t10dif.ko`` → ``crc_t10dif``."""
    base = os.path.basename(path)
    base = base.split(".ko", 1)[0]
    # The kernel treats '-' and '_' in module names alike and shows '_' in /sys/module.
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse depmod's ``modules.dep``: ``{name: [dependency names as listed]}``."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[module_name(mod.strip())] = [module_name(d) for d in rest.split()]
    return deps


def parse_modinfo(section: bytes) -> dict[str, list[str]]:
    """Parse a ``.modinfo`` ELF section (NUL-separated ``key=value``) into ``{key: [values]}``."""
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode("utf-8", errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def modinfo_depends(info: Mapping[str, Sequence[str]]) -> list[str]:
    """The direct dependencies named by a module's ``depends=`` modinfo entry."""
    out: list[str] = []
    for value in info.get("depends", ()):
        out += [module_name(d) for d in value.split(",") if d]
    return out


def load_order(deps: Mapping[str, Sequence[str]], wanted: Iterable[str]) -> list[str]:
    """Return ``wanted`` plus their dependencies, each after everything it depends on.

    :raises KeyError: for a module (or dependency) missing from ``deps``.
    :raises ValueError: on a dependency cycle.
    """
    order: list[str] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(name: str) -> None:
        name = module_name(name)
        if name in done:
            return
        if name in active:
            raise ValueError(f"module dependency cycle through {name}")
        if name not in deps:
            raise KeyError(name)
        active.add(name)
        # modules.dep lists the dependencies of the first one last; visiting in reverse keeps
        # the classic modprobe order (not required for correctness: every module is visited
        # after its own dependencies anyway).
        for dep in reversed(deps[name]):
            visit(dep)
        active.discard(name)
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


class ModuleLoader:
    """Loads initrd modules on demand; loading an already loaded module is a no-op.

    :param moddir: where ``<name>.ko`` files live.
    :param table: the build-time JSON dependency table.
    :param sysfs: sysfs root (``/sys/module/<name>`` tells whether a module is loaded).
    """

    def __init__(self, moddir: str = "/lib/modules",
                 table: str = "/etc/uvmshim/modules.json", sysfs: str = "/sys") -> None:
        self._moddir = moddir
        self._table_path = table
        self._sysfs = sysfs
        self._deps: dict[str, list[str]] | None = None
        # One lock for all loads: insmod is quick, and serialising avoids two threads racing
        # to insert the same dependency (EEXIST) or a module before its dependency is live.
        self._lock = threading.Lock()

    def _table(self) -> dict[str, list[str]]:
        if self._deps is None:
            try:
                with open(self._table_path, encoding="utf-8") as f:
                    self._deps = {k: list(v) for k, v in json.load(f)["deps"].items()}
            except (OSError, ValueError, KeyError) as err:
                raise AgentError(f"cannot read module table {self._table_path}: {err}") from err
        return self._deps

    def is_loaded(self, name: str) -> bool:
        """True if module ``name`` is live in the kernel."""
        try:
            with open(f"{self._sysfs}/module/{name}/initstate", encoding="ascii") as f:
                return f.read().strip() == "live"
        except OSError:
            return False

    def ensure(self, *names: str) -> None:
        """Load ``names`` and their dependencies unless already loaded.

        A name absent from the table is taken as built into the kernel (the builder checked).

        :raises AgentError: if insmod fails.
        """
        with self._lock:
            table = self._table()
            wanted = [module_name(n) for n in names if module_name(n) in table]
            for mod in load_order(table, wanted):
                if self.is_loaded(mod):
                    continue
                try:
                    run(["insmod", f"{self._moddir}/{mod}.ko"])
                except AgentError as err:
                    if "File exists" in str(err) or self.is_loaded(mod):
                        continue
                    raise AgentError(f"insmod {mod}: {err}") from None

    def ensure_group(self, *groups: str) -> None:
        """Load the modules of each named :data:`MODULE_GROUPS` entry."""
        names: list[str] = []
        for group in groups:
            names += MODULE_GROUPS[group]
        self.ensure(*names)
