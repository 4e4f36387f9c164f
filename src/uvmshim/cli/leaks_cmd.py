"""``uvmshim leaks``: list (and optionally reclaim) what uvmshim holds on this host."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from uvmshim.cli.main import dump_json
from uvmshim.runtime.leaks import collect_dead_owners, find_holdings, reclaim_all


@click.command("leaks")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--reclaim", is_flag=True,
              help="Kill leftover QEMU processes, unmount and remove leftover state.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="The OCI runtime's state root, as given to 'uvmshim --root' "
                   "(default: $UVMSHIM_ROOT, else /run/uvmshim).")
def leaks_command(as_json: bool, reclaim: bool, root: str | None) -> None:
    """List the UVMs, QEMU processes, host mounts and state directories that no live uvmshim
    process holds: what crashed or killed processes left behind.

    It looks at every directory uvmshim uses, with the environment's overrides
    ($UVMSHIM_VM_DIR, $UVMSHIM_POD_DIR, $UVMSHIM_ROOT), and at every runtime root, pod and VM
    directory uvmshim has used before. What a running process (a 'uvmshim run', a pod
    daemon, a runc container's shim) holds is not listed, and --reclaim never touches it; nor
    is the state of a created runc container (kept until 'delete'). With no leak, the exit
    status is 0; otherwise it is 1. UVM templates are listed apart: they are kept on
    purpose (remove them with 'uvmshim uvm template rm') and never reclaimed here.
    """
    holdings = find_holdings(root=root, unowned_only=True)
    if reclaim and not holdings.empty:
        for line in [*collect_dead_owners(), *reclaim_all(holdings)]:
            click.echo(line, err=True)
        holdings = find_holdings(root=root, unowned_only=True)
    if as_json:
        dump_json({"empty": holdings.empty, **holdings.as_dict()})
    elif holdings.empty:
        click.echo("uvmshim holds nothing on this host")
    if not as_json and holdings.templates:
        kept = Table(title="UVM templates (kept; not leaks)")
        for column in ("key", "path", "disk", "clones running"):
            kept.add_column(column)
        for t in holdings.templates:
            kept.add_row(t.key, str(t.path), f"{t.disk_bytes >> 20} MiB",
                         ", ".join(map(str, t.users)) or "none")
        Console().print(kept)
    if not as_json and not holdings.empty:
        table = Table(title="held by uvmshim")
        table.add_column("what")
        table.add_column("detail")
        for vm in holdings.vms:
            table.add_row("vm", f"{vm.state_dir} pid={vm.live_pid} mounts={len(vm.mounts)}")
        for pid in holdings.qemu_pids:
            table.add_row("qemu process", str(pid))
        for m in holdings.mounts:
            table.add_row("host mount", m)
        for d in holdings.state_dirs:
            table.add_row("state dir", d)
        for d in holdings.template_builds:
            table.add_row("unfinished template build", d)
        for r in holdings.net_redirects:
            table.add_row("network redirect", r)
        Console().print(table)
    sys.exit(0 if holdings.empty else 1)


@click.command("gc")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Also this OCI runtime state root (default: $UVMSHIM_ROOT, else "
                   "/run/uvmshim, and every root seen before).")
def gc_command(root: str | None) -> None:
    """Reclaim everything no live uvmshim process holds, then say what is left.

    First what the journals of dead uvmshim processes list (their QEMUs are killed, their
    mounts unmounted, their directories removed), then any other leftover 'uvmshim leaks'
    lists. Commands that create something ('run', 'pod create', the runc 'create') do the
    first part on their own. Exit status 0 when nothing is left, 1 otherwise.
    """
    for line in collect_dead_owners():
        click.echo(line, err=True)
    holdings = find_holdings(root=root, unowned_only=True)
    if not holdings.empty:
        for line in reclaim_all(holdings):
            click.echo(line, err=True)
        holdings = find_holdings(root=root, unowned_only=True)
    if holdings.empty:
        click.echo("nothing left")
        sys.exit(0)
    click.echo(f"left: {holdings.as_dict()}", err=True)
    sys.exit(1)
