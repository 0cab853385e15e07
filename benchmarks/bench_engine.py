"""Engine benchmark: hand-written back propagation vs tf.GradientTape, and the cost of the
unfair schedules, on allconv9 (width 1.0) at CIFAR-10 shape with random data.

    python benchmarks/bench_engine.py [--batches 32 128] [--steps N] [--unfair-steps N]
                                      [--warmup N] [--rounds N] [--variants ...] [--json PATH]

Every variant is a tf.function built exactly like workers.trainer.train's train_step (a
Stepper over a Net and a hand-written Adam, traced once, op determinism on, threads as
workers.actor sets them). Variants are measured interleaved so that load changes on a
shared machine hit all of them alike: in each round manual and tape take --steps steps
alternately, step by step, then each unfair variant takes --unfair-steps steps (order
reversed every other round). Reported, from wall and from process CPU seconds:
manual/tape = median over back-to-back (manual, tape) pairs of tape time / manual time;
unfair ratio = median over rounds of unfair time / manual time of the same round.

Variants:
  manual        schedule standard, engine manual (hand-written backward)
  tape          engine autodiff (workers.schedules.autodiff_standard, tf.GradientTape)
  unfair-back   schedule unfair-back (manual)
  unfair-front  schedule unfair-front (manual)

The FLOP floors printed next to the unfair ratios are computed from allconv9's conv
shapes (see flop_floors and benchmarks/README.md); the column "estimate" holds the earlier
estimates of those costs that the floors check.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, cpu_pressure, load1, uptime  # noqa: E402

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
VARIANTS = ("manual", "tape", "unfair-back", "unfair-front")
ESTIMATES = {"unfair-back": "~2.9x", "unfair-front": "~6-7x"}  # the cost estimates this benchmark checks (README)


# ---------------------------------------------------------------------- machine










# ---------------------------------------------------------------------- FLOP floors


def conv_flops(model) -> list[dict]:
    """Forward multiply-add FLOPs per example of each unit's conv: 2*H*W*k*k*c_in*c_out
    (H, W: output size; SAME, stride 1 here)."""
    from workers import layers as L

    shape, rows = tuple(model.input_shape), []
    for unit in model.units:
        flops = 0
        for op in unit.ops:
            out = op.output_shape(shape)
            if isinstance(op, L.Conv2D):
                flops += 2 * out[0] * out[1] * op.kernel * op.kernel * op.c_in * op.c_out
            elif isinstance(op, L.Dense):
                flops += 2 * op.d_in * op.d_out
            shape = out
        rows.append({"unit": unit.name, "forward_flops": flops})
    return rows


def flop_floors(per_unit: list[float]) -> dict:
    """Conv FLOPs of one step of each schedule, per example, and ratios to standard.

    forward of unit i = F_i; backward of unit i = d_x (F_i, skipped where nobody needs
    it: unit 0, and the lowest unit of an unfair-back stage) + d_w (F_i, only for units
    that are updated). Element-wise ops (ELU, pools, loss, Adam) are not counted.
    """
    F = list(per_unit)
    n, total = len(F), sum(F)
    standard = total + sum(F[1:]) + total  # forward + d_x (not unit 0) + d_w

    # unfair-back: 1 full forward; stage k backprops the top k units (d_w for all k,
    # d_x for all but the lowest) and re-forwards those k units.
    back_bwd = back_refwd = 0.0
    for k in range(1, n + 1):
        low = n - k
        back_bwd += sum(F[low:]) + sum(F[low + 1:])
        back_refwd += sum(F[low:])
    back = total + back_bwd + back_refwd
    back_last_refwd = total  # stage n re-forwards from unit 0; its result is never used

    # unfair-front: 1 full forward; stage k: full backward with d_x for units 1..n-1,
    # d_w for units 0..k-1 (the k updated ones), then a full re-forward.
    front_bwd = 0.0
    for k in range(1, n + 1):
        front_bwd += sum(F[1:]) + sum(F[:k])
    front = total + front_bwd + n * total
    front_last_refwd = total

    naive = n * standard  # a full forward + backward per stage
    # Without skipping d_x at the lowest unit of each unfair-back stage:
    back_no_skip = back + sum(F[n - k] for k in range(1, n + 1) if n - k > 0)
    # Both schedules end with a re-forward whose result no op uses; tf.function prunes it
    # (a profile shows 45 = 9 + 36 forward convs per unfair-back step, 81 = 9 + 72 per
    # unfair-front step), so the floor of what actually runs leaves it out.
    return {
        "standard_flops": standard,
        "unfair-back": {"flops": back - back_last_refwd, "ratio": (back - back_last_refwd) / standard,
                        "ratio_with_last_reforward": back / standard,
                        "ratio_with_d_x_at_lowest": (back_no_skip - back_last_refwd) / standard,
                        "ratio_with_d_x_at_lowest_and_last_reforward": back_no_skip / standard},
        "unfair-front": {"flops": front - front_last_refwd, "ratio": (front - front_last_refwd) / standard,
                         "ratio_with_last_reforward": front / standard},
        "naive_ratio": naive / standard,
    }


# ---------------------------------------------------------------------- steps


def make_variant(name: str, model, params, tf_dtype):
    """A Net, its Adam and a train_step built like workers.trainer.train's."""
    import tensorflow as tf

    from workers import optimizers, schedules
    from workers.engine import Net
    from workers.layers import Context
    from workers.settings import CaseSettings

    schedule_name = {"manual": "standard", "tape": "standard"}.get(name, name)
    engine = "autodiff" if name == "tape" else "manual"
    settings = CaseSettings(model="allconv9", width=1.0, schedule=schedule_name, engine=engine, optimizer="adam",
                            lr=1e-4, beta1=0.9, beta2=0.9, epsilon=1e-8)
    net = Net(model, params, dtype=tf_dtype)
    optimizer = optimizers.make_optimizer(settings, net)
    schedule = schedules.get_schedule(settings)
    assert (schedule is schedules.autodiff_standard) == (name == "tape")
    traced = {"count": 0}

    @tf.function(reduce_retracing=True, autograph=False)  # as the trainer traces its steps
    def train_step(x, labels, lr, skip_rate, seed):
        traced["count"] += 1  # Python side effect: runs once per trace
        y_onehot = tf.one_hot(labels, NUM_CLASSES, dtype=tf_dtype)
        stepper = schedules.Stepper(net, optimizer, Context(training=True, seed=seed), lr, settings, skip_rate)
        loss, output = schedule(stepper, x, y_onehot)
        traced.update(updates=list(stepper.updates), forward_passes=stepper.forward_passes, stages=stepper.stages)
        cost = model.loss.logged_cost(output, y_onehot)
        return loss, cost, model.loss.correct(output, labels)

    return train_step, traced


