"""``uvmshim image``: pull and import OCI images, list and remove them; make scratch disks."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from uvmshim.cli.main import dump_json, run_async
from uvmshim.image import (
    DEFAULT_SCRATCH_BYTES,
    ImageError,
    ImageRecord,
    ImageStore,
    ImportEvent,
    create_scratch,
    import_image,
    list_images,
    remove_image,
)
from uvmshim.image.pull import PullEvent, pull_image

_BarsT = TypeVar("_BarsT", bound="_Bars")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def human(n: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1073741824`` → bytes (binary units).

    :raises ImageError: not a size.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ImageError(f"not a size: {text!r}", hint="use e.g. 10G, 512M or a byte count")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _store(ctx: click.Context) -> ImageStore:
    root = ctx.obj.get("root") if isinstance(ctx.obj, dict) else None
    return ImageStore(root)


@click.group("image")
@click.option("--root", type=click.Path(path_type=str), default=None,
              help="Image store directory (default: $UVMSHIM_IMAGE_ROOT, else "
                   "/var/lib/uvmshim/images as root).")
@click.pass_context
def image_group(ctx: click.Context, root: str | None) -> None:
    """Pull or import OCI images as LCOW layer disks; list and remove them."""
    ctx.obj = {"root": root}


class _Bars:
    """Turns import events into rich progress bars on stderr, one per converted layer."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self._progress = progress
        self._console = console
        self._tasks: dict[int, TaskID] = {}

    def __call__(self, ev: ImportEvent) -> None:
        label = f"layer {ev.index + 1}/{ev.count} {ev.diff_id[7:19]}"
        if ev.kind == "layer-start":
            self._tasks[ev.index] = self._progress.add_task(label, total=ev.total)
        elif ev.kind == "layer-bytes" and ev.index in self._tasks:
            self._progress.advance(self._tasks[ev.index], ev.done)
        elif ev.kind == "layer-done":
            if ev.index in self._tasks:
                self._progress.remove_task(self._tasks.pop(ev.index))
            self._console.print(f"{label}: converted")
        elif ev.kind == "layer-cached":
            self._console.print(f"{label}: already present")


#: An image reference as docker and podman write them (``registry/repo/name:tag``, ``@digest``).
_IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}", re.ASCII)


def check_image_name(name: str) -> None:
    """Refuse a ``--name`` that is not an image reference: no ``..``, ``.`` or empty path
    component, no leading ``/``, only letters, digits and ``._/:@+-``.

    :raises ImageError: naming the problem.
    """
    if not _IMAGE_NAME_RE.fullmatch(name) or any(
            part in ("", ".", "..") for part in name.split("/")):
        raise ImageError(f"invalid image name {name!r}", where="--name",
                         hint="use an image reference such as busybox or "
                              "example.org/team/app:1.0")


def _store_with_bars(ctx: click.Context, name: str | None, bars: type[_BarsT],
                     work: Callable[[ImageStore, _BarsT],
                                    Coroutine[Any, Any, ImageRecord]]) -> None:
    """Check ``--name``, run ``work`` (an import into the store) with progress bars of class
    ``bars`` on stderr, and print the stored image's name and id."""
    if name is not None:
        check_image_name(name)
    store = _store(ctx)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        record = run_async(work(store, bars(progress, console)))
    click.echo(f"{record.name} {record.id}")


@image_group.command("import")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--name", default=None,
              help="Name to store the image under (default: its ref name or repo tag).")
@click.option("--no-verity", is_flag=True,
              help="Give the layer disks no dm-verity hash tree (the guest then mounts them "
                   "unverified).")
@click.pass_context
def import_command(ctx: click.Context, path: str, name: str | None, no_verity: bool) -> None:
    """Import the image at PATH: an OCI layout directory, an oci-archive or a docker-archive
    (`podman save` / `docker save` output).

    Each layer disk gets a dm-verity hash tree (unless --no-verity): the guest mounts it
    through dm-verity, so a layer changed on the host after the import cannot be read."""
    _store_with_bars(ctx, name, _Bars, lambda store, bars: import_image(
        path, name=name, store=store, progress=bars, verity=not no_verity))


