"""``uvmshim uvm``: build the UVM's boot files and templates, and run a command in a fresh UVM."""

from __future__ import annotations

import os
import stat
import sys

import click
from rich.console import Console

from uvmshim import guestpath, hostpath
from uvmshim.cli.main import dump_json, run_async
from uvmshim.errors import UvmshimError
from uvmshim.resources import ContainerResources
from uvmshim.runtime.vm import build_template, start_uvm
from uvmshim.uvm.bootfiles import ensure_boot_files
from uvmshim.uvm.plan9 import Plan9Share
from uvmshim.uvm.qemu import template as tmpl
from uvmshim.uvm.qemu.agent_client import AgentClient
from uvmshim.uvm.utilityvm import UtilityVM

err_console = Console(stderr=True)


def _path_ro(value: str, what: str) -> tuple[str, bool]:
    path, sep, flag = value.rpartition(":")
    if sep and flag in ("ro", "rw"):
        return path, flag == "ro"
    if not value:
        raise click.BadParameter(f"empty {what}")
    return value, False


@click.group("uvm")
def uvm_group() -> None:
    """The utility VM: its boot files, and running commands in it."""


@uvm_group.command("build")
@click.option("--rebuild", is_flag=True, help="Build even if the cached files are current.")
def build_command(rebuild: bool) -> None:
    """Build (or find in the cache) the guest kernel and initrd.

    The kernel comes from Debian's kernel package (downloaded, not installed); the initrd holds
    busybox, the kernel modules the UVM needs, python3, crun and the uvmshim guest agent.
    """
    with err_console.status("building the UVM boot files") as status:
        boot = run_async(ensure_boot_files(rebuild=rebuild,
                                           progress=lambda m: status.update(m)))
    click.echo(f"kernel  {boot.kernel}")
    click.echo(f"initrd  {boot.initrd}")
    click.echo(f"key     {boot.key}")


@uvm_group.group("template")
def template_group() -> None:
    """UVM templates: a saved, booted UVM that every new UVM is cloned from.

    The first UVM of each machine configuration builds its template (one cold boot, saved);
    later UVMs start as clones of it in a fraction of a second. Templates live in
    $UVMSHIM_TEMPLATE_DIR (default: ~/.cache/uvmshim/templates).
    """


@template_group.command("build")
@click.option("--memory", "memory_mb", type=click.IntRange(64), default=512, show_default=True,
              help="Guest memory in MiB.")
@click.option("--cpus", type=click.IntRange(1, 64), default=None,
              help="vCPUs. Default: what a container without a CPU limit gets (2, at most half "
                   "the host's CPUs).")
@click.option("--rebuild", is_flag=True, help="Build even if a good template exists.")
@click.option("--network", is_flag=True,
              help="The template of UVMs started for a container's network namespace (its "
                   "ready NIC bound and waiting in the guest).")
def template_build_command(memory_mb: int, cpus: int | None, rebuild: bool,
                           network: bool) -> None:
    """Build the template for a UVM with these settings (if there is none yet)."""
    with err_console.status("building the UVM template") as status:
        key = run_async(build_template(memory_mb=memory_mb, cpus=cpus, rebuild=rebuild,
                                       progress=lambda m: status.update(m),
                                       ready_nic=network))
    click.echo(f"template {key}  {hostpath.template_dir() / key}")


@template_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def template_ls_command(as_json: bool) -> None:
    """List the templates: key, memory, disk use, clones running from it."""
    found = tmpl.list_templates()
    if as_json:
        dump_json([t.as_dict() for t in found])
        return
    if not found:
        click.echo(f"no templates in {hostpath.template_dir()}")
        return
    for t in found:
        d = t.as_dict()
        click.echo(f"{d['key']}  {d['memory_mb']} MiB  disk {t.disk_bytes >> 20} MiB  "
                   f"{'network' if d['ready_nic'] else 'plain':7}  "
                   f"built {d['created']} in {d['build_seconds']} s  "
                   f"clones running: {len(t.users)}")


@template_group.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every template.")
@click.option("--force", is_flag=True, help="Remove templates even while clones run from them "
              "(they keep running).")
