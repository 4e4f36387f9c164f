"""The benchmark report: what a user of uvmshim waits for and pays in memory, with plots.

Runs, in one go on this machine (so every ratio compares figures of the same run):

1. **Clone vs cold boot**: ``start_uvm()`` from QEMU's start to the agent's answer, as a clone of
   the template and as a cold boot (``template=False``), interleaved round by round.
2. **``uvmshim run --rootfs R -- /bin/true``** (the whole CLI, a fresh UVM each time): cloned
   (the default) and ``--no-template``.
3. **``podman run --rm --network=none --rootfs R /bin/true``** with uvmshim, crun and runsc
   (those installed; a runtime that fails on this host is reported with its error).
4. **Memory**: ``RssAnon`` (``/proc/PID/status``) of QEMU while a small container runs in a clone
   and in a cold-booted UVM; the PSS (``/proc/PID/smaps_rollup``: shared pages divided among
   their users) of 10 idle clones together, against 10 times that of one idle cold-booted UVM.

5. **Image import** (no VM): throughput of importing the Debian bookworm minbase layer
   (``tests/debian.py``, debootstrap) uncompressed, gzip-compressed, with and without the
   dm-verity hash tree, against ``mkfs.ext4 -d`` of the same tree (the floor), interleaved
   (``bench/bench_image_import.py``); and the peak extra disk space during an import.

Targets (issues #9 and #13) are checked and printed with each figure. Writes
``docs/benchmarks/README.md`` (machine, date, tables) and ``docs/benchmarks/*.png``
(matplotlib). Needs root, QEMU, the boot files (built on first use), for the podman part
podman, and for the import part debootstrap and e2fsprogs.

``--sections`` picks what to measure (default: all): ``vm`` is parts 1-4, ``import`` part 5
(quick: no VM is started). The README then holds only the sections measured, so write a partial
report elsewhere (``--out``) than the full one.

    python bench/report.py [--rounds 3] [--out docs/benchmarks] [--skip-podman]
    python bench/report.py --sections import --out /tmp/import-report
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _uvm import median, require_root, run
from bench_podman import make_rootfs, uvmshim_binary
from uvmshim.runtime.container import Container
from uvmshim.runtime.specgen import RunOptions, build_spec
from uvmshim.runtime.vm import QemuUvm, start_uvm
from uvmshim.uvm.qemu.machine import default_kvm_probe

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

TARGETS = {
    "clone_ready_s": 0.25,
    "clone_ratio": 0.1,
    "run_s": 1.5,
    "podman_s": 2.5,
    "rss_anon_mib": 80,
    "pss_10_gib": 1.2,
}
#: Import throughput over the ``mkfs.ext4 -d`` floor's, at least (issue #13), by verity.
IMPORT_TARGETS = {False: 0.8, True: 0.6}
#: Peak extra disk space during an import over the layer's final size, at most.
IMPORT_PEAK_DISK = 1.1
#: The import variants: (compression, verity), as the report names them.
IMPORT_VARIANTS = {("none", False): "uncompressed", ("gzip", False): "gzip",
                   ("none", True): "uncompressed + verity", ("gzip", True): "gzip + verity"}
SECTIONS = ("vm", "import")


@dataclass
class Report:
    rounds: int
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M %Z"))
    load_before: tuple[float, ...] = field(default_factory=os.getloadavg)
    ready: dict[str, list[float]] = field(default_factory=lambda: {"clone": [], "cold": []})
    run: dict[str, list[float]] = field(default_factory=lambda: {"clone": [], "cold": []})
    podman: dict[str, list[float]] = field(default_factory=dict)
    podman_errors: dict[str, str] = field(default_factory=dict)
    rss_anon: dict[str, int] = field(default_factory=dict)
    pss_clones: list[int] = field(default_factory=list)
    pss_cold_one: int = 0
    rss_anon_idle_clones: list[int] = field(default_factory=list)
    #: The import section: the layer, the floor's times and each variant's (seconds).
    import_layer: str = ""
    import_mb: float = 0.0
    import_floor: list[float] = field(default_factory=list)
    imports: dict[tuple[str, bool], list[float]] = field(default_factory=dict)
    import_peak_disk: float = 0.0
    sections: tuple[str, ...] = SECTIONS
    load_after: tuple[float, ...] = ()
    machine: dict[str, str] = field(default_factory=dict)


# Section: measurements


async def ready_time(template: bool) -> float:
    """Seconds from QEMU's launch to the agent's answer (start_uvm about to yield)."""
    mark: list[float] = []

    def progress(message: str) -> None:
        if message in ("booting the utility VM", "starting the utility VM from its template"):
            mark.append(time.perf_counter())

    async with start_uvm(template=template, progress=progress) as uvm:
        ready = time.perf_counter()
        if template and uvm.template is None:
            raise SystemExit("the clone fell back to a cold boot: see the warning above")
    return ready - mark[-1]


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, check=False)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}...: exit {res.returncode}: "
                           f"{res.stderr.decode(errors='replace').strip()[-300:]}")
    return took


def status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise KeyError("Pss")


async def container_rss(template: bool, rootfs: Path) -> int:
    """RssAnon (bytes) of QEMU while ``sleep`` runs in a container in a fresh UVM."""
    spec = build_spec(RunOptions(args=["/bin/sleep", "30"], rootfs=str(rootfs)))
    async with start_uvm(template=template) as uvm:
        container = Container(uvm.vm, uvm.agent, "rss", spec)
        await container.create()
        try:
            await container.start()
            await asyncio.sleep(1.0)
            pid = uvm.machine.pid
            assert pid is not None
            return status_kib(pid, "RssAnon") * 1024
        finally:
            with contextlib.suppress(Exception):
                await container.kill(9)
            await container.delete()


async def idle_pss(count: int, template: bool) -> tuple[list[int], list[int]]:
    """PSS and RssAnon (bytes) of each of ``count`` idle UVMs running at once."""
    async with contextlib.AsyncExitStack() as stack:
        uvms: list[QemuUvm] = []
        for _ in range(count):
            uvms.append(await stack.enter_async_context(start_uvm(template=template)))
        await asyncio.sleep(2.0)  # let the last ones settle
        pids = [u.machine.pid for u in uvms]
        return ([pss_kib(p) * 1024 for p in pids if p is not None],
                [status_kib(p, "RssAnon") * 1024 for p in pids if p is not None])


# Section: the run


async def measure(report: Report, rootfs: Path, skip_podman: bool,
                  say: Callable[[str], None]) -> None:
    say("warming up (boot files, template)")
    await ready_time(True)
    await ready_time(False)
    for r in range(report.rounds):
        say(f"clone vs cold boot, round {r + 1}")
        for variant in (("clone", "cold") if r % 2 == 0 else ("cold", "clone")):
            report.ready[variant].append(await ready_time(variant == "clone"))
    cli = uvmshim_binary()
    base = [cli, "run", "--rootfs", str(rootfs), "--", "/bin/true"]
    for r in range(report.rounds):
        say(f"uvmshim run, round {r + 1}")
        report.run["clone"].append(await asyncio.to_thread(timed, base))
        report.run["cold"].append(await asyncio.to_thread(
            timed, [cli, "run", "--no-template", *base[2:]]))
    if not skip_podman:
        await asyncio.to_thread(measure_podman, report, rootfs, say)
    say("memory: a small container in a clone and in a cold-booted UVM")
    report.rss_anon["clone"] = await container_rss(True, rootfs)
    report.rss_anon["cold"] = await container_rss(False, rootfs)
    say("memory: 10 idle clones, 1 idle cold-booted UVM")
    report.pss_clones, report.rss_anon_idle_clones = await idle_pss(10, True)
    report.pss_cold_one = (await idle_pss(1, False))[0][0]


def measure_import(report: Report, say: Callable[[str], None]) -> None:
    """Import throughput vs. the ``mkfs.ext4 -d`` floor, interleaved round by round."""
    import bench_image_import as bii  # also puts tests/ on sys.path
    import debian
    import testimages

    say("import: the Debian bookworm minbase layer (debootstrap, cached for the day)")
    layer = testimages.Layer(debian.layer_tar(debian.debian_image()).read_bytes())
    report.import_mb = len(layer.tar) / 1e6
    report.import_layer = (f"Debian bookworm minbase: {report.import_mb:.1f} MB tar, "
                           f"{len(layer.gz) / 1e6:.1f} MB gzip")
    with tempfile.TemporaryDirectory(prefix="uvmshim-report-import-") as tmp:
        report.import_floor, report.imports, _, peaks = bii.interleaved(
            layer, Path(tmp), list(IMPORT_VARIANTS), report.rounds,
            on_round=lambda r: say(f"import vs mkfs.ext4 -d, round {r + 1}"))
    report.import_peak_disk = max(peaks)


def measure_podman(report: Report, rootfs: Path, say: Callable[[str], None]) -> None:
    if shutil.which("podman") is None:
        report.podman_errors["podman"] = "not installed"
        return
    tmp = Path(tempfile.mkdtemp(prefix="uvmshim-report-podman-"))
    try:
        conf = tmp / "containers.conf"
        conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", '
                        '"nproc=32768:32768"]\n')
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        base = ["run", "--rm", "--network=none", "--rootfs", str(rootfs), "/bin/true"]
        runtimes = {"uvmshim": ["podman", "--runtime", uvmshim_binary(), *base],
                    "crun": ["podman", "--runtime", "crun", *base]}
        if shutil.which("runsc"):
            runtimes["runsc"] = ["podman", "--runtime", "runsc", "--runtime-flag",
                                 "network=none", *base]
        else:
            report.podman_errors["runsc"] = "not installed"
        for name, argv in list(runtimes.items()):  # warm-up; drop what does not work here
            try:
                timed(argv, env)
            except RuntimeError as err:
                report.podman_errors[name] = str(err).splitlines()[-1][-200:]
                del runtimes[name]
        for r in range(report.rounds):
            say(f"podman run --rm, round {r + 1}")
            for name, argv in runtimes.items():
                report.podman.setdefault(name, []).append(timed(argv, env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Section: the report


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True, check=False).stdout.splitlines()[:1]
    accel = asyncio.run(default_kvm_probe().accel()).upper()
    return {"CPU": f"{cpu}, {os.cpu_count()} CPUs", "memory": f"{mem / (1 << 30):.1f} GiB",
            "kernel": platform.release(), "QEMU": qemu[0] if qemu else "?",
            "accelerator": accel, "Python": platform.python_version()}


def ms(xs: list[float]) -> str:
    """Median and range of times in seconds, in milliseconds."""
    return f"{median(xs) * 1000:.0f} ms ({min(xs) * 1000:.0f}–{max(xs) * 1000:.0f})"


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "**missed**"


def verdict_at_least(value: float, target: float) -> str:
    return "met" if value >= target else "**missed**"


def import_ratio(report: Report, variant: tuple[str, bool]) -> float:
    """The variant's import throughput over the floor's (medians of the same run)."""
    return median(report.import_floor) / median(report.imports[variant])


def plots(report: Report, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def bars(name: str, title: str, unit: str, data: dict[str, float],
             target: float | None = None) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = list(data)
        values = [data[k] for k in labels]
        ax.barh(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(labels)])
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f} {unit}" if v < 10 else f" {v:.0f} {unit}", va="center")
        if target is not None:
            ax.axvline(target, color="grey", linestyle="--", label=f"target {target} {unit}")
            ax.legend(loc="lower right")
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.set_xlim(0, max([*values, target or 0]) * 1.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append(name)

    if "import" in report.sections:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = ["mkfs.ext4 -d (floor)", *IMPORT_VARIANTS.values()]
        values = [1.0, *(import_ratio(report, v) for v in IMPORT_VARIANTS)]
        ax.barh(labels, values, color=["#8c8c8c", "#4c72b0", "#dd8452", "#55a868", "#c44e52"])
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center")
        for verity, target in IMPORT_TARGETS.items():
            ax.axvline(target, color="grey", linestyle="--" if not verity else ":",
                       label=f"target {target}" + (" (verity)" if verity else ""))
        ax.legend(loc="lower right", fontsize="small")
        ax.invert_yaxis()
        ax.set_title(f"Image import, {report.import_mb:.0f} MB tar: throughput vs. floor",
                     fontsize="medium")
        ax.set_xlabel("× floor throughput (median)")
        ax.set_xlim(0, max(values) * 1.3)
        fig.tight_layout()
        fig.savefig(out / "import.png", dpi=100)
        plt.close(fig)
        made.append("import.png")
    if "vm" not in report.sections:
        return made
    bars("ready.png", "start_uvm: QEMU start to agent ready (median)", "s",
         {"clone": median(report.ready["clone"]), "cold boot": median(report.ready["cold"])},
         TARGETS["clone_ready_s"])
    bars("run.png", "uvmshim run --rootfs R -- /bin/true (median)", "s",
         {"clone (default)": median(report.run["clone"]),
          "--no-template": median(report.run["cold"])}, TARGETS["run_s"])
    if report.podman:
        bars("podman.png", "podman run --rm --network=none --rootfs R /bin/true (median)", "s",
             {k: median(v) for k, v in report.podman.items()}, TARGETS["podman_s"])
    bars("memory.png", "QEMU RssAnon with a small container running", "MiB",
         {k: v / MiB for k, v in report.rss_anon.items()}, TARGETS["rss_anon_mib"])
    bars("pss.png", "PSS of 10 idle UVMs together", "MiB",
         {"10 clones": sum(report.pss_clones) / MiB,
          "10 cold boots (10 × one)": 10 * report.pss_cold_one / MiB},
         TARGETS["pss_10_gib"] * 1024)
    return made


def write_markdown(report: Report, out: Path, images: list[str]) -> Path:
    lines = [
        "# uvmshim benchmarks",
        "",
        f"Written by `bench/report.py` on {report.started}; {report.rounds} rounds per figure, "
        "variants interleaved; medians with (min–max). Every ratio compares figures of the "
        "same run.",
        "",
        "| machine | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in report.machine.items()],
        f"| load average before / after | {' '.join(f'{x:.2f}' for x in report.load_before)}"
        f" / {' '.join(f'{x:.2f}' for x in report.load_after)} |",
        "",
        "The machine is shared with other work: under TCG every figure here is CPU-bound, and a",
        "load average above the CPU count inflates the times.",
        "",
    ]
    if "vm" in report.sections:
        lines += vm_markdown(report)
    if "import" in report.sections:
        lines += import_markdown(report)
    lines += [
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in images],
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def import_markdown(report: Report) -> list[str]:
    floor = median(report.import_floor)
    lines = [
        "## Image import",
        "",
        f"{report.import_layer}; throughput is MB of uncompressed layer tar per second. The "
        "floor is `mkfs.ext4 -d` of the same tree, unpacked beforehand (not timed): what any "
        "importer built on mkfs cannot avoid. An import is the whole `import_image()` into a "
        "fresh store: digests, decompression, the ext4 image, the dm-verity hash tree (with "
        "verity), the VHD footer and fsync. Run by `bench/bench_image_import.py --debian` too.",
        "",
        "| | wall time | MB/s | × floor throughput | target |",
        "|---|---|---|---|---|",
        f"| `mkfs.ext4 -d` (floor) | {ms(report.import_floor)} | "
        f"{report.import_mb / floor:.0f} | 1 | |",
    ]
    for variant, label in IMPORT_VARIANTS.items():
        xs = report.imports[variant]
        ratio = import_ratio(report, variant)
        target = IMPORT_TARGETS[variant[1]]
        lines.append(f"| import, {label} | {ms(xs)} | {report.import_mb / median(xs):.0f} | "
                     f"{ratio:.2f} | ≥ {target}: {verdict_at_least(ratio, target)} |")
    lines += [
        "",
        f"Peak disk space of the store during an import, over the layer's final disk: "
        f"{report.import_peak_disk:.3f} (≤ {IMPORT_PEAK_DISK}: "
        f"{verdict(report.import_peak_disk, IMPORT_PEAK_DISK)}).",
        "",
    ]
    return lines


def vm_markdown(report: Report) -> list[str]:
    clone, cold = median(report.ready["clone"]), median(report.ready["cold"])
    lines = [
        "## Starting a utility VM",
        "",
        "| | QEMU start → agent ready | target |",
        "|---|---|---|",
        f"| clone of the template | {ms(report.ready['clone'])} | ≤ 250 ms: "
        f"{verdict(clone, TARGETS['clone_ready_s'])} |",
        f"| cold boot | {ms(report.ready['cold'])} | |",
        f"| ratio clone / cold | {clone / cold:.3f} | ≤ 0.1: "
        f"{verdict(clone / cold, TARGETS['clone_ratio'])} |",
        "",
        "## `uvmshim run --rootfs R -- /bin/true`",
        "",
        "The whole command: interpreter start, UVM, share the root, crun in the guest, tear-down.",
        "",
        "| | wall time | target |",
        "|---|---|---|",
        f"| clone (default) | {ms(report.run['clone'])} | ≤ 1.5 s: "
        f"{verdict(median(report.run['clone']), TARGETS['run_s'])} |",
        f"| `--no-template` (cold boot) | {ms(report.run['cold'])} | |",
        "",
        "## `podman run --rm --network=none --rootfs R /bin/true`",
        "",
        "| runtime | wall time | target |",
        "|---|---|---|",
    ]
    for name, xs in report.podman.items():
        target = (f"≤ 2.5 s: {verdict(median(xs), TARGETS['podman_s'])}"
                  if name == "uvmshim" else "")
        lines.append(f"| {name} | {ms(xs)} | {target} |")
    for name, why in report.podman_errors.items():
        lines.append(f"| {name} | not measured: {why} | |")
    pss10 = sum(report.pss_clones)
    lines += [
        "",
        "## Memory",
        "",
        "| | figure | target |",
        "|---|---|---|",
        f"| RssAnon of QEMU, small container running, clone | "
        f"{report.rss_anon['clone'] / MiB:.0f} MiB | ≤ 80 MiB: "
        f"{verdict(report.rss_anon['clone'] / MiB, TARGETS['rss_anon_mib'])} |",
        f"| RssAnon of QEMU, small container running, cold boot | "
        f"{report.rss_anon['cold'] / MiB:.0f} MiB | |",
        f"| PSS of 10 idle clones together | {pss10 / MiB:.0f} MiB "
        f"(each {min(report.pss_clones) / MiB:.0f}–{max(report.pss_clones) / MiB:.0f}; "
        f"RssAnon each {median([float(x) for x in report.rss_anon_idle_clones]) / MiB:.0f}) | "
        f"≤ 1.2 GiB: {verdict(pss10 / (1 << 30), TARGETS['pss_10_gib'])} |",
        f"| PSS of 1 idle cold-booted UVM (× 10) | {report.pss_cold_one / MiB:.0f} MiB "
        f"({10 * report.pss_cold_one / MiB:.0f} MiB) | |",
        "",
        "Clones map the template's RAM file privately: the pages a clone only reads are shared",
        "with the page cache and every other clone (PSS divides them among their users); a page",
        "is private (RssAnon) once the clone writes it. TCG's translated code is anonymous",
        "memory too.",
        "",
    ]
    return lines


async def main_async(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(rounds=args.rounds, sections=tuple(args.sections))

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    if "vm" in report.sections:
        with tempfile.TemporaryDirectory(prefix="uvmshim-report-") as tmp:
            rootfs = make_rootfs(Path(tmp) / "rootfs")
            (rootfs / "bin" / "sleep").symlink_to("busybox")
            await measure(report, rootfs, args.skip_podman, say)
    if "import" in report.sections:
        await asyncio.to_thread(measure_import, report, say)
    report.load_after = os.getloadavg()
    report.machine = await asyncio.to_thread(machine)
    images = plots(report, out)
    path = write_markdown(report, out, images)
    print(path.read_text())


def _sections(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in chosen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--skip-podman", action="store_true")
    ap.add_argument("--sections", type=_sections, default=list(SECTIONS),
                    help="comma-separated sections to measure and report: "
                         f"{', '.join(SECTIONS)} (default: all)")
    args = ap.parse_args()
    require_root()
    run(lambda: main_async(args))


if __name__ == "__main__":
    main()

