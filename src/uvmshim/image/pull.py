"""``uvmshim image pull``: copy an image from a registry with skopeo, then import it.

We speak no registry protocol ourselves. The steps:

1. **Resolve** with ``skopeo inspect --raw``: the manifest, or the index and then the
   manifest for this host's platform (``linux/<arch>``; none: a clear error before any
   download). The manifest's digest pins what is copied next, so the copy cannot get another
   image than the one resolved even if the tag moves meanwhile, and skopeo checks that the
   registry's manifest matches that digest.
2. **Copy** ``docker://<repository>@<digest>`` into a temporary OCI layout with
   ``skopeo copy``; skopeo checks every blob against its digest and size. Progress comes from
   watching the layout fill: each finished blob appears under ``blobs/sha256/`` and skopeo
   writes the blobs in progress to ``oci-put-blob*`` files, in the order it announces them.
3. **Check** the image config's platform (a single-platform image for another architecture is
   refused here, before any layer is converted).
4. **Import** the layout (:func:`~uvmshim.image.store.import_image`): digests and diff ids are
   checked again, layers already in the store (from any image) are reused, new ones become
   layer disks (with dm-verity by default). The record's source is the reference.

Registry credentials are skopeo's business: it reads ``${XDG_RUNTIME_DIR}/containers/auth.json``,
``~/.config/containers/auth.json`` and ``~/.docker/config.json`` (what ``skopeo login``,
``podman login`` and ``docker login`` write), or the ``authfile`` given.

The temporary layout lives in ``<store>/pulls/pull-*``, flock'ed while in use; a pull removes
the ones left by pulls that died. On any error nothing is recorded and no layer is left half
made (the import's guarantee); the downloaded blobs are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from uvmshim.image.layout import (
    MT_DOCKER_LIST,
    MT_OCI_INDEX,
    ImageError,
    check_digest,
    host_arch,
    open_image,
)
from uvmshim.image.store import ImageRecord, ImageStore, ImportEvent, free_bytes, import_image
from uvmshim.tools import running

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
#: A reference as registries spell them: ``[host[:port]/]path[:tag][@digest]``.
_REF_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?/)?"
    rf"{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[a-z0-9]+:[0-9a-f]{32,128})?", re.ASCII)
_SKOPEO_HINT = "install skopeo (Debian: apt-get install skopeo)"
#: How often the download progress is sampled (seconds).
POLL_INTERVAL = 0.1
#: Free space wanted for the download, over the compressed layer sizes.
_SPACE_FACTOR = 1.1
_LAYOUT_REF = "pulled"


@dataclass(frozen=True)
class PullEvent:
    """Download progress of :func:`pull_image`, reported on the event loop.

    ``kind`` is ``"resolved"`` (``count`` layers of ``total`` bytes to download),
    ``"blob-bytes"`` (layer ``index`` has ``done`` of its ``total`` bytes), ``"blob-done"`` or
    ``"downloaded"`` (every blob is in). The conversion that follows reports
    :class:`~uvmshim.image.store.ImportEvent` s.
    """

    kind: Literal["resolved", "blob-bytes", "blob-done", "downloaded"]
    index: int = 0
    count: int = 0
    digest: str = ""
    done: int = 0
    total: int | None = None


PullProgress = Callable[[PullEvent | ImportEvent], None]


def docker_reference(ref: str) -> str:
    """The registry reference in ``ref`` (an optional ``docker://`` prefix removed).

    :raises ImageError: not a reference.
    """
    bare = ref.removeprefix("docker://")
    if len(bare) > 1000 or not _REF_RE.fullmatch(bare):
        raise ImageError(f"not an image reference: {ref!r}", where="REF",
                         hint="use e.g. registry.example.org/team/app:1.0, "
                              "docker.io/library/busybox:latest or name@sha256:<digest>")
    return bare


def split_reference(ref: str) -> tuple[str, str, str]:
    """``host/repo:tag@digest`` → ``(repository, tag, digest)`` (tag, digest may be empty)."""
    rest, _, digest = ref.partition("@")
    head, slash, last = rest.rpartition("/")
    name, _, tag = last.partition(":")
    return head + slash + name, tag, digest


def default_name(ref: str) -> str:
    """The store name of a pulled image: the reference, ``:latest`` if it names no tag or
    digest."""
    _repo, tag, digest = split_reference(ref)
    return ref if tag or digest else f"{ref}:latest"


# skopeo --------------------------------------------------------------------------------------


def _skopeo_message(stderr: str) -> str:
    """skopeo's own words: the ``msg="..."`` of its fatal log line, else its last line."""
    found = re.findall(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    if found:
        return str(found[-1]).replace('\\"', '"')
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _pull_error(ref: str, stderr: str, *, tls_verify: bool) -> ImageError:
    """An :class:`ImageError` for skopeo's failure, with what to do about it."""
    msg = _skopeo_message(stderr)
    low = msg.lower()
    m = re.search(r"expected (sha256:[0-9a-f]{64}), got (sha256:[0-9a-f]{64})", msg)
    if "digest did not match" in low or "digest mismatch" in low or m:
        detail = f" (expected {m.group(1)}, got {m.group(2)})" if m else ""
        return ImageError(f"the registry sent data that does not match its digest{detail}",
                          where=ref, hint="the registry (or something between us) is corrupt "
                                          "or lying; nothing was stored")
    if "no image found in manifest list" in low or "no matching manifest" in low:
        return ImageError(f"no image for linux/{host_arch()} in this image: {msg}", where=ref)
    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        return ImageError(f"the registry refused access: {msg}", where=ref,
                          hint="log in with `skopeo login` or `podman login` (or give "
                               "--authfile)")
    if "manifest unknown" in low or "name unknown" in low or "not found" in low:
        return ImageError(f"no such image in the registry: {msg}", where=ref)
    if tls_verify and ("http response to https client" in low or "x509" in low
                       or "certificate" in low):
        return ImageError(f"TLS failed: {msg}", where=ref,
                          hint="for a registry without (valid) TLS, pass --no-tls-verify")
    return ImageError(f"skopeo failed: {msg}", where=ref)


async def _skopeo(argv: Sequence[str], ref: str, *, tls_verify: bool,
                  on_line: Callable[[str], None] | None = None,
                  while_running: Callable[[], None] | None = None) -> bytes:
    """Run ``skopeo argv``; return its stdout (exactly: a raw manifest is hashed).

    :param on_line: called with each stdout line as it comes.
    :param while_running: called every :data:`POLL_INTERVAL` s while skopeo runs.
    :raises ImageError: skopeo failed (see :func:`_pull_error`).
    :raises ToolError: skopeo is not installed.
    """
    out = bytearray()
    err = bytearray()
    async with running(["skopeo", *argv], stderr=asyncio.subprocess.PIPE,
                       missing_hint=_SKOPEO_HINT) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr

        async def read_out() -> None:
            while line := await stdout.readline():
                out.extend(line)
                if on_line is not None:
                    on_line(line.decode(errors="replace").rstrip("\n"))

        async def read_err() -> None:
            while chunk := await stderr.read(65536):
                err.extend(chunk[: max(0, (1 << 20) - len(err))])

        async def poll() -> None:
            while while_running is not None:
                while_running()
                await asyncio.sleep(POLL_INTERVAL)

        poller = asyncio.create_task(poll())
        try:
            await asyncio.gather(read_out(), read_err())
            code = await proc.wait()
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
    if code != 0:
        raise _pull_error(ref, err.decode(errors="replace"), tls_verify=tls_verify)
    return bytes(out)


def _common(authfile: str | None, tls_verify: bool, flag: str) -> list[str]:
    args = ["--authfile", authfile] if authfile else []
    if not tls_verify:
        args.append(f"{flag}=false")
    return args


# Resolving ----------------------------------------------------------------------------------


def _json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ImageError(f"the registry sent a manifest that is not JSON: {e}",
                         where=where) from None
    if not isinstance(doc, dict):
        raise ImageError("the registry sent a manifest that is not a JSON object", where=where)
    return doc


@dataclass(frozen=True)
class Resolved:
    """The manifest to copy: its digest and layer descriptors ``(digest, size)``."""

    digest: str
    layers: tuple[tuple[str, int], ...]


async def resolve(ref: str, *, authfile: str | None = None, tls_verify: bool = True) -> Resolved:
    """The manifest of ``ref`` for this host's platform (see the module docstring).

    :raises ImageError: no such image, no image for this platform, a malformed manifest.
    """
    common = _common(authfile, tls_verify, "--tls-verify")
    raw = await _skopeo(["inspect", "--raw", *common, f"docker://{ref}"], ref,
                        tls_verify=tls_verify)
    doc = _json(raw, ref)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if doc.get("mediaType") in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in doc:
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise ImageError("the image index has no manifest list", where=ref)
        arch = host_arch()
        plats = [d.get("platform") or {} for d in manifests if isinstance(d, dict)]
        mine = [d for d, p in zip(manifests, plats, strict=True)
                if p.get("os") == "linux" and p.get("architecture") == arch]
        if not mine:
            have = sorted({f"{p.get('os')}/{p.get('architecture')}" for p in plats})
            raise ImageError(f"no image for linux/{arch} in this image (it has "
                             f"{', '.join(have) or 'none'})", where=ref)
        digest = check_digest(mine[0].get("digest"), ref)
        repo, _, _ = split_reference(ref)
        raw = await _skopeo(["inspect", "--raw", *common, f"docker://{repo}@{digest}"], ref,
                            tls_verify=tls_verify)
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise ImageError(f"the registry sent a manifest that does not match its digest "
                             f"{digest}", where=ref, hint="the registry is corrupt or lying; "
                                                          "nothing was stored")
        doc = _json(raw, ref)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(d, dict) for d in layers):
        raise ImageError("the manifest has no layer list (a schema 1 manifest?)", where=ref)
    out = []
    for d in layers:
        size = d.get("size")
        out.append((check_digest(d.get("digest"), ref),
                    size if isinstance(size, int) and size >= 0 else 0))
    return Resolved(digest, tuple(out))


# The pull directory --------------------------------------------------------------------------


def _clean_pulls(pulls: Path) -> None:
    """Remove pull directories nobody holds (left by pulls that died)."""
    if not pulls.is_dir():
        return
    for d in pulls.glob("pull-*"):
        try:
            fd = os.open(d / ".lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a pull in progress
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def _pull_dir(store: ImageStore) -> AsyncIterator[Path]:
    pulls = store.root / "pulls"
    await asyncio.to_thread(_clean_pulls, pulls)
    pulls.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pull-", dir=pulls))
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield work
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
        os.close(fd)


class _Watcher:
    """Turns the layout's files into per-layer download events."""

    def __init__(self, layout: Path, layers: tuple[tuple[str, int], ...],
                 emit: Callable[[PullEvent], None]) -> None:
        self.layout = layout
        self.layers = layers
        self.emit = emit
        self.started: list[str] = []  # blob digests, in the order skopeo announced them
        self.done: set[str] = set()
        self.bytes: dict[str, int] = {}

    def on_line(self, line: str) -> None:
        m = re.match(r"Copying blob (sha256:[0-9a-f]{64})", line)
        if m and m.group(1) not in self.started:
            self.started.append(m.group(1))

    def poll(self) -> None:
        blobs = self.layout / "blobs" / "sha256"
        try:
            present = {f"sha256:{p.name}" for p in blobs.iterdir()}
        except OSError:
            present = set()
        temps: list[tuple[int, int]] = []
        try:
            for p in self.layout.glob("oci-put-blob*"):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    temps.append((st.st_ctime_ns, st.st_size))
        except OSError:
            pass
        temps.sort()
        in_flight = [d for d in self.started if d not in present]
        sizes = dict(zip(in_flight, (size for _, size in temps), strict=False))
        count = len(self.layers)
        for i, (digest, size) in enumerate(self.layers):
            if digest in self.done:
                continue
            if digest in present:
                self.done.add(digest)
                self.emit(PullEvent("blob-done", i, count, digest, done=size, total=size))
            elif sizes.get(digest, 0) != self.bytes.get(digest, 0):
                self.bytes[digest] = sizes[digest]
                self.emit(PullEvent("blob-bytes", i, count, digest, done=min(sizes[digest], size),
                                    total=size))


# The operation -------------------------------------------------------------------------------


def _check_platform(layout: Path, ref: str) -> None:
    with open_image(layout, name=_LAYOUT_REF) as img:
        os_, arch = img.config.get("os"), img.config.get("architecture")
    if os_ != "linux" or arch != host_arch():
        raise ImageError(f"the image is for {os_}/{arch}; this host runs linux/{host_arch()}",
                         where=ref, hint="pull an image built for this platform")


async def pull_image(ref: str, *, name: str | None = None, store: ImageStore | None = None,
                     authfile: str | None = None, tls_verify: bool = True,
                     progress: PullProgress | None = None, verity: bool = True) -> ImageRecord:
    """Pull ``ref`` from its registry and import it as ``name`` (default: the reference, with
    ``:latest`` if it has no tag or digest).

    :param authfile: registry credentials (default: skopeo's usual places).
    :param tls_verify: check the registry's TLS certificate (and refuse plain HTTP).
    :param verity: give new layer disks a dm-verity hash tree (see ``import_image``).
    :raises ImageError: a bad reference, no such image, no image for this platform, access
        refused, a blob or manifest that does not match its digest, too little space, or a bad
        layer. Nothing is recorded and no download is left behind.
    :raises ToolError: skopeo is not installed.
    """
    ref = docker_reference(ref)
    store = store or ImageStore()

    def emit(ev: PullEvent | ImportEvent) -> None:
        if progress is not None:
            progress(ev)

    resolved = await resolve(ref, authfile=authfile, tls_verify=tls_verify)
    total = sum(size for _, size in resolved.layers)
    store.root.mkdir(parents=True, exist_ok=True)
    need = int(total * _SPACE_FACTOR)
    free = await asyncio.to_thread(free_bytes, store.root)
    if need > free:
        raise ImageError(f"the download needs about {need >> 20} MiB, but only {free >> 20} MiB "
                         "are free", where=str(store.root), hint="free disk space")
    emit(PullEvent("resolved", count=len(resolved.layers), total=total))
    repo, _, _ = split_reference(ref)
    async with _pull_dir(store) as work:
        layout = work / "layout"
        watcher = _Watcher(layout, resolved.layers, emit)
        await _skopeo(
            ["copy", *_common(authfile, tls_verify, "--src-tls-verify"),
             "--override-os", "linux", "--override-arch", host_arch(),
             f"docker://{repo}@{resolved.digest}", f"oci:{layout}:{_LAYOUT_REF}"],
            ref, tls_verify=tls_verify, on_line=watcher.on_line, while_running=watcher.poll)
        watcher.poll()
        emit(PullEvent("downloaded", count=len(resolved.layers), total=total))
        await asyncio.to_thread(_check_platform, layout, ref)
        return await import_image(layout, name=name or default_name(ref), store=store,
                                  progress=emit, verity=verity, source=f"docker://{ref}")
