"""``uvmshim run``: run one container in a fresh utility VM."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator

import click

from uvmshim import hostpath, owners
from uvmshim.cli.main import collect_garbage, memory_option, run_async
from uvmshim.errors import UvmshimError
from uvmshim.runc.state import check_id
from uvmshim.runtime.oneshot import run_container
from uvmshim.runtime.specgen import RunOptions, build_spec
from uvmshim.spec import Spec, load_bundle


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while booting and attaching; gone before the container's output."""
    if not enabled:
        yield lambda _m: None
        return
    from rich.console import Console  # only for a terminal: rich costs start-up time

    status = Console(stderr=True).status("starting")
    status.start()

    def say(message: str) -> None:
        if message == "running":
            status.stop()
        else:
            status.update(message)

    try:
        yield say
    finally:
        status.stop()


def _parse_user(value: str) -> tuple[int, int]:
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise UvmshimError(f"expected UID[:GID] as numbers, got {value!r}", where="--user",
                           hint="user names can't be resolved before the container exists") \
            from None


@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--rootfs", type=click.Path(file_okay=False), help="Root filesystem directory "
              "(shared into the UVM over Plan9).")
@click.option("--layers", metavar="LAYER,...,SCRATCH",
              help="Layer folders (each with layer.vhd), top-most first, then the scratch "
                   "folder (with sandbox.vhdx).")
@click.option("--image", "image_name", metavar="NAME", help="An image imported with "
              "'uvmshim image import'.")
@click.option("--bundle", type=click.Path(file_okay=False), help="Run this OCI bundle "
              "(its config.json) instead of building a spec.")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]",
              help="Bind mount a host directory or file (repeatable).")
@click.option("--disk", "disks", multiple=True, metavar="IMAGE:CTR[:ro]",
              help="Mount a disk image (raw, qcow2, VHD, VHDX) over SCSI (repeatable).")
@click.option("--physical-disk", "physical_disks", multiple=True, metavar="DEV:CTR[:ro]",
              help="Pass a host block device through over SCSI (repeatable).")
@click.option("--hugepages", multiple=True, metavar="NAME:CTR",
              help="Mount a 2M hugetlbfs directory (repeatable).")
@click.option("--network", type=click.Choice(["none", "nat"]), default="none",
              show_default=True, help="nat: an outbound network (QEMU user-mode NAT; the "
              "host's loopback is 10.0.2.2, DNS 10.0.2.3).")
@click.option("-p", "--publish", multiple=True, metavar="[IP:]HOST:CTR[/tcp|udp]",
              help="Publish a container port on the host (with --network=nat; IP defaults "
                   "to 0.0.0.0; repeatable).")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE")
@click.option("-w", "--workdir", default=None, help="Working directory in the container.")
@click.option("-u", "--user", default=None, metavar="UID[:GID]")
@click.option("--read-only", is_flag=True, help="Mount the container's root read-only.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open to the container.")
@click.option("-t", "--tty", is_flag=True, help="Give the container a terminal (a pty in the "
              "UVM); with -i your terminal is in raw mode until it exits.")
@click.option("--name", "container_id", default="", help="Container id (default: random).")
@click.option("--memory", "memory_mb", default=None, callback=memory_option, metavar="SIZE",
              help="UVM memory (MiB, or 300m, 2g). Default: from the spec as the runc path "
                   "sizes it (memory limit + 256 MiB for the guest, in power-of-two classes "
                   "from 512 MiB; hcsshim's annotation), 512 MiB without a limit.")
@click.option("--cpus", type=click.IntRange(1, 64), default=None,
              help="UVM vCPUs. Default: from the spec's CPU quota or cpuset (hcsshim's "
                   "annotation); without one, 2 but at most half the host's CPUs.")
