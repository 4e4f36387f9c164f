"""``uvmshim plan``: a dry run of the allocation on a simulated UVM."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from uvmshim.cli.main import dump_json, run_async
from uvmshim.plan import PlanResult, plan
from uvmshim.spec import load_bundle
from uvmshim.uvm.options import UvmOptions


@click.command("plan")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--id", "container_id", default="", help="Container id (default: a new GUID).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--no-uvm", is_flag=True,
              help="Process isolation: validate mounts and leave them as they are.")
@click.option("--vpmem-count", type=click.IntRange(0, 128), default=None,
              help="vPMEM devices for layers (default: from annotations, else 0 = off).")
@click.option("--scsi-controllers", type=click.IntRange(1, 4), default=None,
              help="SCSI controllers (default: 4 without vPMEM, else 1).")
def plan_command(path: str, container_id: str, as_json: bool, no_uvm: bool,
                 vpmem_count: int | None, scsi_controllers: int | None) -> None:
    """Show what running the spec at PATH (config.json or a bundle) would allocate.

    The allocation runs on a fresh simulated UVM: nothing is booted, but layer and disk files
    named in the spec must exist, as they would for a real run; what 'uvmshim run' would
    refuse, this refuses with the same message. Relative paths are relative to the bundle.
    """
    spec = load_bundle(path)
    options = None
    if vpmem_count is not None or scsi_controllers is not None:
        base = UvmOptions.from_annotations(spec.annotations)
        options = UvmOptions(
            scsi_controllers=scsi_controllers if scsi_controllers is not None
            else base.scsi_controllers,
            vpmem_count=vpmem_count if vpmem_count is not None else base.vpmem_count,
            vpmem_max_size=base.vpmem_max_size,
            fully_physically_backed=base.fully_physically_backed,
            no_writable_file_shares=base.no_writable_file_shares,
        )
    result = run_async(plan(spec, container_id=container_id, use_uvm=not no_uvm,
                            options=options))
    if as_json:
        dump_json(result.to_json())
    else:
        show(result)


def _yes(value: Any) -> str:
    return "ro" if value else "rw"


def show(result: PlanResult) -> None:
    console = Console()
    alloc = result.allocation
    console.print(f"[bold]container[/bold] {alloc.container_id}   "
                  f"[bold]root[/bold] {alloc.spec.root.path if alloc.spec.root else ''}")
    if alloc.resources.lcow_scratch_path:
        console.print(f"[bold]scratch[/bold] {alloc.resources.lcow_scratch_path}")

    table = Table(title="Resources (released newest first)")
    for col in ("kind", "where", "host path", "guest path", "mode", "owner"):
        table.add_column(col)
    for r in result.resources:
        kind = r["kind"] + (f" ({r['role']})" if "role" in r else "")
        where = ""
        if r["kind"] == "scsi":
            where = f"{r['controller']}:{r['lun']}"
        elif r["kind"] == "plan9":
            where = f"share {r['name']}"
        elif r["kind"] == "vpmem":
            where = f"pmem{r['device']}"
        table.add_row(kind, where, r.get("host_path", ""), r.get("guest_path", ""),
                      _yes(r.get("read_only")), r.get("owner", ""))
    console.print(table)

    mounts = Table(title="Mounts")
    for col in ("#", "destination", "type", "source (host)", "source (guest)"):
        mounts.add_column(col)
    for i, (before, after) in enumerate(zip(result.input_spec.mounts, alloc.spec.mounts,
                                            strict=True)):
        kind = before.type if before.type == after.type else f"{before.type} → {after.type}"
        mounts.add_row(str(i), after.destination, kind, before.source,
                       after.source if after.source != before.source else "(unchanged)")
    console.print(mounts)

    ops = Table(title="Operations")
    for col in ("#", "side", "operation", "details"):
        ops.add_column(col)
    for op in result.operations:
        ops.add_row(str(op.seq), op.side, op.op,
                    " ".join(f"{k}={v}" for k, v in op.args.items()))
    console.print(ops)
    differences = guest_differences(alloc.guest_document, alloc.hcsshim_document)
    if differences:
        diff = Table(title="Guest document: applied by uvmshim, dropped by hcsshim")
        for col in ("field", "applied in the guest"):
            diff.add_column(col)
        for name, value in differences:
            diff.add_row(name, value)
        console.print(diff)
    if result.release_operations:
        left = "nothing left" if not result.leftovers else f"LEFT: {result.leftovers}"
        console.print(f"released in {len(result.release_operations)} operations; {left}")


def guest_differences(applied: dict[str, Any] | None,
                      hcsshim: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The hooks and ``linux.resources`` fields of the guest document that hcsshim's
    ``createLCOWSpec`` would have dropped, each with its value (JSON)."""
    if not applied or not hcsshim:
        return []
    import json

    out: list[tuple[str, str]] = []
    a, h = applied["OciSpecification"], hcsshim["OciSpecification"]
    for name, value in (a.get("hooks") or {}).items():
        if name not in (h.get("hooks") or {}):
            out.append((f"hooks.{name}", json.dumps(value)))
    ares = (a.get("linux") or {}).get("resources") or {}
    hres = (h.get("linux") or {}).get("resources") or {}
    for name, value in ares.items():
        if name not in hres:
            out.append((f"linux.resources.{name}", json.dumps(value)))
    return out
