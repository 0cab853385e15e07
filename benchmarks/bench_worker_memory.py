"""A long-lived worker's memory as it meets new structures: each tree in a fresh interpreter
trains allconv9 (width 0.25, adam) on digits for two steps per case, 12 cases of 6 batch sizes
(each batch size is a structure of its own), with a StepCache that keeps one structure, so every
case traces anew and evicts the one before. After each case (and a gc.collect) it reads the
process's resident memory.

    python benchmarks/bench_worker_memory.py TREE [TREE ...] [--cases 12] [--json PATH]

It prints each tree's resident MB after the first and the last case, their ratio, and the
growth per case over the second half (about 0 when evicted steps are freed)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import TREE_CHILD_PREAMBLE  # noqa: E402

CHILD = TREE_CHILD_PREAMBLE + r"""
from workers import settings as settings_module
from workers.actor import resident_mb
from workers.data import load_dataset
from workers.steps import StepCache
from workers.trainer import train

cache = StepCache(max_entries=1)
base = {"model": "allconv9", "width": 0.25, "init": "xavier", "optimizer": "adam", "lr": 0.001,
        "epochs": 1, "steps_per_epoch": 2, "data": {"name": "digits", "train_size": 64, "test_size": 32}}
sizes = [16, 8, 12, 10, 14, 6]
out = []
for i in range(int(sys.argv[2])):
    case = settings_module.from_dict({**base, "batch_size": sizes[i % len(sizes)]})
    train(case, load_dataset(case.data), lambda report: None, cache=cache, commit_every=1e9)
    gc.collect()
    out.append(resident_mb())
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for tree in args.trees:
        done = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(tree), str(args.cases)],
                              capture_output=True, text=True, check=True)
        mb = json.loads(done.stdout.strip().splitlines()[-1])
        half = len(mb) // 2
        per_case = (mb[-1] - mb[half - 1]) / (len(mb) - half)
        results[tree] = {"resident_mb": mb, "last_over_first": mb[-1] / mb[0], "mb_per_case_second_half": per_case}
        print(f"{tree}: {mb[0]:.0f} MB after the first case, {mb[-1]:.0f} MB after case {len(mb)} "
              f"({mb[-1] / mb[0]:.3f}x); {per_case:+.1f} MB a case over the second half", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
