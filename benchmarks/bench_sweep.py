"""Sweeps of many small cases: bplab (jobs.study.run_study) against Ray Tune on the same trainer.

    python benchmarks/bench_sweep.py [--suite benchmarks/suites/sweep-40.yaml] [--slots 2]
                                     [--skip tune|bplab|moons-quick|quick ...] [--main TREE] [--json PATH]

Parts, each one run, in this order, in one invocation:

1. sweep  bplab: `run_study(SUITE, out=tmp, progress_every=0, report=False)` on a private
          local Ray (every core: --slots), 1 CPU per case. Wall time around the call (Ray's start and
          stop included). Training seconds: the sum over every train row of examples /
          examples_per_sec (the time of the trainer's own calls). Overhead = wall -
          training / slots, and per case per slot = overhead / (cases / slots).
2. tune   Ray Tune on the same cases: a function trainable that runs workers.trainer.train
          (the data passed once with tune.with_parameters, 1 CPU per trial, reporting once per
          epoch from the epoch's test row, no checkpoints, Tune's defaults otherwise), on a
          private local Ray of --slots CPUs. Wall time around ray.init ... tuner.fit() ...
          ray.shutdown, the same definition as bplab's.
3. moons-quick  `run_study("moons-quick")`: wall time against its training seconds.
4. quick  `python -m jobs run quick` (the CLI, as a user runs it) with this tree, and with the
          tree at --main (before) when given: wall time of each.

Training seconds are the trainer's; the same trainer runs under both runners, so the ratio
compares the runners. The machine is shared: its load is recorded with every result.
"""

from __future__ import annotations

import argparse
import datetime
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
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def say(text: str) -> None:
    print(text, flush=True)


def training_seconds(run_dir: str) -> float:
    import pandas as pd

    metrics = pd.read_parquet(Path(run_dir) / "metrics")
    train = metrics[metrics.split == "train"]
    return float((train["examples"] / train["examples_per_sec"]).sum())


def files_per_case(run_dir: str) -> float:
    folders = [f for f in (Path(run_dir) / "metrics").iterdir() if f.is_dir()]
    return sum(len(list(f.glob("*.parquet"))) for f in folders) / max(1, len(folders))


class Parts:
    """Times the parts of one run_study in the driver process, by wrapping the functions that do
    them (nothing in jobs/ or workers/ changes): seconds from the call, start and end of each."""

    WRAPPED = [("jobs.plan", None, "load_data", "load data"), ("jobs.study", None, "connect", "ray.init"),
               ("jobs.driver", None, "start_workers", "start workers (request)"),
               ("analysis.rundir", "RunDir", "create", "run dir"), ("jobs.study", "Study", "execute", "execute"),
               ("ray", None, "put", "ray.put"), ("ray", None, "shutdown", "ray.shutdown")]

    def __init__(self):
        self.t0 = self.wall0 = None
        self.spans: dict = {}
        self.first_start = None
        self.saved = []

    def __enter__(self):
        import importlib

        for module_name, class_name, name, label in self.WRAPPED:
            owner = importlib.import_module(module_name)
            if class_name:
                owner = getattr(owner, class_name)
            if owner is None or not hasattr(owner, name):
                continue  # not in this tree
            raw = owner.__dict__[name] if class_name else getattr(owner, name)
            self.saved.append((owner, name, raw))
            if isinstance(raw, classmethod):
                setattr(owner, name, classmethod(self._wrap(raw.__func__, label)))
            else:
                setattr(owner, name, self._wrap(raw, label))
        from jobs.driver import Driver

        handle = Driver._handle
        self.saved.append((Driver, "_handle", handle))
        parts = self

        def timed_handle(driver, state, ref, kind):
            out = handle(driver, state, ref, kind)
            if kind == "start" and parts.first_start is None:
                parts.first_start = time.perf_counter() - parts.t0
            return out
        Driver._handle = timed_handle
        self.t0, self.wall0 = time.perf_counter(), time.time()
        return self

    def _wrap(self, function, label):
        parts = self

        def timed(*args, **kwargs):
            begin = time.perf_counter() - parts.t0
            try:
                return function(*args, **kwargs)
            finally:
                spans = parts.spans.setdefault(label, [])
                spans.append((begin, time.perf_counter() - parts.t0))
        return timed

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)

    def summary(self, run_dir: str, total: float) -> dict:
        """The parts, and the workers' own start (from the ledger: when each worker process began
        and how long its TensorFlow import and set-up took)."""
        ledger = [json.loads(p.read_text()) for p in (Path(run_dir) / "ledger").glob("*.json")]
        workers = {}
        for entry in ledger:
            info = entry.get("info", {})
            if "worker_started_at" in info:
                workers[info["pid"]] = (info["worker_started_at"] - self.wall0, info.get("tensorflow_seconds"))
        out = {label: [(round(a, 3), round(b, 3)) for a, b in spans] for label, spans in self.spans.items()}
        out["first start() returned"] = round(self.first_start or 0.0, 3)
        out["workers (process began, TF import + set-up s)"] = sorted((round(a, 3), b) for a, b in workers.values())
        shutdown = self.spans.get("ray.shutdown", [(total, total)])[-1]
        execute = self.spans.get("execute", [(0.0, 0.0)])[-1]
        out["cases (first start() returned -> execute end)"] = round(execute[1] - (self.first_start or execute[0]), 3)
        out["total"] = round(total, 3)
        out["after execute (report off; ray.shutdown)"] = round(total - execute[1], 3)
        out["ray.shutdown s"] = round(shutdown[1] - shutdown[0], 3)
        return out


