"""Host time of the memory planner at klein's shapes: `plan_memory` and the default's
`cheapest` check on the footprints a recorded H200 run planned with, a fresh search (the
kept plans dropped first) and a repeated one (from the keep), for the default and each
recorded byte budget.

    python examples/plan_time.py [docs/results/h200-generate-c79-binary-auto.json ...]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_memory import _recorded_footprint  # noqa: E402  (the tests' reading of a record)

from bonsai_mlx.memory import AUTO, GB, cheapest, forget_plans, plan_memory  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, 1e3 * (time.perf_counter() - t)


def main():
    files = sys.argv[1:] or [str(ROOT / "docs/results/h200-generate-c79-binary-auto.json")]
    for name in files:
        for run in json.loads(Path(name).read_text())["runs"]:
            if not run.get("footprint"):
                continue
            fp, size = _recorded_footprint(run, Path(name).name), run["size"]
            budget = AUTO if run["budget"] == "auto" else int(run["budget_gb"] * GB)
            forget_plans()
            for how in ("fresh", "kept"):
                plan, plan_ms = timed(lambda: plan_memory(fp, size, size, budget))
                _, cheap_ms = timed(lambda: cheapest(plan, fp, size, size))
                print(json.dumps({"file": Path(name).name, "size": size, "budget": run["budget"], "search": how,
                                  "plan_memory_ms": round(plan_ms, 2), "cheapest_ms": round(cheap_ms, 2)}))


if __name__ == "__main__":
    main()
