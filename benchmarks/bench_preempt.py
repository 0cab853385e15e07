"""How long a case stops, and how many attempts it uses, when its GPU node is preempted.

On a cold fake autoscaling cluster (tests/raycluster.py: Ray's fake multi-node provider,
token auth on, GPU nodes of 2 GPUs, the GCS's default health check unless --health-check-ms),
two moons cases start on one GPU node; once both have committed, the node is SIGKILLed whole
(raylet, agents, workers). Measured per case: seconds from the kill until the case runs again
on another node (its ledger entry says running there), and the attempts it used.

Each variant is a copy of the source tree at a git revision (`--before`, default main, and
`--after`, default the working tree), run in turn, each on its own fresh cluster, so both
meet the same autoscaler; the ratio after/before of the mean seconds lost is printed.

    python benchmarks/bench_preempt.py [--before REV] [--after REV|.] [--rounds 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from raycluster import autoscaling_head, kill_fake_node  # noqa: E402
from tests.helpers import ledger  # noqa: E402  (the tests' ledger reader: by case name, skips a half-written entry)

MOONS = {"model": "mlp", "hidden": [8], "optimizer": "sgd", "lr": 2.0, "batch_size": 0, "seed": 7,
         "eval_every": 1000, "data": {"name": "moons", "samples": 200, "noise": 0.2}}


def source_tree(rev: str, dest: Path) -> Path:
    """The tree at `rev` ('.' = the working tree as it is) under dest."""
    dest.mkdir(parents=True)
    if rev == ".":
        for folder in ("jobs", "workers", "analysis"):
            shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "jobs", "workers", "analysis"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def one_preemption(code: Path, steps: int, health_ms: int | None, work: Path) -> dict:
    health = {} if health_ms is None else {"RAY_health_check_period_ms": str(health_ms // 3),
                                           "RAY_health_check_failure_threshold": "3"}
    with autoscaling_head({**health, "PYTHONPATH": str(code)}, gpus=2, cpus=2, max_workers=3) as cluster:
        suite = work / "preempt.yaml"
        suite.write_text(json.dumps({"name": "preempt", "defaults": {**MOONS, "epochs": steps},
                                     "cases": {"a": {}, "b": {"lr": 2.0000000001}}}))
        run_dir = work / "run"
        env = {**cluster["env"], "PYTHONPATH": str(code)}
        process = subprocess.Popen([sys.executable, "-m", "jobs", "run", str(suite), "--address", cluster["gcs"],
                                    "--out", str(run_dir), "--commit-every", "1", "--max-retries", "2",
                                    "--progress-every", "0", "--no-report"], cwd=code, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                entries = ledger(run_dir)
                if len(entries) == 2 and all(e["state"] == "running" and e["commit_seq"] >= 1 for e in entries.values()):
                    break
                if process.poll() is not None:
                    raise RuntimeError(process.stdout.read()[-3000:])
                time.sleep(0.05)
            node = entries["a"]["info"]["node_id"]
            on_node = [name for name, e in entries.items() if e["info"]["node_id"] == node]
            killed_at = time.monotonic()
            kill_fake_node(node)
            back = {}
            while len(back) < len(on_node) and time.monotonic() < deadline and process.poll() is None:
                for name, e in ledger(run_dir).items():
                    if name in on_node and name not in back and e["state"] in ("running", "done") \
                            and e["info"].get("node_id") not in (None, node):
                        back[name] = time.monotonic() - killed_at
                time.sleep(0.05)
            output, _ = process.communicate(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        final = ledger(run_dir)
        return {"exit": process.returncode, "cases": {
            name: {"seconds_lost": back.get(name), "attempts": final[name]["attempts"], "state": final[name]["state"],
                   "reason_class": final[name]["reason_class"]} for name in on_node}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main")
    parser.add_argument("--after", default=".")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60_000, help="moons steps per case")
    parser.add_argument("--health-check-ms", type=int, default=None,
                        help="the GCS declares a silent node dead after about this long (default: Ray's, ~15 s)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
        trees = {name: source_tree(rev, Path(tmp) / name) for name, rev in (("before", args.before), ("after", args.after))}
        for round_ in range(args.rounds):
            for name in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                work = Path(tmp) / f"{name}-{round_}"
                work.mkdir()
                result = one_preemption(trees[name], args.steps, args.health_check_ms, work)
                print(f"round {round_} {name}: {json.dumps(result)}", flush=True)
                results[name].append(result)
    mean = {}
    for name, runs in results.items():
        lost = [c["seconds_lost"] for r in runs for c in r["cases"].values() if c["seconds_lost"] is not None]
        mean[name] = sum(lost) / len(lost) if lost else float("nan")
        attempts = [c["attempts"] for r in runs for c in r["cases"].values()]
        print(f"{name}: mean seconds lost per case {mean[name]:.1f} (n={len(lost)}), attempts {attempts}, "
              f"exit codes {[r['exit'] for r in runs]}, load {os.getloadavg()[0]:.1f}")
    print(f"after/before seconds lost: {mean['after'] / mean['before']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