class _PullBars(_Bars):
    """Download bars (one per layer, from skopeo's progress), then the conversion's."""

    def __init__(self, progress: Progress, console: Console) -> None:
        super().__init__(progress, console)
        self._downloads: dict[int, TaskID] = {}

    def __call__(self, ev: ImportEvent | PullEvent) -> None:
        if isinstance(ev, ImportEvent):
            super().__call__(ev)
            return
        label = f"layer {ev.index + 1}/{ev.count} {ev.digest[7:19]}"
        if ev.kind in ("blob-bytes", "blob-done"):
            task = self._downloads.get(ev.index)
            if task is None:
                task = self._downloads[ev.index] = self._progress.add_task(
                    f"{label} download", total=ev.total)
            self._progress.update(task, completed=ev.done)
            if ev.kind == "blob-done":
                self._progress.remove_task(self._downloads.pop(ev.index))
                self._console.print(f"{label}: downloaded")
        elif ev.kind == "downloaded":
            for task in self._downloads.values():
                self._progress.remove_task(task)
            self._downloads.clear()


@image_group.command("pull")
@click.argument("ref")
@click.option("--name", default=None,
              help="Name to store the image under (default: REF, with :latest if it names no "
                   "tag or digest).")
@click.option("--authfile", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Registry credentials (default: what skopeo/podman/docker login wrote).")
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True,
              help="Check the registry's TLS certificate (--no-tls-verify also allows plain "
                   "HTTP).")
@click.option("--no-verity", is_flag=True,
              help="Give the layer disks no dm-verity hash tree.")
@click.pass_context
def pull_command(ctx: click.Context, ref: str, name: str | None, authfile: str | None,
                 tls_verify: bool, no_verity: bool) -> None:
    """Pull image REF from its registry (with skopeo) and import it, e.g.
    `uvmshim image pull docker.io/library/busybox:latest`. Layers already in the store are
    shared, not converted again; every blob is checked against its digest."""
    _store_with_bars(ctx, name, _PullBars, lambda store, bars: pull_image(
        ref, name=name, store=store, authfile=authfile, tls_verify=tls_verify,
        verity=not no_verity, progress=bars))


@image_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list on stdout.")
@click.pass_context
def ls_command(ctx: click.Context, as_json: bool) -> None:
    """List the images in the store."""
    images = list_images(_store(ctx))
    if as_json:
        dump_json([r.to_json() for r in images])
        return
    show(images)


def _when(iso: str) -> str:
    """An RFC 3339 time as ``2023-11-14 22:13`` (UTC), or as given if it isn't one."""
    try:
        # 3.11's fromisoformat takes at most microseconds; configs may carry nanoseconds.
        return dt.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", iso)).astimezone(
            dt.UTC).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def show(images: list[ImageRecord]) -> None:
    table = Table(box=None)
    for col in ("NAME", "ID", "LAYERS", "SIZE", "CREATED"):
        table.add_column(col, no_wrap=True)
    for r in images:
        table.add_row(r.name, r.id.split(":", 1)[-1][:12], str(len(r.diff_ids)), human(r.size),
                      _when(r.created))
    Console().print(table)


@image_group.command("rm")
@click.argument("name")
@click.pass_context
def rm_command(ctx: click.Context, name: str) -> None:
    """Remove image NAME, and its layers that no other image uses."""
    removed = remove_image(name, _store(ctx))
    click.echo(f"removed {name} ({len(removed)} layer{'s' if len(removed) != 1 else ''} "
               "freed)")


@image_group.command("scratch")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--size", "size_text", default=str(DEFAULT_SCRATCH_BYTES >> 30) + "G",
              show_default=True, help="Virtual size of the scratch disk (sparse).")
def scratch_command(folder: Path, size_text: str) -> None:
    """Create FOLDER/sandbox.vhdx, an empty ext4 scratch disk for one container."""
    path = run_async(create_scratch(folder, parse_size(size_text)))
    click.echo(str(path))
