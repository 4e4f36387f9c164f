"""Ownership and liveness, recovery without a manual step, one winner per name (issue 15,
points 1-3): journals, ``leaks`` listing only what no live owner holds, automatic GC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from uvmshim import owners


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Every uvmshim directory under ``tmp_path`` (this process and its children)."""
    places = {"UVMSHIM_OWNERS_DIR": "owners", "UVMSHIM_VM_DIR": "vm", "UVMSHIM_ROOT": "root",
              "UVMSHIM_POD_DIR": "pods"}
    for var, sub in places.items():
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(owners, "_journal", None)
    return {**os.environ}


def holder(env: dict[str, str], path: Path, *, kind: str = owners.DIR) -> subprocess.Popen[str]:
    """A process that records ``path`` in its journal, creates it, says so and sleeps."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from uvmshim import owners
        owners.acquire({kind!r}, {str(path)!r})
        os.makedirs({str(path)!r})
        print("ready", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_dead_owner_is_reclaimed_live_owner_is_not(env: dict[str, str], tmp_path: Path) -> None:
    from uvmshim.runtime.leaks import collect_dead_owners

    live_dir, dead_dir = tmp_path / "pods" / "live", tmp_path / "pods" / "dead"
    live, dead = holder(env, live_dir), holder(env, dead_dir)
    try:
        kill(dead)
        assert {str(live_dir), str(dead_dir)} <= set(
            e.path for j in owners.read_journals() for e in j.entries)
        assert owners.live_holdings() == {str(live_dir)}
        done = collect_dead_owners()
        assert any(str(dead_dir) in line for line in done), done
        assert not dead_dir.exists() and live_dir.is_dir()
        assert [j.live for j in owners.read_journals()] == [True]  # the dead one is gone
        assert collect_dead_owners() == []
    finally:
        kill(live)


def test_leaks_lists_only_what_no_live_owner_holds(env: dict[str, str], tmp_path: Path) -> None:
    live_dir, dead_dir = tmp_path / "pods" / "live", tmp_path / "pods" / "dead"
    stray = tmp_path / "pods" / "stray"  # no journal names it: nobody holds it
    stray.mkdir(parents=True)
    live, dead = holder(env, live_dir), holder(env, dead_dir)
    kill(dead)
    try:
        res = subprocess.run([sys.executable, "-m", "uvmshim", "leaks", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        listed = json.loads(res.stdout)["state_dirs"]
        assert res.returncode == 1 and sorted(listed) == [str(dead_dir), str(stray)]
        res = subprocess.run([sys.executable, "-m", "uvmshim", "gc"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert live_dir.is_dir() and not dead_dir.exists() and not stray.exists()
    finally:
        kill(live)


def test_created_runc_container_state_is_not_a_leak(env: dict[str, str],
                                                    tmp_path: Path) -> None:
    from uvmshim.runtime.leaks import find_holdings

    containers = tmp_path / "root" / "containers"
    for cid, status in (("made", "created"), ("half", "creating")):
        (containers / cid).mkdir(parents=True)
        (containers / cid / "state.json").write_text(json.dumps({"id": cid, "status": status}))
    dirs = find_holdings(unowned_only=True).state_dirs
    assert dirs == [str(containers / "half")]
    assert len(find_holdings().state_dirs) == 2  # the tests' view: everything


def test_leaks_looks_in_every_root_seen(env: dict[str, str], tmp_path: Path) -> None:
    from uvmshim.runtime.leaks import find_holdings

    other = tmp_path / "other-root"
    (other / "containers" / "x").mkdir(parents=True)
    assert find_holdings(unowned_only=True).state_dirs == []
    owners.remember_place("root", other)
    owners.remember_place("root", other)  # once is enough
    assert owners.known_places("root") == [other]
    assert find_holdings(unowned_only=True).state_dirs == [str(other / "containers" / "x")]


def test_journal_is_written_before_and_survives_sigkill(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    target = tmp_path / "vm" / "abc"
    code = textwrap.dedent(f"""
        import os, signal
        from uvmshim import owners
        owners.acquire(owners.VM, {str(target)!r})
        os.kill(os.getpid(), signal.SIGKILL)  # before the directory is even made
    """)
    subprocess.run([sys.executable, "-c", code], env=env, check=False)
    (journal,) = owners.read_journals()
    assert not journal.live and [e.path for e in journal.entries] == [str(target)]
    target.mkdir(parents=True)  # as if it had got that far
    from uvmshim.runtime.leaks import collect_dead_owners

    collect_dead_owners()
    assert not target.exists() and owners.read_journals() == []


def test_gc_costs_little_when_there_is_nothing_to_do(env: dict[str, str],
                                                     tmp_path: Path) -> None:
    from uvmshim.runtime.leaks import collect_dead_owners

    live = [holder(env, tmp_path / "pods" / f"p{i}") for i in range(3)]
    try:
        collect_dead_owners()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            assert collect_dead_owners() == []
        per_call = (time.perf_counter() - t0) / n
        print(f"collect_dead_owners with 3 live owners, nothing to do: {per_call * 1e3:.3f} ms")
        assert per_call < 0.005
    finally:
        for p in live:
            kill(p)


def test_concurrent_pod_create_has_exactly_one_winner(env: dict[str, str],
                                                      tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys, time
        from uvmshim.cli.pod_cmd import _claim
        from uvmshim.errors import UvmshimError
        from uvmshim.hostpath import pod_dir
        time.sleep(float(sys.argv[1]) - time.time())
        try:
            _claim("web", pod_dir("web"))
        except UvmshimError as err:
            print("lost:", err, flush=True)
            sys.exit(1)
        print("won", flush=True)
        time.sleep(5)
    """)
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", code, start], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    lines = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    for p in procs:
        p.kill()
        p.wait()
    assert lines.count("won") == 1, lines
    assert all(line == "lost: pod web exists" for line in lines if line != "won"), lines
    # The winner is dead now: its pod directory is reclaimed by the next create.
    code_again = "from uvmshim.cli.pod_cmd import _claim; from uvmshim.hostpath import " \
                 "pod_dir; _claim('web', pod_dir('web')); print('won')"
    res = subprocess.run([sys.executable, "-c", code_again], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.strip() == "won", res.stderr
