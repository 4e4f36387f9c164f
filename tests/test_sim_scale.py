"""Release in the simulated UVM is O(1) per resource: planning 10,000 binds (allocate and
release) does about 10x the work of planning 1,000, not 24x-90x as with a list scan per unmount.

Work is counted, not timed (speed itself is measured in ``bench/bench_plan.py``): the number of
Python function calls, which is exact and the same on a loaded machine. A scan per unmount shows
up as calls too (one comparison helper or generator step per element)."""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Any

from uvmshim.plan import plan
from uvmshim.spec import Spec

from helpers import run


def _spec(root: Path, n: int) -> Spec:
    dirs = [root / f"d{i}" for i in range(8)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    obj: dict[str, Any] = {"root": {"path": str(root)}, "linux": {}, "mounts": [
        {"destination": f"/m{i}", "type": "bind", "source": str(dirs[i % 8])}
        for i in range(n)]}
    return Spec.from_json(obj)


def _calls(spec: Spec) -> int:
    profile = cProfile.Profile()
    profile.enable()
    result = run(plan(spec, container_id="c"))
    profile.disable()
    assert result.leftovers == {}
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


def test_plan_of_many_binds_grows_linearly(tmp_path: Path) -> None:
    small, large = _calls(_spec(tmp_path, 1000)), _calls(_spec(tmp_path, 10000))
    print(f"plan 1,000 binds: {small} calls, 10,000: {large} calls: {large / small:.2f}x")
    assert large / small <= 11
