"""``uvmshim leaks``: list (and optionally reclaim) what uvmshim holds on this host."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from uvmshim.cli.main import dump_json
from uvmshim.runtime.leaks import find_holdings, reclaim_all


@click.command("leaks")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--reclaim", is_flag=True,
              help="Kill leftover QEMU processes, unmount and remove leftover state.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="The OCI runtime's state root, as given to 'uvmshim --root' "
                   "(default: $UVMSHIM_ROOT, else /run/uvmshim).")
def leaks_command(as_json: bool, reclaim: bool, root: str | None) -> None:
    """List the UVMs, QEMU processes, host mounts and state directories uvmshim holds.

    It looks at every directory uvmshim uses, with the environment's overrides
    ($UVMSHIM_VM_DIR, $UVMSHIM_POD_DIR, $UVMSHIM_ROOT). With nothing running, this is empty and
    the exit status is 0; otherwise it is 1.
    """
    holdings = find_holdings(root=root)
    if reclaim and not holdings.empty:
        for line in reclaim_all(holdings):
            click.echo(line, err=True)
        holdings = find_holdings(root=root)
    if as_json:
        dump_json({"empty": holdings.empty, **holdings.as_dict()})
    elif holdings.empty:
        click.echo("uvmshim holds nothing on this host")
    else:
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
        Console().print(table)
    sys.exit(0 if holdings.empty else 1)
