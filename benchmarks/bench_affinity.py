"""Which worker runs which case: a study's wall time and how many times its structures were
traced (and compiled), for two trees, in interleaved rounds.

    python benchmarks/bench_affinity.py BEFORE AFTER [--suite SUITE ...] [--rounds 2] [--json PATH]

BEFORE and AFTER are checkouts (a `git archive` of a commit will do). Each round runs every
suite with `jobs.study.run_study(SUITE, out=tmp, progress_every=0, report=False)` in a fresh
interpreter with PYTHONPATH=TREE, on a private local Ray of every core (one CPU a case), BEFORE
then AFTER, then AFTER then BEFORE in the next round. Wall time is around the call. Traces
(builds) are counted from the run directory the same way for both trees: the distinct pairs of
(worker pid, structure), where a case's structure is its settings but those in
workers.steps.PER_CASE_FIELDS (a worker keeps four structures; these suites have two, so a
worker builds each structure it runs once). The ratio printed is AFTER / BEFORE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, cpu_pressure, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITES = [str(ROOT / "benchmarks" / "suites" / "seeds-xla.yaml"), str(ROOT / "benchmarks" / "suites" / "sweep-40.yaml")]

RUN = """
import json, sys, time
from jobs.study import run_study
started = time.perf_counter()
result = run_study(sys.argv[1], out=sys.argv[2], progress_every=0, report=False)
print("RESULT " + json.dumps({"wall": time.perf_counter() - started, "exit": result.exit_code}))
"""


def builds(run: Path) -> tuple[int, int]:
    """(builds, cases): distinct (worker pid, structure) pairs, and the cases run."""
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from workers.steps import PER_CASE_FIELDS

    cases = pd.read_parquet(run / "cases.parquet")
    structure = {str(row.case_id): json.dumps({k: v for k, v in json.loads(row.settings_json).items()
                                               if k not in PER_CASE_FIELDS}, sort_keys=True)
                 for row in cases.itertuples()}
    pairs = set()
    for path in (run / "ledger").glob("*.json"):
        entry = json.loads(path.read_text())
        pairs.add((entry["info"]["pid"], structure[entry["case_id"]]))
    return len(pairs), len(cases)


def run_once(tree: str, suite: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "2"}
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-c", RUN, suite, str(out)], env=env, cwd=folder, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{tree} {suite}: {done.stderr[-2000:]}")
        result = json.loads(done.stdout.split("RESULT ", 1)[1])
        built, cases = builds(out)
        return {"tree": tree, "suite": Path(suite).stem, "wall": round(result["wall"], 2), "builds": built,
                "cases": cases, "load": round(load, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--suite", nargs="*", default=SUITES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    print(f"# {cpu_model()}, {os.cpu_count()} cores, up {uptime()}, CPU pressure {cpu_pressure()}", flush=True)
    for round_ in range(args.rounds):
        trees = [args.before, args.after] if round_ % 2 == 0 else [args.after, args.before]
        for suite in args.suite:
            for tree in trees:
                result = {"round": round_ + 1, **run_once(tree, suite)}
                results.append(result)
                print(json.dumps(result), flush=True)
    for suite in args.suite:
        name = Path(suite).stem
        walls = {t: sorted(r["wall"] for r in results if r["suite"] == name and r["tree"] == t) for t in (args.before, args.after)}
        built = {t: sorted(r["builds"] for r in results if r["suite"] == name and r["tree"] == t) for t in (args.before, args.after)}
        ratio = walls[args.after][0] / walls[args.before][0]
        print(f"{name}: best wall before {walls[args.before][0]:.1f} s, after {walls[args.after][0]:.1f} s "
              f"(after / before {ratio:.2f}); builds before {built[args.before]}, after {built[args.after]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
