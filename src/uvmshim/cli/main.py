"""``uvmshim``: the command line for people.

Library code raises :class:`~uvmshim.errors.UvmshimError`; here, and only here, errors become a
message on stderr and a non-zero exit status. Tracebacks are shown with ``--debug`` only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from uvmshim import __version__
from uvmshim.errors import UvmshimError

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class State:
    debug: bool = False


STATE = State()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one event loop for the command."""
    return asyncio.run(coro)


def fail(err: UvmshimError) -> None:
    """Print an error (and its hint) the way every command does, then exit non-zero."""
    click.secho(f"uvmshim: error: {err}", fg="red", err=True)
    for note in getattr(err, "__notes__", []):
        click.echo(f"  note: {note}", err=True)
    if err.hint:
        click.echo(f"  hint: {err.hint}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uvmshim")
@click.option("--debug", is_flag=True, help="Log every step and show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Run OCI Linux containers in a QEMU utility VM, allocated the way hcsshim does it."""
    STATE.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    # Commands live in their own modules and are imported here, at start-up, so that each
    # module can import ``cli`` helpers from this one without a cycle.
    import importlib

    for module, name in (("plan_cmd", "plan_command"), ("uvm_cmd", "uvm_group"),
                         ("image_cmd", "image_group"), ("run_cmd", "run_command"),
                         ("leaks_cmd", "leaks_command"), ("pod_cmd", "pod_group")):
        cli.add_command(getattr(importlib.import_module(f"uvmshim.cli.{module}"), name))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``uvmshim`` console script."""
    _register()
    try:
        cli.main(args=argv, prog_name="uvmshim", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("uvmshim: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UvmshimError as err:
        if STATE.debug:
            import traceback

            traceback.print_exc()
        fail(err)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("uvmshim: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise


def dump_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2))