def template_rm_command(keys: tuple[str, ...], all_: bool, force: bool) -> None:
    """Remove templates (they are rebuilt on next use)."""
    if all_:
        keys = tuple(t.key for t in tmpl.list_templates())
    elif not keys:
        raise UvmshimError("name the templates to remove (see 'uvmshim uvm template ls'), "
                           "or give --all")
    for key in keys:
        tmpl.remove_template(key, force=force)
        click.echo(f"removed {key}")


@uvm_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--disk", "disks", multiple=True, metavar="IMG[:ro]",
              help="Attach a disk image over SCSI and mount it (repeatable).")
@click.option("--share", "shares", multiple=True, metavar="DIR[:ro]",
              help="Share a host directory or file over Plan9 (repeatable).")
@click.option("--memory", "memory_mb", type=click.IntRange(64), default=512, show_default=True,
              help="Guest memory in MiB.")
@click.option("--cpus", type=click.IntRange(1, 64), default=None,
              help="vCPUs. Default: 2, at most half the host's CPUs.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(disks: tuple[str, ...], shares: tuple[str, ...], memory_mb: int,
                 cpus: int | None, command: tuple[str, ...]) -> None:
    """Boot a UVM, attach what is asked, run COMMAND in the UVM (not in a container).

    COMMAND's output is streamed and its exit status becomes uvmshim's; then everything is torn
    down. Disks are mounted at /run/mounts/m<N>, shares at /run/shares/<i>.

    \b
    Example:  uvmshim uvm exec --disk data.img:ro --share ./src -- cat /proc/mounts
    """
    code = run_async(_exec(disks, shares, memory_mb, cpus, list(command)))
    sys.exit(code)


async def _exec(disks: tuple[str, ...], shares: tuple[str, ...], memory_mb: int,
                cpus: int | None, command: list[str]) -> int:
    with err_console.status("starting") as status:
        async with start_uvm(memory_mb=memory_mb, cpus=cpus,
                             progress=lambda m: status.update(m)) as uvm:
            held = ContainerResources(uvm.id)
            try:
                for value in disks:
                    path, ro = _path_ro(value, "disk")
                    status.update(f"attaching {path}")
                    where = guestpath.global_mount_path(uvm.vm.mount_counter())
                    try:
                        mount = await uvm.vm.add_scsi(path, where, read_only=ro,
                                                      options=("ro",) if ro else ())
                    except UvmshimError as err:
                        err.where = err.where or f"--disk {value}"
                        raise
                    held.add(mount)
                    err_console.print(f"[dim]disk {path} → {mount.guest_path} "
                                      f"(SCSI {mount.controller}:{mount.lun}, "
                                      f"{'ro' if ro else 'rw'})[/dim]")
                for i, value in enumerate(shares):
                    path, ro = _path_ro(value, "share")
                    status.update(f"sharing {path}")
                    share = await _share(uvm.vm, os.path.abspath(path), i, ro, value)
                    held.add(share)
                status.stop()
                return await _run(uvm.agent, command)
            finally:
                await held.release()


async def _share(vm: UtilityVM, path: str, index: int, ro: bool, value: str) -> Plan9Share:
    target = f"/run/shares/{index}"
    try:
        st = os.stat(path)
    except OSError as err:
        raise UvmshimError(f"cannot share {path}: {err.strerror}", where=f"--share {value}") \
            from err
    if stat.S_ISDIR(st.st_mode):
        share = await vm.add_plan9(path, target, read_only=ro)
        shown = target
    else:
        directory, name = os.path.split(path)
        share = await vm.add_plan9(directory + "/", target, read_only=ro, restrict=True,
                                   allowed_names=[name])
        shown = f"{target}/{name}"
    err_console.print(f"[dim]share {path} → {shown} (Plan9 share {share.name}, "
                      f"{'ro' if ro else 'rw'})[/dim]")
    return share


async def _run(agent: AgentClient, command: list[str]) -> int:
    proc = await agent.start_exec(command)
    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    async for stream, data in proc.output():
        sink = out.get(stream, sys.stdout.buffer)
        sink.write(data)
        sink.flush()
    code = await proc.wait()
    return code if code >= 0 else 128 - code
