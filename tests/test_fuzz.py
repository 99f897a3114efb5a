"""Fuzzing the loaders: 2,000+ mutated model folders per run (cases in fuzz_cases.py).

The cases run in worker processes, many per process (a process per case would spend the
run importing), two at a time on two cores. Each worker has its address space capped
(RLIMIT_AS) and is watched: a case that prints nothing for WATCHDOG_S seconds is a hang,
a worker that dies by a signal a crash; either way the worker is replaced and the rest
of its batch goes on. Every case must load or raise one of bonsai_mlx's documented
errors naming the mutated file.

BONSAI_FUZZ_CASES sets the number of cases and BONSAI_FUZZ_SEED the seed (defaults:
2,100 and 12); BONSAI_FUZZ_REPORT names a JSON file for the outcome table.
"""

import collections
import json
import os
import resource
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fuzz_cases

CASES = int(os.environ.get("BONSAI_FUZZ_CASES", 2100))
SEED = int(os.environ.get("BONSAI_FUZZ_SEED", 12))
WORKERS = 2
BATCH = 550  # cases per worker process
WATCHDOG_S = 60  # no result for this long: the case hangs
BATCH_S = 600  # a whole batch
MEMORY_CAP = 6 << 30  # bytes of address space per worker (about 1.3 GB of it is imports)
OK = ("loaded", "refused")


def _cap_memory():
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    except (ValueError, OSError):  # macOS refuses RLIMIT_AS; the watchdog still bounds the run
        pass


def run_batch(base: Path, work: Path, cases: list[int]) -> list[dict]:
    """Results of `cases`, one per case, restarting the worker after a hang or a crash."""
    results, todo = [], list(cases)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    while todo:
        proc = subprocess.Popen([sys.executable, str(Path(fuzz_cases.__file__)), str(base), str(work), str(SEED)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                preexec_fn=_cap_memory, env=env, text=True)
        proc.stdin.write(json.dumps(todo) + "\n")
        proc.stdin.close()
        start, failure = time.monotonic(), None
        while todo:
            ready, _, _ = select.select([proc.stdout], [], [], WATCHDOG_S)
            line = proc.stdout.readline() if ready else None
            if line:
                r = json.loads(line)
                assert r["case"] == todo[0]
                results.append(r)
                todo.pop(0)
                if time.monotonic() - start > BATCH_S:
                    failure = "batch over time"
                    break
                continue
            failure = "hang" if line is None else "crash"
            break
        if failure:
            proc.kill()
        code = proc.wait()
        if failure and todo:
            why = f"{failure} (exit {code})" if failure == "crash" else failure
            results.append({"case": todo.pop(0), "outcome": why, "target": "?", "mutation": "?"})
    return results


def table(results: list[dict]) -> dict:
    by_outcome = collections.Counter(r["outcome"] for r in results)
    by_target = collections.defaultdict(collections.Counter)
    for r in results:
        by_target[r["target"]][r["outcome"]] += 1
    by_family = collections.defaultdict(collections.Counter)
    for r in results:
        by_family[r.get("family", "?")][r["outcome"]] += 1
    errors = collections.Counter(r["error"] for r in results if r["outcome"] == "refused")
    return {"cases": len(results), "seed": SEED, "outcomes": dict(by_outcome), "errors": dict(errors),
            "by_target": {t: dict(c) for t, c in sorted(by_target.items())},
            "by_family": {f: dict(c) for f, c in sorted(by_family.items())},
            "failures": [r for r in results if r["outcome"] not in OK]}


def test_fuzz_loaders(tmp_path):
    t0 = time.perf_counter()
    base = fuzz_cases.build_bases(tmp_path / "base")
    batches = [list(range(s, min(s + BATCH, CASES))) for s in range(0, CASES, BATCH)]
    with ThreadPoolExecutor(WORKERS) as pool:
        parts = list(pool.map(lambda b: run_batch(base, tmp_path / f"work{b[0]}", b), batches))
    results = sorted((r for p in parts for r in p), key=lambda r: r["case"])
    report = {**table(results), "seconds": round(time.perf_counter() - t0, 1)}
    if os.environ.get("BONSAI_FUZZ_REPORT"):
        Path(os.environ["BONSAI_FUZZ_REPORT"]).write_text(json.dumps({**report, "results": results}, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1))
    assert len(results) == CASES and sorted(r["case"] for r in results) == list(range(CASES))
    assert report["failures"] == [], json.dumps(report["failures"][:10], indent=1)
    # Both outcomes occur for most targets: the mutations reach past the first check.
    assert report["outcomes"].get("loaded", 0) > CASES // 20 and report["outcomes"].get("refused", 0) > CASES // 2
