"""``uvmshim exec``: run a command in a running container of a pod (``docker exec``'s shape).

runc also has an ``exec``; :mod:`uvmshim.cli.entry` sends ``uvmshim exec`` here when it has
``-i``/``--interactive`` or ``--pod`` (options runc's ``exec`` does not have), and to runc's
command line otherwise. ``uvmshim pod exec NAME CONTAINER`` is the same without the guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import click

from uvmshim.cli.main import run_async
from uvmshim.cli.pod_cmd import _request, exec_in_pod
from uvmshim.errors import UvmshimError
from uvmshim.hostpath import pods_dir


@click.command("exec", context_settings={"ignore_unknown_options": True,
                                         "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open to the process.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal; with -i your "
              "terminal is in raw mode until it exits.")
@click.option("--pod", default=None, metavar="NAME", help="The pod (default: the one that "
              "has CONTAINER).")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE")
@click.option("-w", "--workdir", default=None, help="Working directory in the container.")
@click.argument("container_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(interactive: bool, tty: bool, pod: str | None, env: tuple[str, ...],
                 workdir: str | None, container_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running pod container CONTAINER_ID (a pod's name: its sandbox).

    \b
      uvmshim exec -it web-1a2b3c4d -- sh
      uvmshim exec -i --pod web web-1a2b3c4d -- cat /etc/hostname
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise UvmshimError("no command given", hint="uvmshim exec -it CONTAINER -- sh")
    name = pod or run_async(find_pod(container_id))
    sys.exit(run_async(exec_in_pod(name, container_id, args, interactive=interactive,
                                   tty=tty, env=list(env), workdir=workdir)))


async def find_pod(container_id: str) -> str:
    """The running pod that has container ``container_id`` (or is named so).

    :raises UvmshimError: no pod has it, or more than one does.
    """
    base = pods_dir()
    names = sorted(d.name for d in base.iterdir()) if base.is_dir() else []
    if container_id in names:
        return container_id

    async def has(name: str) -> bool:
        with contextlib.suppress(UvmshimError):
            listing = await _request(name, {"op": "ps"})
            return container_id in (listing or {}).get("containers", [])
        return False

    found = [n for n, yes in zip(names, await asyncio.gather(*(has(n) for n in names)),
                                 strict=True) if yes]
    if not found:
        raise UvmshimError(f"no running pod has a container {container_id}",
                           hint="uvmshim pod ls; uvmshim pod ps NAME")
    if len(found) > 1:
        raise UvmshimError(f"pods {', '.join(found)} all have a container {container_id}",
                           hint="say which with --pod NAME")
    return found[0]
