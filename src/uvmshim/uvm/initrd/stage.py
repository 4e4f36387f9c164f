"""Assemble the initrd tree from unpacked Debian packages (synchronous filesystem work).

The recipe (measured; ``docs/design.md``, section 5): copy 18 packages whole, delete what the
guest never runs (docs, gconv, most of /usr/bin, optional stdlib parts and extension
modules), keep only the shared libraries reachable through DT_NEEDED from what is left, add
busybox applet links, kernel modules, our agent, /init, and precompiled sourceless .pyc.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from uvmshim.agent import kmods
from uvmshim.errors import UvmshimError
from uvmshim.uvm.initrd.elf import ElfFile, is_elf

PY = "python3.11"
STDLIB = f"usr/lib/{PY}"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64")

#: Kept in /usr/bin and /bin (besides busybox applets).
KEEP_BINARIES = {"usr/bin/python3.11", "usr/bin/crun", "bin/busybox"}

#: Whole paths removed from the staged tree.
REMOVE_PATHS = (
    "usr/share", "usr/lib/x86_64-linux-gnu/gconv", "etc/python3.11", "sbin/ldconfig",
    "usr/lib/python3", "usr/include",
)

#: Stdlib parts the agent (and anyone running a diagnostic script) never needs.
REMOVE_STDLIB = (
    "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3",
    "pydoc_data", "pydoc.py", "doctest.py", "distutils", "venv", "unittest", "__phello__",
    "sqlite3", "curses", "dbm", "ctypes", "site-packages", "dist-packages",
    "sitecustomize.py",  # a symlink into the removed /etc/python3.11
)

#: Extension modules dropped (by name prefix): they need libraries we do not ship.
REMOVE_DYNLOAD = (
    "_test", "xx", "_ctypes", "audioop", "ossaudiodev", "_codecs_", "_multibytecodec", "_ssl",
    "_hashlib", "_bz2", "_crypt", "_curses", "_dbm", "_sqlite3", "_uuid", "nis", "readline",
    "_tkinter", "_gdbm",
)

#: Not in any DT_NEEDED, but glibc dlopens it for pthread_exit (threads exiting abort without).
ALWAYS_KEEP_LIBS = ("libgcc_s.so.1",)


def _rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def merge_packages(unpacked: Iterable[Path], stage: Path) -> None:
    """Copy each unpacked package tree into ``stage`` (symlinks kept as symlinks)."""
    for pkg in unpacked:
        shutil.copytree(pkg, stage, symlinks=True, dirs_exist_ok=True)


def strip_tree(stage: Path) -> None:
    """Delete everything the guest does not need (see the module docstring)."""
    for rel in REMOVE_PATHS:
        _rm(stage / rel)
    for bindir in ("usr/bin", "bin", "usr/sbin", "sbin"):
        d = stage / bindir
        if d.is_dir():
            for entry in d.iterdir():
                if f"{bindir}/{entry.name}" not in KEEP_BINARIES:
                    _rm(entry)
    for path in list(stage.rglob("*.a")):
        path.unlink()  # libcrun.a ships inside the crun package
    std = stage / STDLIB
    for rel in REMOVE_STDLIB:
        _rm(std / rel)
    for cfg in std.glob("config-3.11-*"):
        _rm(cfg)
    for tests in [*std.rglob("test"), *std.rglob("tests")]:
        if tests.is_dir():
            _rm(tests)
    dyn = std / "lib-dynload"
    for so in dyn.glob("*.so"):
        if so.name.startswith(REMOVE_DYNLOAD):
            so.unlink()


def _lib_index(stage: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for d in LIB_DIRS:
        for p in sorted((stage / d).glob("*.so*")) if (stage / d).is_dir() else ():
            index.setdefault(p.name, p)
    return index


def prune_libs(stage: Path) -> list[str]:
    """Keep only libraries reachable through DT_NEEDED from the kept binaries and extensions.

    :returns: the kept library names.
    :raises UvmshimError: if a NEEDED soname is missing from the tree.
    """
    index = _lib_index(stage)
    roots = [stage / b for b in KEEP_BINARIES if (stage / b).exists()]
    roots += sorted((stage / STDLIB / "lib-dynload").glob("*.so"))
    keep: set[str] = set(ALWAYS_KEEP_LIBS) | {"ld-linux-x86-64.so.2"}
    todo = [r for r in roots if is_elf(str(r))]
    todo += [index[n] for n in keep if n in index]
    seen: set[Path] = set()
    missing: list[str] = []
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for soname in ElfFile.open(str(path)).needed():
            if soname not in index:
                missing.append(f"{soname} (needed by {path.relative_to(stage.resolve())})")
                continue
            keep.add(soname)
            todo.append(index[soname])
    if missing:
        raise UvmshimError("initrd is missing shared libraries: " + ", ".join(sorted(missing)))
    kept_files = {index[n].resolve() for n in keep if n in index}
    for name, path in index.items():
        if name in keep or path.resolve() in kept_files:
            continue
        path.unlink()
    return sorted(keep)


def add_busybox_links(stage: Path, listing: str) -> None:
    """Create the busybox applet symlinks at build time (cheaper than ``--install`` at boot).

    :param listing: the output of ``bin/busybox --list-full`` (``bin/sh``, ``usr/bin/awk``...).
    """
    for rel in listing.split():
        link = stage / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def add_base_files(stage: Path, init_script: bytes) -> None:
    """/init, mount points, /etc/passwd and /etc/group, the python3 symlink."""
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc/uvmshim", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    os.chmod(stage / "tmp", 0o1777)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                      "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (stage / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    py3 = stage / "usr/bin/python3"
    if not py3.is_symlink():
        py3.symlink_to(PY)
    init = stage / "init"
    init.write_bytes(init_script)
    init.chmod(0o755)


def add_agent(stage: Path, package_dir: Path) -> None:
    """Copy ``uvmshim.protocol`` and ``uvmshim.agent`` into the guest's stdlib directory.

    The stdlib directory is on sys.path even under ``-I``; a bare ``uvmshim/__init__.py``
    replaces the host package's, so nothing host-side is shipped.
    """
    dest = stage / STDLIB / "uvmshim"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "__init__.py").write_text('"""uvmshim guest side: the agent and its protocol."""\n')
    for sub in ("protocol", "agent"):
        (dest / sub).mkdir(exist_ok=True)
        for src in sorted((package_dir / sub).glob("*.py")):
            shutil.copy2(src, dest / sub / src.name)


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    return data


def add_kernel_modules(stage: Path, modroot: Path) -> dict[str, list[str]]:
    """Copy the needed modules (``kmods.all_wanted()`` + dependencies) flat into /lib/modules.

    Dependencies come from each module's ``.modinfo`` ``depends=`` (the kernel package ships
    no modules.dep: depmod creates it at install time, and we never install).

    :returns: the dependency table written to ``/etc/uvmshim/modules.json``.
    :raises UvmshimError: if a needed module is neither shipped nor built in.
    """
    files: dict[str, Path] = {}
    for p in (modroot / "kernel").rglob("*.ko*"):
        if p.name.endswith((".ko", ".ko.xz")):
            files[kmods.module_name(p.name)] = p
    builtin_path = modroot / "modules.builtin"
    builtin = {kmods.module_name(line) for line in builtin_path.read_text().split()} \
        if builtin_path.exists() else set()
    deps: dict[str, list[str]] = {}
    blobs: dict[str, bytes] = {}
    todo = [n for n in kmods.all_wanted()]
    while todo:
        name = todo.pop()
        if name in deps or name in builtin:
            continue
        if name not in files:
            raise UvmshimError(f"kernel module {name} not found in {modroot}")
        blob = _read_module(files[name])
        section = ElfFile(blob).section(".modinfo") or b""
        deps[name] = [d for d in kmods.modinfo_depends(kmods.parse_modinfo(section))
                      if d not in builtin]
        blobs[name] = blob
        todo += deps[name]
    for name, blob in blobs.items():
        (stage / "lib/modules" / f"{name}.ko").write_bytes(blob)
    early = kmods.load_order(deps, [m for m in kmods.EARLY_MODULES if m in deps])
    (stage / "etc/uvmshim/modules.early").write_text("".join(f"{m}\n" for m in early))
    (stage / "etc/uvmshim/modules.json").write_text(
        json.dumps({"kernel": modroot.name, "deps": deps}, indent=1, sort_keys=True))
    return deps


#: compileall ``-x``: skip our package in the stdlib pass. Anchored on the stdlib directory,
#: because the whole stage lives under ``~/.cache/uvmshim/`` in the host-Python mode.
_AGENT_RX = r"python3\.11/uvmshim/"


def compile_commands(stage: Path) -> tuple[str, list[list[str]]]:
    """Return how the stdlib and the agent get precompiled, and the commands to run.

    Debian ships no .pyc, and compiling at every boot costs ~0.7 s under TCG. As root we run
    the guest's own interpreter in a chroot, so magic and paths match exactly; otherwise a
    host Python 3.11 (same bytecode magic) with the stage prefix stripped from the paths.
    The stdlib is compiled sourceless (``-b``, .py deleted afterwards by
    :func:`drop_compiled_sources`): smallest and fastest. The agent keeps its sources.
    Both commands may exit 1 for a few files that do not compile; their .py stays.

    :returns: ``("chroot" | "host" | "skipped", [argv, ...])``.
    """
    std = f"/{STDLIB}"
    agent = f"{std}/uvmshim"
    base = ["-m", "compileall", "-q", "--invalidation-mode", "timestamp"]
    if os.geteuid() == 0:
        pre = ["chroot", str(stage), f"/usr/bin/{PY}", "-I", *base]
        return "chroot", [[*pre, "-b", "-x", _AGENT_RX, std], [*pre, agent]]
    if sys.version_info[:2] == (3, 11):
        pre = [sys.executable, "-I", *base, "-s", str(stage), "-p", "/"]
        return "host", [[*pre, "-b", "-x", _AGENT_RX, f"{stage}{std}"],
                        [*pre, f"{stage}{agent}"]]
    return "skipped", []


def drop_compiled_sources(stage: Path) -> int:
    """Delete stdlib .py files that have a sourceless .pyc beside them; return how many."""
    n = 0
    for cache in list((stage / STDLIB).rglob("__pycache__")):
        # Left by compileall's own imports in the chroot; dead weight beside sourceless .pyc.
        if "uvmshim" not in cache.relative_to(stage / STDLIB).parts:
            shutil.rmtree(cache)
    for py in (stage / STDLIB).rglob("*.py"):
        if "uvmshim" in py.relative_to(stage / STDLIB).parts:
            continue
        if py.with_suffix(".pyc").exists():
            py.unlink()
            n += 1
    return n


def tree_size(stage: Path) -> int:
    """Total bytes of regular files below ``stage``."""
    total = 0
    for dirpath, _dirs, names in os.walk(stage):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def write_manifest(path: Path, data: Mapping[str, object]) -> None:
    """Write ``data`` as pretty JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