def run_steps(step_fn, x, labels, count: int, global_step: list, cpu_times: list | None = None) -> list[float]:
    """Wall seconds of `count` steps, each fed and synchronised as the trainer does; the
    process CPU seconds (all threads) of each step are appended to `cpu_times`."""
    import tensorflow as tf

    times = []
    for _ in range(count):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss, cost, correct = step_fn(tf.constant(x), tf.constant(labels), tf.constant(1e-4, tf.float32),
                                      tf.constant(0.5, tf.float32), tf.constant([678, global_step[0]], tf.int64))
        loss, cost, correct = float(loss), float(cost), float(correct)
        times.append(time.perf_counter() - started)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_started)
        global_step[0] += 1
    return times


def bench_batch(batch: int, variants, model, params, steps: dict, warmup: dict, rounds: int, log) -> dict:
    import tensorflow as tf

    rng = np.random.default_rng([678, batch])
    x = rng.random((batch, *INPUT_SHAPE), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64)

    fns, traced, result = {}, {}, {"batch": batch, "variants": {}}
    counters = {name: [0] for name in variants}
    for name in variants:
        fns[name], traced[name] = make_variant(name, model, params, tf.float32)
        first = run_steps(fns[name], x, labels, 1, counters[name])[0]  # trace + compile + 1 step
        rest = run_steps(fns[name], x, labels, max(0, warmup[name] - 1), counters[name])
        log(f"  batch {batch:4d} {name:13s} first call (trace+run) {first:7.2f} s; warm-up {[round(t, 2) for t in rest]} "
            f"[load {load1():.2f}]")
        result["variants"][name] = {"first_call_s": first, "warmup_s": rest, "rounds": [], "cpu_rounds": [],
                                    "load1": [], "steps_per_round": steps[name]}

    def record(name, times, cpu, load):
        entry = result["variants"][name]
        entry["rounds"][-1].extend(times)
        entry["cpu_rounds"][-1].extend(cpu)
        entry["load1"].append(load)

    paired = [name for name in ("manual", "tape") if name in variants]
    others = [name for name in variants if name not in paired]
    pairs = {"wall": [], "cpu": []}  # tape / manual of back-to-back steps
    for r in range(rounds):
        for name in variants:
            result["variants"][name]["rounds"].append([])
            result["variants"][name]["cpu_rounds"].append([])
        # manual and tape alternate step by step (M T, T M, M T, ...): neighbours in time
        for i in range(steps["manual"]):
            order = paired if (i + r) % 2 == 0 else paired[::-1]
            done = {}
            for name in order:
                load, cpu = load1(), []
                times = run_steps(fns[name], x, labels, 1, counters[name], cpu)
                record(name, times, cpu, load)
                done[name] = (times[0], cpu[0])
            if "tape" in done:
                pairs["wall"].append(done["tape"][0] / done["manual"][0])
                pairs["cpu"].append(done["tape"][1] / done["manual"][1])
        for name in (others if r % 2 == 0 else others[::-1]):
            load, cpu = load1(), []
            times = run_steps(fns[name], x, labels, steps[name], counters[name], cpu)
            record(name, times, cpu, load)
        log(f"  batch {batch:4d} round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {statistics.median(result['variants'][name]['rounds'][-1]):.3f}s" for name in variants)
            + f" [load {load1():.2f}, cpu pressure {cpu_pressure()}]")

    for name in variants:
        entry = result["variants"][name]
        per_round = [statistics.median(t) for t in entry["rounds"]]
        entry["per_round_median_s"] = per_round
        entry["per_round_median_cpu_s"] = [statistics.median(t) for t in entry["cpu_rounds"]]
        entry["median_step_cpu_s"] = statistics.median(entry["per_round_median_cpu_s"])
        entry["median_step_s"] = statistics.median(per_round)
        entry["steps_per_s"] = 1.0 / entry["median_step_s"]
        entry["examples_per_s"] = batch / entry["median_step_s"]
        entry["traces"] = traced[name]["count"]
        entry["tracing_count"] = fns[name].experimental_get_tracing_count()
        entry["updates"] = traced[name].get("updates")
        entry["forward_passes"] = traced[name].get("forward_passes")
        entry["stages"] = traced[name].get("stages")
        if name == "tape":
            # manual/tape speed ratio = tape time / manual time, median over back-to-back pairs
            entry["ratio_per_pair"], entry["ratio_per_pair_cpu"] = pairs["wall"], pairs["cpu"]
            entry["ratio_median"], entry["ratio_median_cpu"] = statistics.median(pairs["wall"]), statistics.median(pairs["cpu"])
        elif name != "manual":
            # unfair step time / manual standard step time of the same round, median over rounds
            for key, suffix in (("per_round_median_s", ""), ("per_round_median_cpu_s", "_cpu")):
                ratios = [v / m for m, v in zip(result["variants"]["manual"][key], entry[key])]
                entry["ratio_per_round" + suffix] = ratios
                entry["ratio_median" + suffix] = statistics.median(ratios)
    return result


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=2,
                        help="timed steps per round for manual and tape (run alternately, step by step)")
    parser.add_argument("--unfair-steps", type=int, default=1, help="timed steps per round for unfair-back/front")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per variant before the rounds (the first one traces); unfair: at most 1")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the CPUs this process may use)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if "manual" not in args.variants:
        parser.error("the manual variant is the reference of every ratio")

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cpus
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))  # as workers.actor does
    tf.config.experimental.enable_op_determinism()  # as workers.trainer.train does
    # Every variant's train_step comes from the same Python code, so TF's frequent-retracing
    # detector counts the first traces of all of them together and warns; the "traces"
    # column shows the real count per variant (1: traced once).
    tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())

    from workers import models
    from workers.settings import CaseSettings

    model = models.build_model(CaseSettings(model="allconv9"), INPUT_SHAPE, NUM_CLASSES)
    params = model.init_params(678, dtype=np.float32)

    def log(message):
        print(message, flush=True)

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "cpu_model": cpu_model(), "cpus": cpus, "intra_op_threads": threads, "inter_op_threads": min(2, threads),
        "tensorflow": tf.__version__, "python": platform.python_version(), "uptime_start": uptime(),
        "cpu_pressure_start": cpu_pressure(),
        "op_determinism": True, "model": "allconv9", "width": 1.0, "input_shape": INPUT_SHAPE,
        "dtype": "float32", "optimizer": "adam", "rounds": args.rounds,
    }
    log(f"{meta['date']}  TF {meta['tensorflow']}  CPU {meta['cpu_model']} x{cpus}  threads {threads}")
    log(f"uptime at start: {meta['uptime_start']}; cpu pressure (some avg10) {meta['cpu_pressure_start']}")

    flops = conv_flops(model)
    floors = flop_floors([row["forward_flops"] for row in flops])
    log("allconv9 conv forward FLOPs per example: " + ", ".join(f"{r['unit']} {r['forward_flops'] / 1e6:.1f}M" for r in flops)
        + f"; total {sum(r['forward_flops'] for r in flops) / 1e6:.0f}M")

    steps = {name: (args.unfair_steps if name.startswith("unfair") else args.steps) for name in args.variants}
    warmup = {name: (min(1, args.warmup) if name.startswith("unfair") else args.warmup) for name in args.variants}
    results = []
    started = time.perf_counter()
    for batch in args.batches:
        results.append(bench_batch(batch, args.variants, model, params, steps, warmup, args.rounds, log))
        results[-1]["uptime_after"], results[-1]["cpu_pressure_after"] = uptime(), cpu_pressure()
    meta["uptime_end"], meta["cpu_pressure_end"] = uptime(), cpu_pressure()
    meta["total_seconds"] = time.perf_counter() - started

    # ------------------------------------------------------------------ table
    log("")
    log(f"allconv9 w1.0, 32x32x3, float32, Adam; median over {args.rounds} interleaved rounds "
        f"({args.steps} timed steps/round, unfair {args.unfair_steps}); {threads} threads")
    header = (f"{'batch':>5}  {'variant':12s} {'s/step':>7} {'steps/s':>7} {'ex/s':>6} {'cpu-s':>6}  "
              f"{'ratio wall':>10} {'ratio cpu':>9}  {'floor ours':>10} {'estimate':>8}  {'load1':>11} {'traces':>6}")
    log(header)
    log("-" * len(header))
    for result in results:
        for name in args.variants:
            entry = result["variants"][name]
            wall = cpu = floor = estimate = ""
            if name != "manual":
                wall, cpu = f"{entry['ratio_median']:.3f}x", f"{entry['ratio_median_cpu']:.3f}x"
            if name.startswith("unfair"):
                floor, estimate = f"{floors[name]['ratio']:.2f}x", ESTIMATES[name]
            loads = entry["load1"]
            log(f"{result['batch']:>5}  {name:12s} {entry['median_step_s']:7.3f} {entry['steps_per_s']:7.3f} "
                f"{entry['examples_per_s']:6.1f} {entry['median_step_cpu_s']:6.2f}  {wall:>10} {cpu:>9}  {floor:>10} {estimate:>8}  "
                f"{min(loads):5.2f}-{max(loads):5.2f} {entry['traces']:>6}")
    log("")
    log("ratio (tape row): manual/tape speed = tape s/step / manual s/step (>= 1.0: manual at least as fast),")
    log("  median over back-to-back (manual, tape) step pairs.")
    log("ratio (unfair rows): s/step / manual standard s/step of the same round, median over rounds.")
    log("'cpu': the same with process CPU seconds per step (less sensitive to other processes on the machine,")
    log("  but includes thread-pool spinning). s/step, steps/s, ex/s: median over rounds of per-round medians.")
    fb, ff = floors["unfair-back"], floors["unfair-front"]
    log("floor ours: conv FLOPs of one step / standard step (allconv9 at 32x32; counting in README), without the")
    log("  final re-forward, whose result no op uses and which tf.function prunes. Counting it: back "
        f"{fb['ratio_with_last_reforward']:.2f}x, front {ff['ratio_with_last_reforward']:.2f}x.")
    log(f"  Back without skipping d_x at each stage's lowest unit: {fb['ratio_with_d_x_at_lowest']:.2f}x "
        f"({fb['ratio_with_d_x_at_lowest_and_last_reforward']:.2f}x with the re-forward).")
    log(f"  Naive (a full forward + backward per stage): {floors['naive_ratio']:.1f}x.")
    log(f"uptime at end: {meta['uptime_end']}; cpu pressure {meta['cpu_pressure_end']}  (total {meta['total_seconds']:.0f} s)")

    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "conv_flops": flops, "floors": floors, "results": results}, handle, indent=1, default=list)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
