"""Build and cache the utility VM's boot files: a PVH-bootable kernel and an initrd.

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into a temporary directory; nothing is installed on the host, and the guest
sees only files we put in the initrd (no host directory is shared by default).

* **Kernel:** Debian's ``linux-image-<abi>-amd64`` (the version ``linux-image-amd64`` points
  at, or ``$UVMSHIM_KERNEL_PACKAGE``). Its ``vmlinuz`` is an xz-compressed bzImage; we
  decompress the payload in Python and boot the resulting ELF ``vmlinux`` through its PVH
  entry point, which skips 3.5-4.8 s of in-guest decompression under TCG.
* **Initrd:** an uncompressed newc cpio with busybox-static, python3.11, crun, the kernel
  modules in :mod:`uvmshim.agent.kmods` and our agent (see :mod:`uvmshim.uvm.initrd.stage`).

The result is cached in ``${XDG_CACHE_HOME:-~/.cache}/uvmshim/boot/<key>``, where ``key``
hashes every input: package names, versions and .deb checksums, our agent and protocol
sources, /init, and the builder's own code. A build happens in a temporary directory next to
the cache and is renamed into place only when complete, so an interrupted build leaves no
half cache entry. Downloaded .debs are kept in ``.../uvmshim/debs`` (checked by SHA256).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from uvmshim import hostpath
from uvmshim.agent import kmods
from uvmshim.errors import ToolError, UvmshimError
from uvmshim.tools import run_tool
from uvmshim.uvm.initrd import stage as st
from uvmshim.uvm.initrd.cpio import CpioWriter
from uvmshim.uvm.initrd.elf import ELF_MAGIC

#: Bump when the build changes in a way the hashed sources do not show.
BUILDER_VERSION = 1

#: Debian packages of the initrd userland (the ELF closure of python3.11 + crun + busybox).
USERLAND_PACKAGES: tuple[str, ...] = (
    "busybox-static",
    "libc6", "libgcc-s1", "zlib1g", "libexpat1",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "crun", "libcap2", "libseccomp2", "libsystemd0", "libyajl2",
    "libgcrypt20", "libgpg-error0", "liblz4-1", "liblzma5", "libzstd1",
)

#: The metapackage whose dependency names the current Debian kernel.
KERNEL_METAPACKAGE = "linux-image-amd64"

#: How many old cache entries to keep besides the current one.
KEEP_OLD_ENTRIES = 1
#: An old entry used this recently (seconds) is not pruned: see :func:`_prune`.
IN_USE_GRACE = 600.0

Progress = Callable[[str], None]

_PKG_DIR = Path(__file__).resolve().parent.parent  # src/uvmshim
_INIT_SCRIPT = Path(__file__).resolve().parent / "initrd" / "init.sh"


@dataclass(frozen=True)
class BootFiles:
    """A cached kernel + initrd pair; ``key`` names the cache entry."""

    kernel: Path
    initrd: Path
    key: str


@dataclass(frozen=True)
class PackageInfo:
    """One Debian package as apt knows it (candidate version)."""

    name: str
    version: str
    architecture: str
    sha256: str

    @property
    def deb_name(self) -> str:
        """The file name ``apt-get download`` saves it as (epoch ``:`` quoted as ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


@dataclass(frozen=True)
class BuildInputs:
    """Everything the boot files depend on; :func:`compute_key` hashes it."""

    builder_version: int
    kernel_package: str
    packages: tuple[PackageInfo, ...]
    #: ``(name, sha256)`` of every source file that ends up in, or builds, the image.
    files: tuple[tuple[str, str], ...]
    modules: tuple[str, ...]


def compute_key(inputs: BuildInputs) -> str:
    """Return the cache key (24 hex digits) for ``inputs``."""
    blob = json.dumps(asdict(inputs), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def source_files() -> list[tuple[str, Path]]:
    """The files hashed into the key: agent, protocol, /init and the builder itself."""
    out: list[tuple[str, Path]] = []
    for sub in ("agent", "protocol", "uvm/initrd"):
        files = sorted((_PKG_DIR / sub).glob("*.py"))
        if not files:  # a moved package must not silently drop out of the key
            raise UvmshimError(f"no sources in {_PKG_DIR / sub}: the boot-file key is incomplete")
        for p in files:
            out.append((f"{sub}/{p.name}", p))
    out.append(("uvm/initrd/init.sh", _INIT_SCRIPT))
    out.append(("uvm/bootfiles.py", Path(__file__).resolve()))
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# External programs --------------------------------------------------------------------------

#: What to tell the user when a tool fails (``_FAIL_HINTS``) or is missing (``_MISSING_HINTS``).
_FAIL_HINTS = {
    "apt-get": "is the Debian mirror reachable? (as root, `apt-get update` may help)",
    "apt-cache": "run `apt-get update` so that apt knows the Debian 12 packages",
    "dpkg-deb": "a cached .deb may be damaged: remove ~/.cache/uvmshim/debs and retry",
}
_MISSING_HINTS = {
    "apt-get": "build the boot files on Debian 12 (bookworm): apt-get comes with apt",
    "apt-cache": "build the boot files on Debian 12 (bookworm): apt-cache comes with apt",
    "dpkg-deb": "dpkg-deb comes with the dpkg package",
}


async def _run(argv: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None) -> str:
    """Run ``argv``; return stdout.

    :raises ToolError: on a missing program or a non-zero exit (with a hint for apt tools).
    """
    name = os.path.basename(os.fspath(argv[0]))
    try:
        return await run_tool(argv, cwd=cwd, missing_hint=_MISSING_HINTS.get(name))
    except ToolError as err:
        hint = _FAIL_HINTS.get(name)
        if hint and err.returncode != 127:
            err.wrap(f"{name} failed")
            err.hint = hint
        raise


def _parse_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur = {}
        elif not line[0].isspace() and ":" in line:
            k, _, v = line.partition(":")
            cur[k] = v.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


async def kernel_package() -> str:
    """The kernel package to boot: ``$UVMSHIM_KERNEL_PACKAGE`` or what apt's metapackage names."""
    override = os.environ.get("UVMSHIM_KERNEL_PACKAGE")
    if override:
        return override
    text = await _run(["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE])
    for stanza in _parse_stanzas(text):
        for dep in stanza.get("Depends", "").split(","):
            name = dep.split()[0] if dep.split() else ""
            if name.startswith("linux-image-") and name != KERNEL_METAPACKAGE:
                return name
    raise UvmshimError(f"cannot tell the kernel package from {KERNEL_METAPACKAGE}'s Depends",
                       hint="set UVMSHIM_KERNEL_PACKAGE=linux-image-<version>-amd64")


async def resolve_packages(names: Sequence[str]) -> tuple[PackageInfo, ...]:
    """Ask apt for the candidate version and checksum of each package (no download).

    :raises ToolError: if apt-cache fails; :raises UvmshimError: if a package is unknown.
    """
    text = await _run(["apt-cache", "show", "--no-all-versions", *names])
    found: dict[str, PackageInfo] = {}
    for s in _parse_stanzas(text):
        if "Package" in s and s["Package"] not in found:
            found[s["Package"]] = PackageInfo(s["Package"], s.get("Version", ""),
                                              s.get("Architecture", "amd64"), s.get("SHA256", ""))
    missing = [n for n in names if n not in found]
    if missing:
        raise UvmshimError(f"apt does not know {', '.join(missing)}",
                           hint="run `apt-get update` on a Debian 12 (bookworm) host")
    return tuple(found[n] for n in names)


def _apt_state() -> str:
    """A fingerprint of what decides apt's candidates: package lists, preferences, dpkg status."""
    h = hashlib.sha256()
    h.update(os.environ.get("UVMSHIM_KERNEL_PACKAGE", "").encode())
    watched = [*Path("/var/lib/apt/lists").glob("*Packages*"),
               *Path("/etc/apt").glob("preferences*"), *Path("/etc/apt").glob("sources.list*"),
               Path("/var/lib/dpkg/status")]
    for p in sorted(watched):
        try:
            st_ = p.stat()
        except OSError:
            continue
        h.update(f"{p}\0{st_.st_mtime_ns}\0{st_.st_size}\n".encode())
    return h.hexdigest()


async def _resolve_all() -> tuple[str, tuple[PackageInfo, ...]]:
    # apt-cache takes ~1 s per call on the bookworm lists; remember its answer until the lists
    # (or preferences, or the dpkg status) change, so a cache hit costs milliseconds.
    memo = hostpath.cache_dir() / "apt-resolve.json"
    state = _apt_state()
    try:
        data = json.loads(memo.read_text())
        if data.get("state") == state and data.get("builder") == BUILDER_VERSION:
            return data["kernel"], tuple(PackageInfo(**p) for p in data["packages"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    kpkg = await kernel_package()
    packages = await resolve_packages([kpkg, *USERLAND_PACKAGES])
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"state": state, "builder": BUILDER_VERSION, "kernel": kpkg,
                               "packages": [asdict(p) for p in packages]}))
    os.replace(tmp, memo)
    return kpkg, packages


async def build_inputs() -> BuildInputs:
    """Collect the inputs of the boot files (asks apt-cache, or its remembered answer)."""
    kpkg, packages = await _resolve_all()
    files = tuple((name, _sha256_file(p)) for name, p in source_files())
    return BuildInputs(BUILDER_VERSION, kpkg, packages, files, tuple(kmods.all_wanted()))


async def _download(packages: Sequence[PackageInfo], debs: Path, progress: Progress) -> None:
    debs.mkdir(parents=True, exist_ok=True)

    def ok(p: PackageInfo) -> bool:
        f = debs / p.deb_name
        return f.exists() and (not p.sha256 or _sha256_file(f) == p.sha256)

    todo = [p for p in packages if not ok(p)]
    if todo:
        progress(f"downloading {len(todo)} Debian packages")
        argv = ["apt-get", "download", *[f"{p.name}={p.version}" for p in todo]]
        if os.geteuid() == 0:
            # As root apt drops to _apt for downloads, which cannot write our cache dir.
            argv[1:1] = ["-o", "APT::Sandbox::User=root"]
        await _run(argv, cwd=debs)
    bad = [p.deb_name for p in packages if not ok(p)]
    if bad:
        raise UvmshimError(f"downloaded packages missing or corrupt: {', '.join(bad)}")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """Return the uncompressed ELF ``vmlinux`` inside a bzImage (xz or gzip payload).

    :raises UvmshimError: if no compressed ELF payload is found.
    """
    for magic, decompress in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        start = vmlinuz.find(magic)
        while start != -1:
            try:
                data = decompress(vmlinuz[start:])
            except (lzma.LZMAError, zlib.error, EOFError):
                data = b""
            if data.startswith(ELF_MAGIC):
                return data
            start = vmlinuz.find(magic, start + 1)
    raise UvmshimError("no xz- or gzip-compressed ELF kernel found in vmlinuz")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _write_cpio(stage_dir: Path, out: Path) -> None:
    with open(out, "wb") as f:
        w = CpioWriter(f)
        w.add_tree(str(stage_dir))
        # Device nodes are plain headers in the archive: no mknod, no root needed.
        w.add_device("dev/console", char=True, major=5, minor=1)
        w.add_device("dev/null", char=True, major=1, minor=3, mode=0o666)
        w.close()


async def _build(inputs: BuildInputs, work: Path, out: Path, progress: Progress) -> None:
    debs = hostpath.cache_dir() / "debs"
    await _download(inputs.packages, debs, progress)
    progress("unpacking packages")
    pkgs = work / "pkgs"
    pkgs.mkdir()
    sem = asyncio.Semaphore(4)

    async def unpack(p: PackageInfo) -> None:
        async with sem:
            await _run(["dpkg-deb", "-x", debs / p.deb_name, pkgs / p.name])

    # A TaskGroup (not gather): if one unpack fails the others are cancelled and their
    # dpkg-deb processes killed before the work directory is removed.
    try:
        async with asyncio.TaskGroup() as tg:
            for p in inputs.packages:
                tg.create_task(unpack(p))
    except ExceptionGroup as group:
        raise group.exceptions[0] from None  # callers expect a ToolError, not a group

    kdir = pkgs / inputs.kernel_package
    vmlinuz = sorted((kdir / "boot").glob("vmlinuz-*"))
    modroots = sorted((kdir / "lib/modules").glob("*"))
    if not vmlinuz or not modroots:
        raise UvmshimError(f"{inputs.kernel_package} has no boot/vmlinuz-* or lib/modules/*")
    progress(f"extracting vmlinux from {vmlinuz[0].name}")
    vmlinux = await asyncio.to_thread(extract_vmlinux, vmlinuz[0].read_bytes())
    (out / "vmlinux").write_bytes(vmlinux)

    progress("assembling the initrd tree")
    stage = work / "stage"
    userland = [pkgs / name for name in USERLAND_PACKAGES]
    await asyncio.to_thread(st.merge_packages, userland, stage)
    await asyncio.to_thread(st.strip_tree, stage)
    listing = await _run([stage / "bin/busybox", "--list-full"])
    st.add_busybox_links(stage, listing)
    libs = await asyncio.to_thread(st.prune_libs, stage)
    st.add_base_files(stage, _INIT_SCRIPT.read_bytes())
    deps = await asyncio.to_thread(st.add_kernel_modules, stage, modroots[0])
    st.add_agent(stage, _PKG_DIR)
    how, commands = st.compile_commands(stage)
    progress(f"precompiling Python ({how})")
    for i, argv in enumerate(commands):
        try:
            await _run(argv)
        except ToolError as err:
            if i != 0 or err.returncode != 1:  # stdlib: a few fixtures never compile
                raise
    dropped = st.drop_compiled_sources(stage)
    progress("writing the initrd")
    await asyncio.to_thread(_write_cpio, stage, out / "initrd.cpio")
    st.write_manifest(out / "manifest.json", {
        "key": compute_key(inputs), "inputs": asdict(inputs), "libraries": libs,
        "modules": sorted(deps), "pyc": how, "sources_dropped": dropped,
        "stage_bytes": st.tree_size(stage), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime()),
    })


def _touch(entry: Path) -> None:
    """Note that ``entry`` is in use (its mtime), so that :func:`_prune` leaves it alone."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def _complete(entry: Path) -> BootFiles | None:
    if (entry / "manifest.json").exists():
        return BootFiles(entry / "vmlinux", entry / "initrd.cpio", entry.name)
    return None


def _prune(boot: Path, current: str, now: float | None = None) -> None:
    """Remove old cache entries but the newest :data:`KEEP_OLD_ENTRIES`, and any used in the
    last :data:`IN_USE_GRACE` seconds (a process that was handed an entry's paths may not have
    started its QEMU yet: each use touches the entry)."""
    now = time.time() if now is None else now
    old = sorted((p for p in boot.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name != current), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in old[KEEP_OLD_ENTRIES:]:
        if now - p.stat().st_mtime > IN_USE_GRACE:
            shutil.rmtree(p, ignore_errors=True)
    for p in boot.glob(".build-*"):  # left by a killed build (no Python cleanup ran)
        if time.time() - p.stat().st_mtime > 3600:
            shutil.rmtree(p, ignore_errors=True)


async def ensure_boot_files(*, rebuild: bool = False,
                            progress: Progress | None = None) -> BootFiles:
    """Return the cached boot files for the current inputs, building them if needed.

    :param rebuild: build even if a cache entry exists (it is replaced atomically).
    :param progress: called with a short message at each build step.
    :raises ToolError: if apt-get, apt-cache or dpkg-deb fail.
    :raises UvmshimError: if a package, kernel module or library is missing.
    """
    say = progress or (lambda _msg: None)
    inputs = await build_inputs()
    key = compute_key(inputs)
    boot = hostpath.cache_dir() / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    entry = boot / key
    if not rebuild and (found := _complete(entry)):
        _touch(entry)
        return found
    lock_fd = os.open(boot / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # One build at a time per cache; a second caller waits and then finds the entry.
        await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        if not rebuild and (found := _complete(entry)):
            return found
        say(f"building UVM boot files {key}")
        with tempfile.TemporaryDirectory(dir=boot, prefix=".build-") as tmp:
            work, out = Path(tmp) / "work", Path(tmp) / "out"
            work.mkdir()
            out.mkdir()
            await _build(inputs, work, out, say)
            if entry.exists():
                trash = Path(tmp) / "old"
                entry.rename(trash)
            out.rename(entry)  # atomic: the entry is complete or absent
        _prune(boot, key)
    finally:
        os.close(lock_fd)  # also drops the flock
    found = _complete(entry)
    if found is None:
        raise UvmshimError(f"boot file cache entry {entry} is incomplete")
    return found
