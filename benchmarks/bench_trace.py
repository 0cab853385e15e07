"""The cost of building a case's steps: the trace (Python building the graph) and the first call
(TensorFlow's graph optimisation and set-up, then one step), for cases of the built-in suites,
in two trees, interleaved. Each run is a fresh interpreter that trains the case for one step
with steps_per_epoch=1 through workers.trainer.train; the op count is of the traced chunk
and the functions it calls (the while loop's body, the branches of its conds).

    python benchmarks/bench_trace.py BEFORE_TREE AFTER_TREE [--cases quick:a quick:c quick:e] [--rounds 2] [--json PATH]

It prints, per case and tree, the median seconds of each part over the rounds and the after /
before ratio of the sum (below 1: the after tree builds faster)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import TREE_CHILD_PREAMBLE  # noqa: E402

CHILD = TREE_CHILD_PREAMBLE + r"""
import workers.steps as S
import workers.trainer as T
from jobs.suites import load_suite
from workers.data import load_dataset
suite, name = sys.argv[2].split(":")
case = [c for c in load_suite(suite, ["epochs=1", "steps_per_epoch=1"]).cases if c.name == name][0]
parts, ops = [], []
real = S.Steps._call

def count(graph, seen):
    total = len(graph.get_operations())
    for function in getattr(graph, "_functions", {}).values():
        inner = getattr(function, "graph", None)
        if inner is not None and id(inner) not in seen:
            seen.add(id(inner))
            total += count(inner, seen)
    return total

def timed(self, function, *args, **kwargs):
    started = time.perf_counter()
    concrete = function.get_concrete_function()
    traced = time.perf_counter()
    out = real(self, function, *args, **kwargs)
    if not parts:
        parts.extend([traced - started, time.perf_counter() - traced])
        ops.append(count(concrete.graph, set()))
    return out

S.Steps._call = timed
T.train(case.settings, load_dataset(case.settings.data), lambda report: None)
print("RESULT " + json.dumps({"trace_s": parts[0], "first_call_s": parts[1], "ops": ops[0]}))
"""


def run(tree: str, case: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, tree, case], capture_output=True, text=True, timeout=900)
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not line:
        raise SystemExit(f"{tree} {case}: {done.stderr[-2000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--cases", nargs="+", default=["quick:a", "quick:c", "quick:e"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    trees = {"before": args.before, "after": args.after}
    results = {(label, case): [] for label in trees for case in args.cases}
    began = time.time()
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))  # interleaved, the order alternating
        for case in args.cases:
            for label in order:
                results[(label, case)].append(run(trees[label], case))
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} load {os.getloadavg()[0]:.2f}; {args.rounds} rounds; "
          f"medians; {time.time() - began:.0f} s")
    print(f"{'case':10} {'tree':7} {'ops':>7} {'trace s':>8} {'first call s':>13} {'sum s':>7} {'after/before':>13}")
    table = []
    for case in args.cases:
        sums = {}
        for label in trees:
            runs = results[(label, case)]
            trace = statistics.median(r["trace_s"] for r in runs)
            first = statistics.median(r["first_call_s"] for r in runs)
            sums[label] = statistics.median(r["trace_s"] + r["first_call_s"] for r in runs)
            row = {"case": case, "tree": label, "ops": runs[0]["ops"], "trace_s": round(trace, 2),
                   "first_call_s": round(first, 2), "sum_s": round(sums[label], 2), "runs": runs}
            table.append(row)
            ratio = f"{sums['after'] / sums['before']:.2f}x" if label == "after" else ""
            print(f"{case:10} {label:7} {row['ops']:>7} {trace:>8.2f} {first:>13.2f} {sums[label]:>7.2f} {ratio:>13}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "trees": trees, "rows": table}, handle, indent=1)


if __name__ == "__main__":
    main()
