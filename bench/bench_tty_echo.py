"""Benchmark: keystroke echo round trip through a container's terminal, uvmshim vs crun.

A container runs ``sh -c 'stty raw -echo; head -c N'`` on a terminal; the benchmark, holding the
outer pty like a person's terminal, writes one byte and waits for ``cat``'s echo of it, over and
over (a pause between keystrokes, as typing has). Same run, same rootfs (a busybox directory):

* ``uvmshim run -it`` (the people's CLI: user terminal → uvmshim → agent → guest pty → cat);
* ``podman run -it`` with uvmshim as the runtime (terminal → podman → conmon → the shim's host
  pty → shim → agent → guest pty → cat);
* ``podman run -it`` with crun (terminal → podman → conmon → the container's pty → cat), the
  baseline.

Needs podman and the host fixes of ``docs/oci-runtime.md`` (the hugetlb cgroup mount, made and
undone here if missing; ulimits via ``CONTAINERS_CONF``, set up here).

    python bench/bench_tty_echo.py [--keys N]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ptydriver import PtyProcess

PAUSE = 0.02  # between keystrokes


def make_rootfs(path: Path) -> Path:
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", path / "bin" / "busybox")
    for applet in ("sh", "head", "stty", "echo"):
        os.symlink("busybox", path / "bin" / applet)
    return path


def uvmshim_binary() -> str:
    here = Path(sys.executable).parent / "uvmshim"
    return str(here) if here.exists() else shutil.which("uvmshim") or "uvmshim"


def echo_times(argv: list[str], env: dict[str, str], keys: int) -> list[float]:
    """Round trips (s) of ``keys`` keystrokes to ``cat`` in the container started by argv."""
    script = ["sh", "-c", f"stty raw -echo; echo READY; head -c {keys}"]
    with PtyProcess([*argv, *script], env=env, rows=24, cols=80) as p:
        p.expect("READY", timeout=300)
        time.sleep(0.5)
        times = []
        for i in range(keys):
            key = "abcdefghijklmnopqrstuvwxyz"[i % 26]
            t0 = time.perf_counter()
            p.write(key)
            p.expect(key, timeout=30)
            times.append(time.perf_counter() - t0)
            time.sleep(PAUSE)
        if p.wait(timeout=120) != 0:  # head has read them all: the container exits
            raise SystemExit(f"{argv[0]}: {bytes(p.output)[-500:]!r}")
    return times


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=300)
    args = parser.parse_args()
    uvmshim = uvmshim_binary()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tty-"))
    mounted = False
    try:
        rootfs = make_rootfs(tmp / "rootfs")
        conf = tmp / "containers.conf"
        conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", '
                        '"nproc=32768:32768"]\n')
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
        hugetlb = Path("/sys/fs/cgroup/hugetlb")
        if unified.exists() and "hugetlb" in unified.read_text().split() and \
                not os.path.ismount(hugetlb):
            hugetlb.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(hugetlb)],
                           check=True)
            mounted = True
        podman = ["podman", "run", "--rm", "-it", "--network=none", "--rootfs", str(rootfs)]
        cases = {
            "uvmshim run -it": [uvmshim, "run", "-it", "--rootfs", str(rootfs), "--"],
            "podman + uvmshim": [podman[0], "--runtime", uvmshim, *podman[1:]],
            "podman + crun": [podman[0], "--runtime", "crun", *podman[1:]],
        }
        results = {name: echo_times(argv, env, args.keys) for name, argv in cases.items()}
        base = statistics.median(results["podman + crun"])
        print(f"keystroke echo round trip, {args.keys} keys each "
              f"(host write -> echo back through the container's pty)")
        print(f"{'':18} {'median ms':>10} {'p99 ms':>8} {'x crun (median)':>16}")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:18} {med * 1e3:10.2f} {p99(times) * 1e3:8.2f} {med / base:16.1f}")
    finally:
        if mounted:
            subprocess.run(["umount", "/sys/fs/cgroup/hugetlb"], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