@click.option("--no-template", is_flag=True, help="Boot the UVM cold instead of cloning it from "
              "its template (also: UVMSHIM_NO_TEMPLATE=1).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_command(rootfs: str | None, layers: str | None, image_name: str | None,
                bundle: str | None, volumes: tuple[str, ...], disks: tuple[str, ...],
                physical_disks: tuple[str, ...], hugepages: tuple[str, ...],
                network: str, publish: tuple[str, ...], env: tuple[str, ...],
                workdir: str | None, user: str | None, read_only: bool,
                interactive: bool, tty: bool, container_id: str, memory_mb: int | None,
                cpus: int | None,
                no_template: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND in a container in a fresh utility VM, then tear everything down.

    The container's output is streamed, and its exit status becomes uvmshim's.

    \b
    Examples:
      uvmshim run -it --rootfs ./rootfs -- sh
      uvmshim run --rootfs ./rootfs -v ./data:/data -- ls /data
      uvmshim run --image busybox --disk data.img:/data:ro -- cat /data/x
      uvmshim run --network=nat -p 127.0.0.1:8080:80 --rootfs ./rootfs -- httpd -f -p 80
      uvmshim run --bundle ./mybundle
    """
    roots = [x for x in (rootfs, layers, image_name, bundle) if x]
    if len(roots) != 1:
        raise UvmshimError("give exactly one of --rootfs, --layers, --image or --bundle",
                           hint="uvmshim run --rootfs DIR -- CMD")
    if container_id:
        check_id(container_id)
    collect_garbage()
    cid = container_id or uuid.uuid4().hex[:12]
    with contextlib.ExitStack() as stack:
        if bundle:
            if command or volumes or disks or physical_disks or hugepages or \
                    network != "none" or publish:
                raise UvmshimError("--bundle runs the bundle as it is; put mounts, the "
                                   "command and the network (annotations "
                                   "io.uvmshim.network*) in its config.json")
            bundle = os.path.abspath(bundle)
            spec = _bundle_spec(bundle)
        else:
            opts = RunOptions(
                args=list(command), volumes=volumes, disks=disks,
                physical_disks=physical_disks, hugepages=hugepages, env=list(env),
                cwd=workdir or "/", read_only_root=read_only, terminal=tty,
                user=_parse_user(user) if user else (0, 0), network=network,
                publish=publish,
            )
            if image_name:
                opts = stack.enter_context(_image_options(image_name, cid, opts, workdir,
                                                          user))
            elif layers:
                opts.layers = [p for p in layers.split(",") if p]
            else:
                opts.rootfs = rootfs
            spec = build_spec(opts)
        with _progress(sys.stderr.isatty()) as say:
            code = run_async(run_container(spec, container_id=cid, memory_mb=memory_mb,
                                           cpus=cpus, stdin=interactive,
                                           progress=say, bundle=bundle or "",
                                           template=False if no_template else None))
    sys.exit(code)


def _bundle_spec(bundle: str) -> Spec:
    """A bundle's spec, with relative paths (``root.path``, disk and bind sources) made
    absolute: they are relative to the bundle."""
    return load_bundle(bundle)


@contextlib.contextmanager
def _image_options(name: str, cid: str, opts: RunOptions, workdir: str | None,
                   user: str | None) -> Iterator[RunOptions]:
    """Layers from the image store plus a fresh scratch disk; the image config as defaults."""
    from uvmshim.image import create_scratch, get_image, image_config, layer_folders

    record = get_image(name)
    config = image_config(record)
    scratch = hostpath.scratch_dir() / cid  # removed when the container is gone
    scratch.parent.mkdir(parents=True, exist_ok=True)
    owners.acquire(owners.DIR, scratch)  # before: a SIGKILL leaves a record
    try:
        scratch.mkdir()
    except FileExistsError:
        owners.release(owners.DIR, scratch)
        raise UvmshimError(f"a container named {cid} is already running", where="--name",
                           hint="choose another --name, or leave it out") from None
    try:
        run_async(create_scratch(scratch))
        args = list(config.entrypoint or []) + (list(opts.args) or list(config.cmd or []))
        if not args:
            raise UvmshimError(f"image {name} has no entrypoint or cmd; give a command",
                               where="--image")
        opts.args = args
        opts.layers = layer_folders(record, str(scratch))
        opts.env = [*(config.env or []), *opts.env]
        if workdir is None and config.working_dir:
            opts.cwd = config.working_dir
        if user is None and config.user:
            opts.user = _parse_user(config.user)
        yield opts
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        owners.release(owners.DIR, scratch)
