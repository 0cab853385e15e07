"""Compiled chunks: bplab's step against a minimal loop of the same network, and XLA's compile cost.

    python benchmarks/bench_compile.py [--parts step first conv grappler] [--steps 20000] [--rounds 3]
                                       [--conv-steps 3] [--json PATH]

Parts, in one process (TensorFlow set up as a worker sets it up: 1 intra-op and 1 inter-op
thread, op determinism on):

1. step   The moons MLP (make-moons 200 points, 160 for training, hidden 8 tanh, softmax, full
          batch, sgd lr 2.0, weight decay 5e-5), --steps steps:
          - minimal graph / minimal XLA: one tf.function holding a tf.while_loop of K = 2,000
            steps of the same forward, backward (tf.GradientTape) and update, on variables,
            without and with jit_compile (what a hand-written loop costs);
          - bplab graph / bplab XLA: workers.trainer.train on the same case (compile: graph /
            xla, the test set evaluated every 1,000 steps, as the minimal loop does not
            evaluate), its StepCache kept, so the first call's trace and compile are left out.
            Per step: the chunk's own time (examples / examples_per_sec of the rows, what the
            trainer's calls take) and train()'s wall time / steps (everything: the data order,
            the batches, the rows);
          - bplab XLA as the moons suite runs it (the test set evaluated after every step).
          The variants are interleaved round by round; medians over the rounds. The ratio
          asked for: bplab XLA (chunk) / minimal XLA.
2. first  First-step latency of a structure new to the worker: the first call of train()
          (examples / examples_per_sec of the first row: the first call runs one step, after
          its trace and, with XLA, its compile), graph and XLA, for moons h8, the deep moons MLP
          and dni_rnn on digits, and the whole 30-step case; then the same case again, its
          trace or executable kept (StepCache): the whole case's wall time.
3. conv   allconv9 (width 1.0) at CIFAR-10 shape (32x32x3, 10 classes, batch 32, adam), random
          data: seconds per step on the graph and with XLA (chunks of one step, the first call
          left out), and XLA's first call (its compile).
4. grappler  The traced graph with TensorFlow's graph optimiser (Grappler) on and off (what
          `graph_optimizer` chooses; TensorFlow reads the option at each call, so one process
          alternates): allconv9 (width 1.0, SGD) at CIFAR-10 shape, and at a quarter width
          on 8x8x1 inputs (batch 16, the quick suite's shape), standard and unfair-front: each
          variant's first call (its trace and, on, Grappler's rewrite; a structure of its own)
          and seconds per step, calls interleaved, --conv-steps rounds (the quarter width 10x
          as many); and how far apart one step from the same weights and batch leaves the
          weights, relative to the step's largest update.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, cpu_pressure, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MOONS = {"model": "mlp", "hidden": [8], "activation": "tanh", "optimizer": "sgd", "lr": 2.0, "weight_decay": 5e-5,
         "batch_size": 0, "data": {"name": "moons", "samples": 200, "noise": 0.2}, "seed": 0}


def say(text: str) -> None:
    print(text, flush=True)


def set_up():
    from workers.actor import import_tensorflow

    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    return tf


def minimal_loop(tf, x, y, jit: bool, k: int = 2000):
    """A tf.function running k full-batch steps of the moons MLP: forward, tape backward, sgd."""
    import numpy as np

    rng = np.random.default_rng(0)
    w1 = tf.Variable(rng.normal(0, 0.5, (2, 8)).astype("float32"))
    b1 = tf.Variable(np.zeros(8, "float32"))
    w2 = tf.Variable(rng.normal(0, 0.5, (8, 2)).astype("float32"))
    b2 = tf.Variable(np.zeros(2, "float32"))
    variables = [w1, b1, w2, b2]
    x, y = tf.constant(x), tf.one_hot(tf.constant(y), 2)

    @tf.function(autograph=False, jit_compile=jit)
    def steps(count):
        def body(i, loss):
            with tf.GradientTape() as tape:
                h = tf.tanh(x @ w1 + b1)
                logits = h @ w2 + b2
                loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(y, logits))
                loss += 2.5e-5 * (tf.reduce_sum(w1 * w1) + tf.reduce_sum(w2 * w2))
            grads = tape.gradient(loss, variables)
            with tf.control_dependencies([v.assign_sub(2.0 * g) for v, g in zip(variables, grads)]):
                return i + 1, tf.identity(loss)
        return tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), tf.constant(0.0)),
                             parallel_iterations=1)[1]

    steps(tf.constant(k))  # trace (and compile)

    def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n // k):
            float(steps(tf.constant(k)))
        return (time.perf_counter() - started) / (n // k * k)
    return run


def bplab_runner(compile: str, steps: int, eval_every: int):
    from workers import settings as settings_module
    from workers.data import load_dataset
    from workers.steps import StepCache
    from workers.trainer import train

    case = settings_module.from_dict({**MOONS, "epochs": steps, "eval_every": eval_every, "compile": compile,
                                      "layer_stats_every": 0})
    data = load_dataset(case.data)
    cache = StepCache()
    train(settings_module.from_dict({**case.to_dict(), "epochs": 20}), data, lambda r: None, cache=cache)  # trace

    def run() -> tuple[float, float]:
        rows = []
        started = time.perf_counter()
        train(case, data, lambda r: rows.extend(r.rows), cache=cache)
        wall = (time.perf_counter() - started) / steps
        chunk = [row["examples"] / row["examples_per_sec"] for row in rows if row["split"] == "train"]
        return sum(chunk) / len(chunk), wall
    return run


def part_step(tf, args) -> dict:
    from workers.data import load_dataset
    from workers import settings as settings_module

    data = load_dataset(settings_module.from_dict(MOONS).data)
    x, y = data.x_train.astype("float32"), data.y_train
    variants = {"minimal graph": minimal_loop(tf, x, y, False), "minimal XLA": minimal_loop(tf, x, y, True)}
    runners = {"bplab graph": bplab_runner("graph", args.steps, 1000), "bplab XLA": bplab_runner("xla", args.steps, 1000),
               "bplab XLA, test set every step": bplab_runner("xla", args.steps, 1)}
    times: dict = {name: [] for name in [*variants, *runners]}
    walls: dict = {name: [] for name in runners}
    for round_ in range(args.rounds):
        order = list(variants) + list(runners)
        if round_ % 2:
            order.reverse()
        for name in order:
            if name in variants:
                times[name].append(variants[name](args.steps))
            else:
                chunk, wall = runners[name]()
                times[name].append(chunk)
                walls[name].append(wall)
        say(f"  round {round_ + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e6:.1f} us" for n in order) + f"; {uptime()}")
    out = {name: {"chunk_us": statistics.median(v) * 1e6} for name, v in times.items()}
    for name, v in walls.items():
        out[name]["train_wall_us"] = statistics.median(v) * 1e6
    reference = out["minimal XLA"]["chunk_us"]
    say(f"{'variant':34} {'us/step (call)':>15} {'us/step (train())':>18} {'/ minimal XLA':>14}")
    for name, numbers in out.items():
        numbers["over_minimal_xla"] = numbers["chunk_us"] / reference
        wall = numbers.get("train_wall_us")
        say(f"{name:34} {numbers['chunk_us']:15.1f} {'' if wall is None else f'{wall:.1f}':>18} "
            f"{numbers['over_minimal_xla']:13.2f}x")
    return out


def part_first(tf, args) -> dict:
    from workers import settings as settings_module
    from workers.data import load_dataset
    from workers.steps import StepCache
    from workers.trainer import train

    structures = {
        "moons h8": {**MOONS, "epochs": 30},
        "moons deep (8,8,8,8)": {**MOONS, "hidden": [8, 8, 8, 8], "epochs": 30},
        "dni_rnn on digits (synthetic)": {"model": "dni_rnn", "hidden": [16], "schedule": "synthetic", "batch_size": 10,
                                          "epochs": 1, "steps_per_epoch": 30,
                                          "data": {"name": "digits", "classes": [0, 1]}},
    }
    out = {}
    for name, values in structures.items():
        out[name] = {}
        for compile in ("graph", "xla"):
            case = settings_module.from_dict({**values, "compile": compile})
            data = load_dataset(case.data)
            cache = StepCache()
            firsts, walls = [], []
            for _ in range(2):  # a new structure, then the same one again
                rows = []
                started = time.perf_counter()
                train(case, data, lambda r: rows.extend(r.rows), cache=cache)
                walls.append(time.perf_counter() - started)
                firsts.append(rows[0]["examples"] / rows[0]["examples_per_sec"])
            out[name][compile] = {"first_call_s": firsts[0], "case_wall_s": walls[0], "kept_case_wall_s": walls[1]}
        g, x = out[name]["graph"], out[name]["xla"]
        say(f"{name:32} first step: graph {g['first_call_s']:.2f} s, XLA {x['first_call_s']:.2f} s "
            f"(x{x['first_call_s'] / g['first_call_s']:.1f}); the whole 30-step case: graph {g['case_wall_s']:.2f} s, "
            f"XLA {x['case_wall_s']:.2f} s; again, traces kept: graph {g['kept_case_wall_s'] * 1e3:.0f} ms, "
            f"XLA {x['kept_case_wall_s'] * 1e3:.0f} ms")
    return out


def part_conv(tf, args) -> dict:
    import numpy as np

    from workers import models, settings as settings_module
    from workers.steps import Steps

    case = settings_module.from_dict({"model": "allconv9", "width": 1.0, "batch_size": 32, "optimizer": "adam",
                                      "lr": 1e-4})
    model = models.build_model(case, (32, 32, 3), 10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 32, 32, 3 * 0 + 3)).astype("float32")
    out = {}
    steps = {}
    for compile in ("graph", "xla"):
        step = Steps(case, model, 10, (32, 32, 32, 3), (0, 32, 32, 3), False, tf.float32, compile)
        step.load(model.init_params(0), None)
        steps[compile] = step
        out[compile] = {"times": []}
    empty_x, empty_y = tf.zeros((0, 32, 32, 3)), tf.zeros((0,), tf.int64)

    def one(compile: str) -> float:
        xs = rng.normal(size=(1, 32, 32, 32, 3)).astype("float32")
        labels = rng.integers(0, 10, (1, 32)).astype("int64")
        started = time.perf_counter()
        steps[compile].run_chunk(xs, labels, np.full(1, 1e-4), np.zeros(1), 0, 0, np.zeros(1, bool), empty_x, empty_y, 1)
        return time.perf_counter() - started
    for compile in ("graph", "xla"):
        out[compile]["first_call_s"] = one(compile)
    for round_ in range(args.conv_steps):
        for compile in (("graph", "xla") if round_ % 2 == 0 else ("xla", "graph")):
            out[compile]["times"].append(one(compile))
    for compile in out:
        out[compile]["s_per_step"] = statistics.median(out[compile]["times"])
    out["xla_over_graph"] = out["xla"]["s_per_step"] / out["graph"]["s_per_step"]
    say(f"allconv9 at 32x32x3, batch 32: graph {out['graph']['s_per_step']:.3f} s/step (first call "
        f"{out['graph']['first_call_s']:.1f} s), XLA {out['xla']['s_per_step']:.3f} s/step (first call "
        f"{out['xla']['first_call_s']:.1f} s); XLA / graph = {out['xla_over_graph']:.2f}x; {uptime()}")
    del x
    return out


def part_grappler(tf, args) -> dict:
    import numpy as np

    from workers import models, settings as settings_module
    from workers.steps import Steps

    rng = np.random.default_rng(0)
    shapes = {"cifar": ((32, 32, 3), 1.0, 32, args.conv_steps), "digits": ((8, 8, 1), 0.25, 16, 10 * args.conv_steps)}
    out = {}
    for shape_name, (shape, width, batch, rounds) in shapes.items():
        for schedule in ("standard", "unfair-front"):
            if shape_name == "cifar" and schedule == "unfair-front":
                continue  # about 9 standard steps a step: minutes on two cores
            # SGD, so that a step's update is the gradient times lr and the difference after one step
            # is the gradients' (Adam's first step divides each gradient by its own size, and turns
            # a rounding difference of a gradient near zero into one of a whole update)
            case = settings_module.from_dict({"model": "allconv9", "width": width, "batch_size": batch,
                                              "optimizer": "sgd", "lr": 0.01, "schedule": schedule})
            model = models.build_model(case, shape, 10)
            empty_x, empty_y = tf.zeros((0, *shape)), tf.zeros((0,), tf.int64)
            steps, times, first = {}, {"on": [], "off": []}, {}

            def one(variant: str, xs=None, labels=None) -> float:
                tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": variant == "off"})
                if xs is None:
                    xs = rng.normal(size=(1, batch, *shape)).astype("float32")
                    labels = rng.integers(0, 10, (1, batch)).astype("int64")
                started = time.perf_counter()
                steps[variant].run_chunk(xs, labels, np.full(1, 0.01), np.zeros(1), 0, 0, np.zeros(1, bool),
                                         empty_x, empty_y, 1)
                return time.perf_counter() - started

            xs = rng.normal(size=(1, batch, *shape)).astype("float32")  # the first step: the same for both
            labels = rng.integers(0, 10, (1, batch)).astype("int64")
            for variant in ("on", "off"):
                steps[variant] = Steps(case, model, 10, (batch, *shape), (0, *shape), False, tf.float32, "graph")
                steps[variant].load(model.init_params(0), None)
                first[variant] = one(variant, xs, labels)
            # what Grappler's rewrites change in one step: the largest difference of a weight after it,
            # relative to the largest change any weight made in the step; and each variant's distance
            # from the same step in float64 (Grappler on; the oracle of what float32 rounding allows)
            start = model.init_params(0)
            after = {v: steps[v].net.numpy_params() for v in ("on", "off")}
            exact = Steps(case, model, 10, (batch, *shape), (0, *shape), False, tf.float64, "graph")
            exact.load([{k: w.astype("float64") for k, w in unit.items()} for unit in start], None)
            tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
            exact.run_chunk(xs.astype("float64"), labels, np.full(1, 0.01), np.zeros(1), 0, 0, np.zeros(1, bool),
                            tf.zeros((0, *shape), tf.float64), empty_y, 1)
            after["float64"] = exact.net.numpy_params()

            def largest(difference) -> float:
                return max(float(np.abs(difference(i, k)).max()) for i in range(len(start)) for k in start[i])

            moved = largest(lambda i, k: after["float64"][i][k] - start[i][k])
            apart = largest(lambda i, k: after["on"][i][k] - after["off"][i][k])
            from_exact = {v: largest(lambda i, k: after[v][i][k] - after["float64"][i][k]) / moved for v in ("on", "off")}
            for round_ in range(rounds):
                for variant in (("on", "off") if round_ % 2 == 0 else ("off", "on")):
                    times[variant].append(one(variant))
            tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
            result = {v: {"first_call_s": first[v], "s_per_step": statistics.median(times[v])} for v in ("on", "off")}
            result["off_over_on_step"] = result["off"]["s_per_step"] / result["on"]["s_per_step"]
            result["first_call_saved_s"] = first["on"] - first["off"]
            result["one_step_difference_over_update"] = apart / moved
            result["one_step_from_float64_over_update"] = from_exact
            out[f"{shape_name}/{schedule}"] = result
            say(f"allconv9 {shape_name} {schedule}: Grappler on {result['on']['s_per_step'] * 1e3:.1f} ms/step "
                f"(first call {first['on']:.2f} s), off {result['off']['s_per_step'] * 1e3:.1f} ms/step "
                f"(first call {first['off']:.2f} s); off / on = {result['off_over_on_step']:.2f}x a step; after one "
                f"step the weights differ by {apart / moved:.1e} of the step's largest update (from float64: on "
                f"{from_exact['on']:.1e}, off {from_exact['off']:.1e}); {uptime()}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["step", "first", "conv"], choices=["step", "first", "conv", "grappler"])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conv-steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu_model(),
               "cores": os.cpu_count(), "load_before": uptime(), "cpu_pressure_before": cpu_pressure()}
    say(f"{results['date']} on {results['cpu']} ({results['cores']} cores); {results['load_before']}")
    tf = set_up()
    results["tensorflow"] = tf.__version__
    for part in args.parts:
        say(f"-- {part}")
        results[part] = {"step": part_step, "first": part_first, "conv": part_conv, "grappler": part_grappler}[part](tf, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    results["load_after"], results["cpu_pressure_after"] = uptime(), cpu_pressure()
    say(f"load after: {results['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