def import_seconds() -> float:
    """A fresh interpreter importing what `bplab run` imports before it works (no TensorFlow)."""
    code = ("import time; t = time.perf_counter(); import jobs.cli, jobs.study, jobs.driver, analysis.rundir, jobs.plan, "
            "pandas, pyarrow, ray; print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(done.stdout.split()[-1])


def bench_bplab(suite: str, slots: int, label: str, **kwargs) -> dict:
    """One run_study on a private local Ray (every core of the machine: `slots`), timed part by part."""
    from jobs.study import run_study

    with tempfile.TemporaryDirectory(prefix="bplab-sweep-") as tmp:
        out = str(Path(tmp) / "run")
        started = time.perf_counter()
        with Parts() as parts:
            result = run_study(suite, out, progress_every=0, report=False, stream=open(os.devnull, "w"), **kwargs)
        wall = time.perf_counter() - started
        timeline = parts.summary(out, wall)
        cases = len(result.states)
        train = training_seconds(out)
        overhead = wall - train / slots
        numbers = {"what": label, "suite": suite, "cases": cases, "slots": slots, "wall_s": wall,
                   "training_s": train, "wall_over_training_per_slot": wall / (train / slots),
                   "overhead_s": overhead, "overhead_per_case_per_slot_s": overhead / (cases / slots),
                   "metrics_files_per_case": files_per_case(out), "states": dict(result.counts),
                   "parts": timeline, "import_s": import_seconds(), **kwargs}
    say(f"{label}: {cases} cases on {slots} slots in {wall:.1f} s; training {train:.2f} s "
        f"({train / slots:.2f} s per slot); overhead {overhead:.1f} s = {numbers['overhead_per_case_per_slot_s']:.2f} s "
        f"per case per slot; {numbers['metrics_files_per_case']:.1f} metrics files per case; {dict(result.counts)}")
    say(f"  imports in a fresh interpreter {numbers['import_s']:.2f} s (before the timeline); timeline, s from run_study's call:")
    for name, value in timeline.items():
        say(f"    {name}: {value}")
    return numbers


def tune_trainable(config, data=None):
    """Ray Tune function trainable: the bplab trainer, one tune.report per epoch."""
    from ray import tune

    from workers import settings as settings_module
    from workers.trainer import train

    settings = settings_module.from_json(config["settings"])
    seconds = [0.0]

    def report(r):
        for row in r.rows:
            if row["split"] == "train":
                seconds[0] += row["examples"] / row["examples_per_sec"]
            else:
                tune.report({"epoch": row["epoch"], "test_accuracy": row["accuracy"], "test_cost": row["cost"],
                             "train_seconds": seconds[0]})

    train(settings, data, report)


def bench_tune(suite: str, slots: int) -> dict:
    import ray
    from ray import tune

    from jobs import plan as plan_module, suites

    study = suites.load_suite(suite)
    datasets = plan_module.load_data(study.cases)
    (spec, data), = datasets.items()
    settings = [json.loads(json.dumps(c.settings.to_dict(), default=list)) for c in study.cases]
    with tempfile.TemporaryDirectory(prefix="tune-sweep-") as tmp:
        started = time.perf_counter()
        ray.init(address="local", num_cpus=slots, include_dashboard=False, logging_level="ERROR")
        try:
            trainable = tune.with_resources(tune.with_parameters(tune_trainable, data=data), {"cpu": 1})
            tuner = tune.Tuner(trainable, param_space={"settings": tune.grid_search(settings)},
                               run_config=tune.RunConfig(storage_path=tmp, name="sweep", verbose=0))
            results = tuner.fit()
        finally:
            ray.shutdown()
        wall = time.perf_counter() - started
    train = sum(r.metrics.get("train_seconds", 0.0) for r in results)
    errors = sum(1 for r in results if r.error)
    overhead = wall - train / slots
    numbers = {"what": "tune", "suite": suite, "cases": len(settings), "slots": slots, "wall_s": wall,
               "training_s": train, "overhead_s": overhead, "overhead_per_case_per_slot_s": overhead / (len(settings) / slots),
               "errors": errors}
    say(f"tune: {len(settings)} trials on {slots} slots in {wall:.1f} s; training {train:.2f} s; overhead "
        f"{numbers['overhead_per_case_per_slot_s']:.2f} s per case per slot; {errors} errors")
    return numbers


def bench_cli(tree: str, label: str, suite: str = "quick") -> dict:
    """`python -m jobs run SUITE` with the code of `tree`, timed from outside."""
    with tempfile.TemporaryDirectory(prefix="bplab-cli-") as tmp:
        env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "2"}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jobs", "run", suite, "--out", str(Path(tmp) / "run"),
                               "--progress-every", "0", "--no-report"], cwd=tree, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        train = training_seconds(str(Path(tmp) / "run")) if done.returncode == 0 else None
        files = files_per_case(str(Path(tmp) / "run")) if done.returncode == 0 else None
    say(f"{label}: `bplab run {suite}` {wall:.1f} s (exit {done.returncode}); training {train if train is None else round(train, 2)} s; "
        f"{files} metrics files per case")
    return {"what": label, "suite": suite, "tree": tree, "wall_s": wall, "training_s": train, "exit": done.returncode,
            "metrics_files_per_case": files}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=str(ROOT / "benchmarks" / "suites" / "sweep-40.yaml"))
    parser.add_argument("--slots", type=int, default=os.cpu_count(),
                        help="Tune's CPUs; bplab's local Ray takes every core, so keep the default for a fair ratio")
    parser.add_argument("--skip", nargs="*", default=[], choices=["bplab", "tune", "moons-quick", "quick"])
    parser.add_argument("--main", default=None, help="a checkout of the code before, for quick's before/after")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu_model(),
               "cores": os.cpu_count(), "load_before": uptime(), "cpu_pressure_before": cpu_pressure(), "parts": []}
    say(f"{results['date']} on {results['cpu']} ({results['cores']} cores); {results['load_before']}")
    bplab = tune = None

    def save():  # after every part: a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if "bplab" not in args.skip:
        bplab = bench_bplab(args.suite, args.slots, "bplab")
        results["parts"].append(bplab)
        save()
    if "tune" not in args.skip:
        tune = bench_tune(args.suite, args.slots)
        results["parts"].append(tune)
        save()
    if bplab and tune:
        results["tune_over_bplab"] = tune["wall_s"] / bplab["wall_s"]
        say(f"Ray Tune / bplab wall time: {results['tune_over_bplab']:.2f}x")
    if "moons-quick" not in args.skip:
        results["parts"].append(bench_bplab("moons-quick", args.slots, "moons-quick"))
        save()
    if "quick" not in args.skip:
        results["parts"].append(bench_cli(str(ROOT), "quick after"))
        if args.main:
            results["parts"].append(bench_cli(args.main, "quick before"))
    results["load_after"], results["cpu_pressure_after"] = uptime(), cpu_pressure()
    say(f"load after: {results['load_after']}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
