"""The ``uvmshim`` console script: the command line for people, or runc's.

podman, conmon and containerd's runc shim call the runtime with runc's argv, e.g.
``uvmshim --log L --log-format json create --bundle B --pid-file F ID``. We look at the argv
before importing anything heavy:

* any runc-only global flag (``--root``, ``--log``, ``--log-format``, ``--systemd-cgroup``,
  ``--rootless``, ``--criu``), or
* a first command that only runc has (``create``, ``start``, ``state``, ``kill``, ``delete``,
  ``exec``, ``ps``, ``list``, ``pause``, ``resume``, ``spec``, ``features``, ...),

selects runc mode (:mod:`uvmshim.cli.runc_cmd`) — except an ``exec`` with ``-i`` (``-it``) or
``--pod``, which runc's ``exec`` does not have: that is the people's ``exec`` into a pod's
container (:mod:`uvmshim.cli.exec_cmd`). Everything else — ``plan``, ``uvm``, ``image``,
``run``, ``leaks``, ``--help``, ``--version``, ``--debug`` followed by one of those — is the
people's CLI (:mod:`uvmshim.cli.main`), unchanged. ``run`` is the people's ``run`` unless a runc
global flag came first (runc's ``run`` is reachable that way and through ``uvmshim-runc``).
"""

from __future__ import annotations

import sys

#: runc global flags that the people's CLI does not have (``--debug`` is shared).
_RUNC_GLOBALS = ("--root", "--log", "--log-format", "--systemd-cgroup", "--rootless", "--criu")


def is_runc_argv(argv: list[str]) -> bool:
    """Whether ``argv`` (without the program name) is a runc-style invocation."""
    from uvmshim.cli.runc_cmd import RUNC_ONLY_COMMANDS

    for i, arg in enumerate(argv):
        if arg.split("=", 1)[0] in _RUNC_GLOBALS:
            return True
        if arg == "--debug":
            continue
        if arg == "exec" and _people_exec(argv[i + 1:]):
            return False
        return arg in RUNC_ONLY_COMMANDS
    return False


def _people_exec(args: list[str]) -> bool:
    """Whether ``exec``'s options (up to the container id) hold one that only the people's
    ``exec`` has: ``-i``/``--interactive`` (also in ``-it``) or ``--pod``."""
    for arg in args:
        if arg == "--" or not arg.startswith("-"):
            return False
        if arg in ("--interactive", "--pod") or arg.startswith("--pod="):
            return True
        if not arg.startswith("--") and "i" in arg[1:]:
            return True
    return False


def main() -> None:
    """Entry point of the ``uvmshim`` console script."""
    argv = sys.argv[1:]
    if is_runc_argv(argv):
        from uvmshim.cli.runc_cmd import main as runc_main

        runc_main(argv)
    from uvmshim.cli.main import main as people_main

    people_main(argv)
