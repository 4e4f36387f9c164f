"""``uvmshim``: the command line for people.

Library code raises :class:`~uvmshim.errors.UvmshimError`; here, and only here, errors become a
message on stderr and a non-zero exit status. Tracebacks are shown with ``--debug`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from uvmshim import __version__, asyncutil
from uvmshim.asyncutil import cancel_on_signals
from uvmshim.errors import GuestError, UvmshimError
from uvmshim.protocol.messages import ErrorKind

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: The guest's crun could not run the container (podman's and docker's ``run`` status).
EXIT_RUNTIME = 125
#: crun found the command but could not execute it (permission denied, ...).
EXIT_CANNOT_INVOKE = 126
#: crun did not find the command.
EXIT_NOT_FOUND = 127


class State:
    debug: bool = False
    #: The terminating signal received (SIGINT or SIGTERM), if any.
    signal: int = 0


STATE = State()


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM outside the event loop: stop the way Ctrl-C stops (unwinding cleans up)."""
    STATE.signal = signum
    raise KeyboardInterrupt


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one event loop for the command; SIGINT and SIGTERM cancel it (cleanly)."""

    async def main() -> T:
        task = asyncio.current_task()
        if task is not None:
            cancel_on_signals(task)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        STATE.signal = asyncutil.received_signal or STATE.signal
        raise KeyboardInterrupt from None
    finally:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_status(err: UvmshimError) -> int:
    """The exit status for an error: 125/126/127 when the guest's crun could not run the
    container (as podman and docker ``run`` say it), else 1."""
    if isinstance(err, GuestError) and err.kind == ErrorKind.CRUN:
        reason = err.reason.lower()
        if "not found" in reason or "no such file" in reason:
            return EXIT_NOT_FOUND
        if "permission denied" in reason:
            return EXIT_CANNOT_INVOKE
        return EXIT_RUNTIME
    return EXIT_ERROR


def fail(err: UvmshimError) -> None:
    """Print an error (and its hint) the way every command does, then exit non-zero."""
    click.secho(f"uvmshim: error: {err}", fg="red", err=True)
    for note in getattr(err, "__notes__", []):
        click.echo(f"  note: {note}", err=True)
    if err.hint:
        click.echo(f"  hint: {err.hint}", err=True)


#: Each command's module and object. Commands are imported when asked for (``uvmshim run``
#: imports only what ``run`` needs: start-up time counts for every container), and from their
#: own modules, which import ``cli`` helpers from this one without a cycle.
COMMANDS = {
    "plan": ("plan_cmd", "plan_command"), "uvm": ("uvm_cmd", "uvm_group"),
    "image": ("image_cmd", "image_group"), "run": ("run_cmd", "run_command"),
    "leaks": ("leaks_cmd", "leaks_command"), "gc": ("leaks_cmd", "gc_command"),
    "pod": ("pod_cmd", "pod_group"), "exec": ("exec_cmd", "exec_command"),
}


class _LazyGroup(click.Group):
    """A group whose commands (:data:`COMMANDS`) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        import importlib

        command = getattr(importlib.import_module(f"uvmshim.cli.{where[0]}"), where[1])
        if not isinstance(command, click.Command):
            raise TypeError(f"uvmshim.cli.{where[0]}.{where[1]} is not a click command")
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uvmshim")
@click.option("--debug", is_flag=True, help="Log every step and show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Run OCI Linux containers in a QEMU utility VM, allocated the way hcsshim does it."""
    STATE.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``uvmshim`` console script."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli.main(args=argv, prog_name="uvmshim", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("uvmshim: interrupted", err=True)
        sys.exit(128 + (STATE.signal or signal.SIGINT))
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UvmshimError as err:
        if STATE.debug:
            import traceback

            traceback.print_exc()
        fail(err)
        sys.exit(exit_status(err))
    except KeyboardInterrupt:
        click.echo("uvmshim: interrupted", err=True)
        sys.exit(128 + (STATE.signal or signal.SIGINT))
    except SystemExit:
        raise


def collect_garbage() -> None:
    """Reclaim what dead uvmshim processes left (their journals say what): the first step of
    every command that creates something. Costs a directory listing when there is nothing."""
    from uvmshim.runtime.leaks import collect_dead_owners

    for line in collect_dead_owners():
        logging.getLogger("uvmshim.gc").info("%s", line)


def dump_json(obj: object) -> None:
    """Print ``obj`` as JSON (strict: a NaN or infinity is an error, never printed)."""
    click.echo(json.dumps(obj, indent=2, allow_nan=False))


MIN_MEMORY_MB = 64


def memory_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--memory``: a size in MiB, a number (MiB) or one with a unit: ``300m``, ``2g``,
    ``512MiB``, ``1GB`` (binary units, as docker's ``--memory``); None if not given."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)(?:([mgt])(?:i?b)?)?", value.strip(), re.IGNORECASE)
    if match is None:
        raise click.BadParameter(f"{value!r} is not a memory size (MiB, or with a unit: "
                                 "300m, 2g)", ctx, param)
    mb = int(match[1]) << {"m": 0, "g": 10, "t": 20}[(match[2] or "m").lower()]
    if mb < MIN_MEMORY_MB:
        raise click.BadParameter(f"{value} is smaller than {MIN_MEMORY_MB} MiB", ctx, param)
    return mb
