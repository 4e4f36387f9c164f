"""Benchmark: ``podman run --rm --network=none --rootfs R /bin/true`` with uvmshim, crun, runsc.

Same run, same rootfs (a busybox directory), runtimes interleaved so that background load hits
them alike. For uvmshim, the runtime is a wrapper that times each of uvmshim's own CLI
invocations (podman calls create via conmon, then start and delete), and the interpreter
start-up (``uvmshim --version``, ``uvmshim state``) is measured on its own. ``create`` includes
booting the utility VM, which is most of uvmshim's time.

Needs podman (and runsc for the gVisor column; skipped if missing) and the host fixes of
``docs/oci-runtime.md`` (podman: the hugetlb cgroup mount; ulimits via ``CONTAINERS_CONF``,
which this script sets up itself).

    python bench/bench_podman.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def make_rootfs(path: Path) -> Path:
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", path / "bin" / "busybox")
    for applet in ("sh", "true", "echo"):
        os.symlink("busybox", path / "bin" / applet)
    return path


def uvmshim_binary() -> str:
    here = Path(sys.executable).parent / "uvmshim"
    return str(here) if here.exists() else shutil.which("uvmshim") or "uvmshim"


WRAPPER = """#!/bin/sh
# Times one uvmshim CLI call: "<verb> <seconds>" per line.
t0=$(date +%s.%N)
"{binary}" "$@"
rc=$?
t1=$(date +%s.%N)
verb=""
for a in "$@"; do case "$a" in create|start|delete|kill|state|exec) verb=$a; break;; esac; done
echo "$verb $(awk "BEGIN {{print $t1 - $t0}}")" >> "{log}"
exit $rc
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs) * 1000:8.0f} ± {sd * 1000:5.0f} ms (n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("podman") is None:
        sys.exit("podman is not installed (apt-get install podman)")
    tmp = Path(tempfile.mkdtemp(prefix="uvmshim-bench-podman-"))
    rootfs = make_rootfs(tmp / "rootfs")
    conf = tmp / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", '
                    '"nproc=32768:32768"]\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    log = tmp / "cli-times.log"
    wrapper = tmp / "uvmshim"  # the name podman sees: no runc-only global flags, as for uvmshim
    wrapper.write_text(WRAPPER.format(binary=uvmshim_binary(), log=log))
    wrapper.chmod(0o755)
    base = ["run", "--rm", "--network=none", "--rootfs", str(rootfs), "/bin/true"]
    runtimes: dict[str, list[str]] = {
        "uvmshim": ["podman", "--runtime", str(wrapper), *base],
        "crun": ["podman", "--runtime", "crun", *base],
    }
    if shutil.which("runsc"):
        runtimes["runsc"] = ["podman", "--runtime", "runsc", "--runtime-flag", "network=none",
                             *base]
    results: dict[str, list[float]] = defaultdict(list)
    for argv in runtimes.values():  # warm-up (boot files, image store)
        timed(argv, env)
    log.write_text("")
    for _ in range(args.repeat):
        for name, argv in runtimes.items():
            results[name].append(timed(argv, env))
    cli: dict[str, list[float]] = defaultdict(list)
    for line in log.read_text().splitlines():
        verb, _, secs = line.partition(" ")
        cli[verb or "other"].append(float(secs))
    startup: dict[str, list[float]] = {"--version": [], "state (unknown id)": []}
    for _ in range(10):
        startup["--version"].append(timed([uvmshim_binary(), "--version"], env))
        t0 = time.perf_counter()
        subprocess.run([uvmshim_binary(), "--root", str(tmp), "state", "x"],
                       capture_output=True, check=False)
        startup["state (unknown id)"].append(time.perf_counter() - t0)

    print(f"podman run --rm --network=none --rootfs DIR /bin/true  ({args.repeat} runs each)")
    for name in runtimes:
        print(f"  {name:8s} {fmt(results[name])}")
    if "runsc" not in runtimes:
        print("  runsc    not installed (Debian: apt-get install runsc)")
    print("uvmshim's own CLI calls during those runs (wall time of each call):")
    for verb, xs in sorted(cli.items()):
        print(f"  {verb:8s} {fmt(xs)}")
    print("uvmshim interpreter start-up:")
    for what, xs in startup.items():
        print(f"  {what:20s} {fmt(xs)}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
