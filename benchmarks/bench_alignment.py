"""Cost of measuring alignment (alignment_every = 1, 10, 100) as a ratio to the same training
with it off, measured in one run.

    python benchmarks/bench_alignment.py [--models allconv9 moons] [--rounds N] [--every 1 10 100]
                                         [--allconv9-steps N] [--moons-steps N] [--json PATH]

Each variant is `workers.trainer.train` in-process, exactly as a worker runs a case (chunks,
rows, reports), on one shared StepCache: the traced steps (with and without the measurement)
are built in a warm-up run and reused, so the times are training, not tracing. Variants run
interleaved (off, 1, 10, 100, order reversed every other round) so that load on a shared
machine hits them alike; a ratio is the median over rounds of variant time / off time of the
same round, from wall-clock and from process CPU seconds.

Models:
  allconv9  width 1.0 at CIFAR-10 shape (32x32x3, 10 classes, random data), batch 10 as in the
            unfair study, Adam, schedule standard (the cheapest step, so the largest ratio)
  moons     the moons suite's MLP (hidden 50, tanh, full batch of 200 points, SGD)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, cpu_pressure, load1, uptime  # noqa: E402

EVERY = (0, 1, 10, 100)


def case(model: str, steps: int, every: int):
    from workers import settings as settings_module

    if model == "allconv9":
        values = {"model": "allconv9", "width": 1.0, "optimizer": "adam", "lr": 1e-4, "batch_size": 10,
                  "data": {"name": "cifar10"}}
    else:
        values = {"model": "mlp", "hidden": [50], "activation": "tanh", "optimizer": "sgd", "lr": 2.0,
                  "batch_size": 0, "data": {"name": "moons", "samples": 200, "noise": 0.2}}
    # one epoch of `steps` steps (moons: full batch, so `steps` epochs of one step)
    if model == "allconv9":
        values.update(epochs=1, steps_per_epoch=steps)
    else:
        values.update(epochs=steps, eval_every=10 ** 6)
    return settings_module.from_dict({**values, "alignment_every": every, "seed": 5})


def data_for(model: str):
    from workers.data import Dataset, load_dataset

    if model == "moons":
        return load_dataset(case("moons", 1, 0).data)
    rng = np.random.default_rng(0)
    return Dataset(name="cifar10-shaped", x_train=rng.normal(size=(2000, 32, 32, 3)).astype(np.float32),
                   y_train=rng.integers(0, 10, 2000), x_test=rng.normal(size=(10, 32, 32, 3)).astype(np.float32),
                   y_test=rng.integers(0, 10, 10), num_classes=10, fingerprint="random", source="random")


def timed(settings, data, cache) -> tuple[float, float, int]:
    from workers.trainer import train

    rows = []
    wall, cpu = time.perf_counter(), time.process_time()
    train(settings, data, lambda report: rows.extend(report.alignment), cache=cache, commit_every=1e9,
          report_every_seconds=1e9)
    return time.perf_counter() - wall, time.process_time() - cpu, len({row["step"] for row in rows})


def measure(model: str, steps: int, rounds: int, variants=EVERY) -> dict:
    from workers.steps import StepCache

    variants = (0, *[v for v in variants if v])
    data, cache = data_for(model), StepCache()
    for every in variants:  # warm-up: trace the steps with and without the measurement
        timed(case(model, 2 if model == "allconv9" else 20, every), data, cache)
    times = {every: [] for every in variants}
    for round_index in range(rounds):
        order = variants if round_index % 2 == 0 else tuple(reversed(variants))
        for every in order:
            wall, cpu, measured = timed(case(model, steps, every), data, cache)
            times[every].append({"wall": wall, "cpu": cpu, "measured_steps": measured, "load1": load1()})
            print(f"  {model} round {round_index + 1} alignment_every={every:<3} {wall:8.2f} s wall {cpu:8.2f} s cpu "
                  f"{measured:4d} measured steps  load1 {load1():.2f}", flush=True)
    out = {"steps": steps, "rounds": rounds, "times": {str(k): v for k, v in times.items()}, "ratios": {}}
    for every in variants[1:]:
        out["ratios"][str(every)] = {
            clock: statistics.median(v[clock] / o[clock] for v, o in zip(times[every], times[0]))
            for clock in ("wall", "cpu")}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["allconv9", "moons"], choices=["allconv9", "moons"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, nargs="+", default=list(EVERY[1:]), help="the alignment_every values")
    parser.add_argument("--allconv9-steps", type=int, default=100)
    parser.add_argument("--moons-steps", type=int, default=3000)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    threads = max(1, os.cpu_count() or 1)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))  # as workers.actor does

    started = time.time()
    record = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
              "python": platform.python_version(), "tensorflow": tf.__version__, "uptime_start": uptime(),
              "cpu_pressure_start": cpu_pressure(), "models": {}}
    for model in args.models:
        steps = args.allconv9_steps if model == "allconv9" else args.moons_steps
        record["models"][model] = measure(model, steps, args.rounds, args.every)
    record["uptime_end"], record["seconds"] = uptime(), round(time.time() - started, 1)
    print(f"\n{'model':<9} {'every':>5} {'wall ratio':>10} {'cpu ratio':>10} {'overhead (cpu)':>14}")
    for model, result in record["models"].items():
        for every, ratio in result["ratios"].items():
            print(f"{model:<9} {every:>5} {ratio['wall']:>9.3f}x {ratio['cpu']:>9.3f}x {100 * (ratio['cpu'] - 1):>13.1f} %")
    print(f"\n{record['uptime_start']} -> {record['uptime_end']}; {record['seconds']} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
