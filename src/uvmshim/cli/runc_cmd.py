"""uvmshim's runc-compatible command line (``uvmshim-runc``, or ``uvmshim`` called like runc).

podman (through conmon), containerd's runc shim and CRI-O call ``<runtime> [global flags]
<command> ...`` exactly as they call runc. This module parses that with argparse (click would
cost start-up time on every call) and imports the heavy parts (asyncio, QEMU) only in the shim.

Errors: one line on stderr, ``uvmshim: <message>``, exit status 1 — or, with ``--log`` and
``--log-format json``, also a runc-style JSON line ``{"level":"error","msg":...,"time":...}``
in the log file: conmon reads the log file, go-runc (containerd) the output, as with runc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from uvmshim import __version__, hostpath
from uvmshim.errors import UvmshimError

#: Commands only runc's command line has; their presence selects runc mode in ``uvmshim``.
RUNC_ONLY_COMMANDS = frozenset({
    "create", "start", "state", "kill", "delete", "ps", "list", "pause", "resume", "spec",
    "features", "exec", "events", "update", "checkpoint", "restore"})
#: runc's global flags (with their value, if they take one).
GLOBAL_FLAGS = {"--root": True, "--log": True, "--log-format": True, "--debug": False,
                "--systemd-cgroup": False, "--rootless": True, "--criu": False}

OCI_SPEC_VERSION = "1.0.2"


class Logger:
    """Where errors go: the ``--log`` file (text or JSON lines) or stderr."""

    def __init__(self, path: str | None, fmt: str) -> None:
        self.path = path
        self.fmt = fmt

    def error(self, message: str) -> None:
        # Both, as runc's fatal() does: conmon reads the log file, go-runc (containerd) the
        # command's output.
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(self._line("error", message))
            except OSError:
                pass
        sys.stderr.write(f"uvmshim: {message}\n")

    def _line(self, level: str, message: str) -> str:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": message, "time": now}) + "\n"
        return f'time="{now}" level={level} msg="{message}"\n'


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uvmshim", add_help=True, allow_abbrev=False,
                                description="runc-compatible OCI runtime: containers in a "
                                            "QEMU utility VM.")
    p.add_argument("--root", default=str(hostpath.runtime_root()))
    p.add_argument("--log", default=None)
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true", help="linux.cgroupsPath is "
                   "systemd's slice:prefix:name (the shim and its QEMU go there)")
    p.add_argument("--rootless", default="auto")
    p.add_argument("--criu", default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--version", action="store_true")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("create")
    run = sub.add_parser("run")
    for sp in (c, run):
        sp.add_argument("-b", "--bundle", default=".")
        sp.add_argument("--pid-file")
        sp.add_argument("--console-socket")
        sp.add_argument("--no-pivot", action="store_true")
        sp.add_argument("--no-new-keyring", action="store_true")
        sp.add_argument("--preserve-fds", type=int, default=0)
        sp.add_argument("id")
    run.add_argument("-d", "--detach", action="store_true")

    for name in ("start", "pause", "resume", "state"):
        sub.add_parser(name).add_argument("id")
    k = sub.add_parser("kill")
    k.add_argument("-a", "--all", action="store_true")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    d = sub.add_parser("delete")
    d.add_argument("-f", "--force", action="store_true")
    d.add_argument("id")

    e = sub.add_parser("exec")
    e.add_argument("-p", "--process")
    e.add_argument("-d", "--detach", action="store_true")
    e.add_argument("--pid-file")
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("--console-socket")
    e.add_argument("--cwd")
    e.add_argument("-e", "--env", action="append", default=[])
    e.add_argument("-u", "--user")
    e.add_argument("--no-new-privs", action="store_true")
    e.add_argument("--preserve-fds", type=int, default=0)
    for flag in ("--process-label", "--apparmor", "--cgroup"):
        e.add_argument(flag)
    e.add_argument("-c", "--cap", action="append", default=[])
    e.add_argument("-g", "--additional-gids", action="append", default=[])
    e.add_argument("id")
    e.add_argument("args", nargs=argparse.REMAINDER)

    ps = sub.add_parser("ps")
    ps.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    ls = sub.add_parser("list")
    ls.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ls.add_argument("-q", "--quiet", action="store_true")
    sp = sub.add_parser("spec")
    sp.add_argument("-b", "--bundle", default=".")
    sp.add_argument("--rootless", action="store_true")
    sub.add_parser("features")
    u = sub.add_parser("update")
    u.add_argument("-r", "--resources", help="a JSON file of linux.resources ('-': stdin)")
    for flag in ("--memory", "--memory-reservation", "--memory-swap", "--kernel-memory",
                 "--kernel-memory-tcp", "--cpu-period", "--cpu-quota", "--cpu-rt-period",
                 "--cpu-rt-runtime", "--cpu-share", "--cpuset-cpus", "--cpuset-mems",
                 "--pids-limit", "--blkio-weight", "--l3-cache-schema", "--mem-bw-schema"):
        u.add_argument(flag)
    u.add_argument("id")
    ev = sub.add_parser("events")
    ev.add_argument("--interval", default="5s", help="stats every INTERVAL (a Go duration)")
    ev.add_argument("--stats", action="store_true", help="one stats event, then exit")
    ev.add_argument("id")
    for name in ("checkpoint", "restore"):
        sub.add_parser(name).add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _version() -> str:
    return f"uvmshim version {__version__}\nspec: {OCI_SPEC_VERSION}\n"


def _exec_process(args: argparse.Namespace) -> dict[str, Any]:
    from uvmshim.runc import ops

    if args.process:
        try:
            with open(args.process, encoding="utf-8") as f:
                process = json.load(f)
        except (OSError, ValueError) as err:
            raise UvmshimError(f"{args.process}: {err}", where="--process") from None
        if not isinstance(process, dict):
            raise UvmshimError("the process file must hold a JSON object", where="--process")
        return process
    if not args.args:
        raise UvmshimError("exec needs --process or a command", hint="uvmshim exec ID CMD...")
    process = ops.container_process(args.root, args.id)
    process["args"] = list(args.args)
    process["terminal"] = bool(args.tty)
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = [*(process.get("env") or []), *args.env]
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise UvmshimError("--user takes UID[:GID] as numbers", where="--user")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if args.additional_gids:
        gids = [g for v in args.additional_gids for g in v.split(",") if g]
        if not all(g.isdigit() for g in gids):
            raise UvmshimError("--additional-gids takes numbers", where="--additional-gids")
        user = dict(process.get("user") or {"uid": 0, "gid": 0})
        user["additionalGids"] = [int(g) for g in gids]
        process["user"] = user
    if args.cap:
        # As runc: each --cap joins the bounding, effective and permitted sets, and the
        # ambient one only if the process has inheritable capabilities.
        caps = dict(process.get("capabilities") or {})
        added = [c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
                 for c in args.cap]
        sets = ["bounding", "effective", "permitted"]
        if caps.get("inheritable"):
            sets.append("ambient")
        for name in sets:
            have = list(caps.get(name) or [])
            caps[name] = have + [c for c in added if c not in have]
        process["capabilities"] = caps
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    if args.process_label:
        process["selinuxLabel"] = args.process_label
    if args.apparmor:
        process["apparmorProfile"] = args.apparmor
    return process


#: ``update`` flags: (section of linux.resources, field, kind) as runc maps them.
UPDATE_FLAGS = {
    "memory": ("memory", "limit", "size"), "memory_reservation": ("memory", "reservation", "size"),
    "memory_swap": ("memory", "swap", "size"), "cpu_period": ("cpu", "period", "int"),
    "cpu_quota": ("cpu", "quota", "int"), "cpu_rt_period": ("cpu", "realtimePeriod", "int"),
    "cpu_rt_runtime": ("cpu", "realtimeRuntime", "int"), "cpu_share": ("cpu", "shares", "int"),
    "cpuset_cpus": ("cpu", "cpus", "str"), "cpuset_mems": ("cpu", "mems", "str"),
    "pids_limit": ("pids", "limit", "int"), "blkio_weight": ("blockIO", "weight", "int"),
}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30}


def _number(flag: str, value: str, kind: str) -> int | str:
    if kind == "str":
        return value
    text = value.strip().lower()
    if kind == "size" and text != "-1":
        digits = text.rstrip("kmgb")
        unit = _SIZE_UNITS.get(text[len(digits):])
        if digits.isdigit() and unit is not None:
            return int(digits) * unit
    elif text.lstrip("-").isdigit():
        return int(text)
    raise UvmshimError(f"invalid value for --{flag.replace('_', '-')}: {value!r}")


def _update_resources(args: argparse.Namespace) -> dict[str, Any]:
    """The ``linux.resources`` object of ``update``: ``-r`` file, then the flags on top."""
    resources: dict[str, Any] = {}
    if args.resources:
        try:
            if args.resources == "-":
                resources = json.load(sys.stdin)
            else:
                with open(args.resources, encoding="utf-8") as f:
                    resources = json.load(f)
        except (OSError, ValueError) as err:
            raise UvmshimError(f"{args.resources}: {err}", where="--resources") from None
        if not isinstance(resources, dict):
            raise UvmshimError("the resources file must hold a JSON object",
                               where="--resources")
    for name, (section, field, kind) in UPDATE_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            resources.setdefault(section, {})[field] = _number(name, value, kind)
    if args.kernel_memory or args.kernel_memory_tcp or args.l3_cache_schema or \
            args.mem_bw_schema:
        raise UvmshimError("kernel memory and Intel RDT limits are not supported by uvmshim")
    if not resources:
        raise UvmshimError("update needs --resources or a limit flag")
    return resources


def _features() -> dict[str, Any]:
    from uvmshim.runtime.hooks import ALL_HOOKS

    return {
        "ociVersionMin": "1.0.0", "ociVersionMax": OCI_SPEC_VERSION,
        "hooks": list(ALL_HOOKS), "mountOptions": ["ro", "rw", "bind", "rbind"],
        "linux": {"namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
                  "cgroup": {"v1": True, "v2": True, "systemd": True}},
        "annotations": {"io.github.uvmshim.runtime": "uvmshim", "io.uvmshim.version":
                        __version__},
    }


def _spec_template(bundle: str) -> None:
    from uvmshim.runtime.specgen import RunOptions, build_spec

    spec = build_spec(RunOptions(args=["sh"], rootfs="rootfs")).to_json()
    spec["root"] = {"path": "rootfs", "readonly": True}
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        raise UvmshimError(f"File {path} exists. Remove it first")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")


def dispatch(args: argparse.Namespace) -> int:
    """Run one parsed command; return the exit status."""
    from uvmshim.runc import ops

    cmd = args.command
    if cmd in ("create", "run"):
        from uvmshim.runc.create import create

        foreground = cmd == "run" and not args.detach
        pid = create(args.root, args.id, args.bundle, pid_file=args.pid_file,
                     console_socket=args.console_socket, log_path=args.log, debug=args.debug,
                     wait=foreground, systemd_cgroup=args.systemd_cgroup)
        if cmd == "create":
            return 0
        ops.start(args.root, args.id)
        if args.detach:
            return 0
        _, status = os.waitpid(pid, 0)
        ops.delete(args.root, args.id, force=True)
        return os.waitstatus_to_exitcode(status) & 0xFF
    if cmd == "start":
        ops.start(args.root, args.id)
    elif cmd == "state":
        sys.stdout.write(json.dumps(ops.state(args.root, args.id), indent=2) + "\n")
    elif cmd == "kill":
        ops.kill(args.root, args.id, ops.parse_signal(args.signal), args.all)
    elif cmd == "delete":
        ops.delete(args.root, args.id, args.force)
    elif cmd == "pause":
        ops.pause(args.root, args.id)
    elif cmd == "resume":
        ops.resume(args.root, args.id)
    elif cmd == "exec":
        return ops.exec_process(args.root, args.id, _exec_process(args),
                                console_socket=args.console_socket, detach=args.detach,
                                pid_file=args.pid_file) & 0xFF
    elif cmd == "update":
        ops.update(args.root, args.id, _update_resources(args))
    elif cmd == "events":
        _events(args)
    elif cmd == "ps":
        pids = ops.ps(args.root, args.id)
        if args.format == "json":
            sys.stdout.write(json.dumps(pids) + "\n")
        else:
            sys.stdout.write("PID (in the utility VM)\n" + "".join(f"{p}\n" for p in pids))
    elif cmd == "list":
        _list(args)
    elif cmd == "spec":
        _spec_template(args.bundle)
    elif cmd == "features":
        sys.stdout.write(json.dumps(_features(), indent=2) + "\n")
    else:
        raise UvmshimError(f"{cmd} is not supported by uvmshim")
    return 0


def _events(args: argparse.Namespace) -> None:
    from uvmshim.runc import ops
    from uvmshim.runc.stats import parse_interval

    try:
        interval = parse_interval(args.interval)
    except ValueError:
        raise UvmshimError(f"invalid value {args.interval!r} for flag -interval: parse error")\
            from None

    def emit(event: dict[str, Any]) -> None:  # one JSON object a line, as Go's json.Encoder
        sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    ops.events(args.root, args.id, interval=interval, once=args.stats, emit=emit)


def _list(args: argparse.Namespace) -> None:
    from uvmshim.runc import ops

    states = ops.list_states(args.root)
    if args.quiet:
        sys.stdout.write("".join(f"{s['id']}\n" for s in states))
    elif args.format == "json":
        sys.stdout.write(json.dumps(states) + "\n")
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s.get("pid", 0)), s["status"], s.get("bundle", ""),
                  s.get("created", ""), s.get("owner", "") or "root") for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            sys.stdout.write("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                             .rstrip() + "\n")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``uvmshim-runc`` (and of ``uvmshim`` in runc mode)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(args_in)
    except SystemExit as exc:
        sys.exit(exc.code if exc.code is not None else 0)
    if args.version:
        sys.stdout.write(_version())
        sys.exit(0)
    if args.command is None:
        parser.print_usage(sys.stderr)
        sys.exit(2)
    logger = Logger(args.log, args.log_format)
    try:
        code = dispatch(args)
    except UvmshimError as err:
        if args.debug:
            import traceback

            traceback.print_exc()
        logger.error(str(err))
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("interrupted")
        sys.exit(130)
    sys.exit(code)
