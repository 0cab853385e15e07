"""Alignment measurements (alignment_every) against independent computations.

Every number a measured step reports is recomputed here from the parameters the step started
from, with tf.GradientTape in float64 (the layers' forward ops, differentiated by TensorFlow,
never the hand-written backward), the schedule re-enacted stage by stage with SGD, and NumPy
cosines. Two measured steps per schedule, the first of unfair-back/front updating a unit
several times."""

import math

import numpy as np
import pytest
import tensorflow as tf

from workers import alignment, models, optimizers, schedules
from workers import settings as settings_module
from workers.engine import Net
from workers.layers import Context
from workers.steps import Steps

pytestmark = pytest.mark.timeout(120)

LR, RECURRENT_LR = 0.05, 0.03


def make(schedule, model="mlp", hidden=(6, 5), optimizer="sgd", **extra):
    settings = settings_module.from_dict({"model": model, "hidden": list(hidden), "schedule": schedule,
                                          "optimizer": optimizer, "lr": LR, "recurrent_lr": RECURRENT_LR,
                                          "synthetic_lr": 0.2, "init": "xavier", "batch_size": 5, **extra})
    num_classes = 2 if model == "dni_rnn" else 3
    built = models.build_model(settings, (4,), num_classes)
    params = built.init_params(7, dtype=np.float64)
    rng = np.random.default_rng(11)
    for unit in params:  # synthetic-gradient models start at zero: give them something to say
        for name in ("sg_w", "sg_b"):
            if name in unit:
                unit[name] = rng.normal(scale=0.5, size=unit[name].shape)
    xs = rng.normal(size=(2, 5, 4)) + 0.3  # two steps' batches
    labels = rng.integers(0, num_classes, size=(2, 5))
    return settings, built, params, xs, labels, num_classes


def measured_steps(settings, built, params, xs, labels, num_classes, compile_mode="graph"):
    """Run len(xs) measured steps through the trainer's measured chunk (traced, or compiled
    with XLA); per step the parameters before it, its rows {(layer, quantity): value} and the
    parameters after."""
    steps = Steps(settings, built, num_classes, xs.shape[1:], (1, *xs.shape[2:]), False, tf.float64, compile_mode)
    steps.load(params, None)
    out = []
    for index in range(len(xs)):
        before = steps.net.numpy_params()
        result = steps.run_chunk(xs[index:index + 1], labels[index:index + 1].astype(np.int64), np.array([LR]),
                                 np.array([schedules.dilation_rate(settings, 0)]), 1, index, np.array([False]),
                                 tf.zeros([0, *xs.shape[2:]], tf.float64), tf.zeros([0], tf.int64),
                                 measure_flags=np.array([True]))
        rows = alignment.rows(steps.traced["alignment_keys"], result[-1][0], index, 0,
                              [unit.name for unit in built.units])
        out.append((before, {(r["layer"], r["quantity"]): r["value"] for r in rows}, steps.net.numpy_params()))
    assert steps.measured_fallback is None  # XLA compiled the measured step (no fallback to the graph)
    return out


# ---------------------------------------------------------------------- the oracle


def cosine(a, b):
    a, b = np.concatenate([np.ravel(v) for v in a]), np.concatenate([np.ravel(v) for v in b])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def norm(values):
    return float(np.linalg.norm(np.concatenate([np.ravel(v) for v in values])))


class Tape:
    """The network as plain variables, differentiated by tf.GradientTape."""

    def __init__(self, built, params):
        self.net = Net(built, params, dtype=tf.float64)
        self.units = built.units

    def names(self, index):  # the parameters of a unit that the loss depends on
        return sorted(n for n in self.net.variables[index] if not n.startswith("sg_"))

    def outputs(self, x):
        acts = [x]
        for index in range(len(self.units)):
            acts.append(self.net.forward_unit(index, acts[-1], Context(training=True))[0])
        return acts

    def gradients(self, x, y):
        """(d loss / d params per unit, d loss / d output of each unit, d loss / d x)."""
        x = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            acts = self.outputs(x)
            loss = self.net.loss.forward(acts[-1], y)[0]
        grads = [dict(zip(self.names(i), tape.gradient(loss, [self.net.variables[i][n] for n in self.names(i)])))
                 for i in range(len(self.units))]
        errors = [tape.gradient(loss, acts[i + 1]) for i in range(len(self.units))]
        return grads, errors, tape.gradient(loss, x)

    def vjp(self, index, x_in, d_y):
        """(d params, d input) of unit `index` at input x_in for output gradient d_y."""
        x_in = tf.constant(x_in)
        variables = [self.net.variables[index][n] for n in self.names(index)]
        with tf.GradientTape() as tape:
            tape.watch(x_in)
            y = self.net.forward_unit(index, x_in, Context(training=True))[0]
        *d_params, d_x = tape.gradient(y, [*variables, x_in], output_gradients=d_y)
        return dict(zip(self.names(index), d_params)), d_x

    def sgd(self, index, grads, lr=LR):
        for name, grad in grads.items():
            self.net.variables[index][name].assign_sub(lr * grad)


def expected(schedule, settings, built, params, x, labels, num_classes):
    """{(layer, quantity): value} of one step from `params`, and the parameters after it."""
    y = tf.one_hot(labels, num_classes, dtype=tf.float64)
    tape = Tape(built, params)
    depth, names = len(built.units), [u.name for u in built.units]
    true, true_errors, d_x = tape.gradients(x, y)
    signal = {i: [] for i in range(depth)}  # per unit, each update's gradient
    received = {}  # unit -> (error it received, back propagation's) for units updated once
    interfaces = {}
    if schedule == "unfair-back":
        for stage in range(1, depth + 1):
            grads, errors, _ = tape.gradients(x, y)  # at the current parameters
            for i in range(depth - stage, depth):
                signal[i].append(grads[i])
                tape.sgd(i, grads[i])
            if stage == depth:
                received[0] = errors[0]
    elif schedule == "unfair-front":
        for stage in range(1, depth + 1):
            grads, errors, _ = tape.gradients(x, y)
            for i in range(stage):
                signal[i].append(grads[i])
                tape.sgd(i, grads[i])
            if stage == depth:
                received[depth - 1] = errors[depth - 1]
    elif schedule in ("dilated", "adversarial"):
        rate = schedules.dilation_rate(settings, 0)
        if schedule == "adversarial":
            x_used = x + settings.adversarial_epsilon * np.sign(d_x.numpy())
            grads, errors, _ = tape.gradients(x_used, y)
            for i in range(depth):
                signal[i].append(grads[i])
                received[i] = errors[i]
        else:  # back-propagate by hand through tape VJPs, adding r * (what unit i+2 sends down) at units 1..depth-3
            acts = tape.outputs(tf.constant(x))
            error, sent = true_errors[depth - 1], {}
            for i in reversed(range(depth)):
                if i in schedules.dilated_units(depth):
                    error = error + rate * sent[i + 2]
                received[i] = error
                grads, sent[i] = tape.vjp(i, acts[i], error)
                signal[i].append(grads)
                error = sent[i]
        for i in range(depth):
            tape.sgd(i, signal[i][0])
    elif schedule == "synthetic":
        acts = tape.outputs(tf.constant(x))
        hidden = settings.hidden[0]
        for i in range(depth - 1):
            variables = tape.net.variables[i]
            state = acts[i + 1][:, -hidden:]
            g_hat = tf.matmul(state, variables["sg_w"]) + variables["sg_b"]
            d_y = tf.concat([tf.zeros_like(acts[i + 1][:, :-hidden]), g_hat], axis=1)
            grads, _ = tape.vjp(i, acts[i], d_y)
            signal[i].append(grads)
            received[i] = (g_hat, true_errors[i][:, -hidden:])
            interfaces[i] = (g_hat, true_errors[i][:, -hidden:])  # every forward used the start weights
        signal[depth - 1].append(true[depth - 1])
        for i in range(depth - 1):
            tape.sgd(i, signal[i][0], RECURRENT_LR)
            g_hat, target = interfaces[i]  # each synthetic-gradient model: one SGD step on 1/2 mean ||g_hat - target||^2
            state, batch = acts[i + 1][:, -hidden:], x.shape[0]
            tape.sgd(i, {"sg_w": tf.matmul(state, g_hat - target, transpose_a=True) / batch,
                         "sg_b": tf.reduce_sum(g_hat - target, axis=0) / batch}, settings.synthetic_lr)
        tape.sgd(depth - 1, true[depth - 1])
    else:
        raise AssertionError(schedule)
    after = tape.net.numpy_params()
    out = {}
    for i in range(depth):
        keys = tape.names(i)
        true_i = [true[i][n].numpy() for n in keys]
        if signal[i]:
            summed = [sum(g[n].numpy() for g in signal[i]) for n in keys]
            c = cosine(summed, true_i)
            out[names[i], "signal_cosine"] = c
            out[names[i], "signal_angle"] = math.degrees(math.acos(min(1.0, max(-1.0, c))))
            out[names[i], "signal_norm_ratio"] = norm(summed) / norm(true_i)
            out[names[i], "update_cosine"] = cosine([after[i][n] - params[i][n] for n in keys], [-t for t in true_i])
        if i in received:
            got, want = received[i] if isinstance(received[i], tuple) else (received[i], true_errors[i])
            c = cosine([got.numpy()], [want.numpy()])
            out[names[i], "error_angle"] = math.degrees(math.acos(min(1.0, max(-1.0, c))))
        if i in interfaces:
            g_hat, target = (t.numpy() for t in interfaces[i])
            out[names[i], "sg_cosine"] = cosine([g_hat], [target])
            out[names[i], "sg_relative_error"] = float(np.linalg.norm(g_hat - target) / np.linalg.norm(target))
    return out, after


def assert_matches(got: dict, want: dict, tol=1e-9):
    assert set(got) == set(want), f"measured {sorted(set(got) ^ set(want))} differently from the oracle"
    for key, value in want.items():
        if key[1].endswith("_angle"):  # compare the cosines: arccos near 1 amplifies round-off
            assert math.cos(math.radians(got[key])) == pytest.approx(math.cos(math.radians(value)), abs=tol), key
        else:
            assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


CASES = {
    "unfair-back": {},
    "unfair-front": {},
    "dilated": {"hidden": (6, 6, 6)},  # four units: unit 1 gets the skip from unit 3
    "adversarial": {"adversarial_epsilon": 0.2},
    "synthetic": {"model": "dni_rnn", "hidden": (4,)},
}


@pytest.mark.parametrize("schedule, compile_mode", [*((name, "graph") for name in sorted(CASES)), ("unfair-back", "xla")])
def test_every_number_matches_the_oracle(schedule, compile_mode):
    """compile xla: the measured step compiled by XLA (as a case with `compile: xla` or auto's
    XLA runs it) reports the same numbers, unfair-back updating units several times."""
    settings, built, params, xs, labels, num_classes = make(schedule, **CASES[schedule])
    steps = measured_steps(settings, built, params, xs, labels, num_classes, compile_mode)
    assert len(steps) == 2
    for index, (before, got, after) in enumerate(steps):
        want, oracle_after = expected(schedule, settings, built, before, xs[index], labels[index], num_classes)
        assert_matches(got, want)
        for unit_after, unit_oracle in zip(after, oracle_after):
            for name, value in unit_oracle.items():
                np.testing.assert_allclose(unit_after[name], value, rtol=1e-10, atol=1e-12)
    if schedule in ("unfair-back", "unfair-front"):  # a unit updated several times was measured
        assert max(got[name, "signal_norm_ratio"] for name in ("l1", "l2", "l3")) > 1.5


def test_a_dropped_stage_is_caught(monkeypatch):
    """Break the measurement on purpose (drop each unit's first stage from its signal): the oracle test fails."""
    original = alignment.Probe.record_update

    def dropping(self, index, grads):
        original(self, index, grads)
        if len(self.stage_grads[index]) == 1 and self.net.depth > 2:
            self.stage_grads[index][0] = {n: tf.zeros_like(g) for n, g in grads.items()}

    settings, built, params, xs, labels, num_classes = make("unfair-back")
    monkeypatch.setattr(alignment.Probe, "record_update", dropping)
    before, got, _ = measured_steps(settings, built, params, xs[:1], labels[:1], num_classes)[0]
    want, _ = expected("unfair-back", settings, built, before, xs[0], labels[0], num_classes)
    with pytest.raises(AssertionError):
        assert_matches(got, want)


# ---------------------------------------------------------------------- exact in float64


def eager_step(schedule_name, engine="manual", model="allconv9"):
    settings = settings_module.from_dict({"model": model, "width": 0.05, "schedule": schedule_name, "engine": engine,
                                          "optimizer": "adam", "lr": 0.01, "init": "xavier"})
    built = models.build_model(settings, (8, 8, 3), 10)
    net = Net(built, built.init_params(3, dtype=np.float64), dtype=tf.float64)
    optimizer = optimizers.make_optimizer(settings, net)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(4, 8, 8, 3)) + 0.2)
    y = tf.one_hot([1, 4, 7, 9], 10, dtype=tf.float64)
    ctx = Context(training=True)
    probe = alignment.Probe(net, x, y, ctx)
    step = schedules.Stepper(net, optimizer, ctx, tf.constant(0.01, tf.float64), settings, tf.constant(0.5, tf.float64),
                             probe=probe)
    net.probe = probe
    schedules.get_schedule(settings)(step, x, y)
    net.probe = None
    keys, values = probe.finish()
    return probe, dict(zip(keys, values.numpy())), built


@pytest.mark.parametrize("engine", ["manual", "autodiff"])
def test_standard_is_exact(engine):
    probe, values, built = eager_step("standard", engine)
    assert not probe.forwarded  # the true gradient came from the schedule's own first forward
    for index in range(len(built.units)):
        assert abs(values[index, "signal_cosine"] - 1.0) <= 1e-12
        assert abs(values[index, "signal_norm_ratio"] - 1.0) <= 1e-12
        if engine == "manual":
            assert abs(values[index, "error_cosine"] - 1.0) <= 1e-12
    # The true gradient is independent of the schedule's: tf.GradientTape agrees.
    tape = Tape(built, [{n: v.numpy() for n, v in unit.items()} for unit in probe.start])
    grads, _, _ = tape.gradients(probe.x, probe.y_onehot)
    for index in range(len(built.units)):
        for name, grad in grads[index].items():
            np.testing.assert_allclose(probe.true_grads[index][name].numpy(), grad.numpy(), rtol=1e-9, atol=1e-13)


def test_unfair_back_first_stage_is_exact():
    probe, values, built = eager_step("unfair-back")
    top = len(built.units) - 1
    first = probe.stage_grads[top][0]
    names = sorted(first)
    got = [first[n].numpy() for n in names]
    true = [probe.true_grads[top][n].numpy() for n in names]
    assert abs(cosine(got, true) - 1.0) <= 1e-12
    assert abs(norm(got) / norm(true) - 1.0) <= 1e-12
    assert len(probe.stage_grads[top]) == len(built.units)  # and the row sums all its stages
    assert values[top, "signal_norm_ratio"] > 1.5


def test_feedback_weights_are_measured_like_biotorch():
    """A hand-made Net.feedback (what feedback learning rules set): BioTorch's layer
    alignment (180/pi) arccos(<vec B, vec W> / (|B| |W|)) and |B|_F / |W|_F, for the units
    and weights that have a B of W's shape only."""
    settings, built, params, xs, labels, num_classes = make("standard", hidden=(6, 5))
    net = Net(built, params, dtype=tf.float64)
    rng = np.random.default_rng(3)
    b0 = rng.normal(size=params[0]["w"].shape)
    b2 = params[2]["w"] * 2.0 + rng.normal(scale=0.1, size=params[2]["w"].shape)
    net.feedback = [{"w": tf.Variable(b0)}, {}, {"w": tf.Variable(b2), "b": tf.Variable(np.zeros((7, 7)))}]
    optimizer = optimizers.make_optimizer(settings, net)
    x, y = tf.constant(xs[0]), tf.one_hot(labels[0], num_classes, dtype=tf.float64)
    probe = alignment.Probe(net, x, y, Context(training=True))
    step = schedules.Stepper(net, optimizer, Context(training=True), tf.constant(LR, tf.float64), settings, None, probe=probe)
    schedules.standard(step, x, y)
    keys, values = probe.finish()
    rows = {(r["layer"], r["quantity"]): r["value"] for r in alignment.rows(keys, values.numpy(), 0, 0, ["l1", "l2", "l3"])}
    for layer, b, w in (("l1", b0, params[0]["w"]), ("l3", b2, params[2]["w"])):
        c = float(np.sum(b * w) / (np.linalg.norm(b) * np.linalg.norm(w)))
        assert rows[layer, "feedback_angle"] == pytest.approx(np.degrees(np.arccos(np.clip(c, -1, 1))), abs=1e-9)
        assert rows[layer, "feedback_ratio"] == pytest.approx(np.linalg.norm(b) / np.linalg.norm(w), rel=1e-12)
    assert ("l2", "feedback_angle") not in rows  # no feedback weights
    assert rows["l3", "feedback_angle"] < 10 < rows["l1", "feedback_angle"]


def test_angles_and_nan():
    assert alignment.angle_degrees(1.0 + 1e-15) == 0.0
    assert alignment.angle_degrees(-1.0) == pytest.approx(180.0)
    assert alignment.angle_degrees(0.5) == pytest.approx(60.0)
    assert math.isnan(alignment.angle_degrees(float("nan")))


# ---------------------------------------------------------------------- training unchanged


def train_case(cache=None, **changes):
    from workers.data import load_dataset
    from workers.trainer import train, unpack_checkpoint

    case = settings_module.from_dict({"model": "allconv9", "width": 0.125, "init": "xavier", "lr": 0.002, "batch_size": 16,
                                      "epochs": 2, "steps_per_epoch": 5,
                                      "data": {"name": "digits", "train_size": 160, "test_size": 50}, **changes})
    reports = []
    train(case, load_dataset(case.data), reports.append, cache=cache)
    params = unpack_checkpoint([r.checkpoint for r in reports if r.checkpoint is not None][-1])[0]
    rows = [{k: v for k, v in row.items() if k not in ("wall_time", "examples_per_sec")} for r in reports for row in r.rows]
    return params, rows, [row for r in reports for row in r.alignment]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["unfair-back", "adversarial"])
def test_training_is_bit_identical_with_alignment_on(schedule):
    """The measured steps run the same ops on the same values (float32, as cases train):
    the weights after 10 steps and every metrics row are equal bit for bit. The second case
    reuses the first one's traced steps (alignment_every is not part of a structure)."""
    from workers.trainer import StepCache

    cache = StepCache()
    params_off, rows_off, none = train_case(cache, schedule=schedule)
    (steps,) = cache.entries.values()
    assert steps.measured_chunk.experimental_get_tracing_count() == 0  # off: only the step without the measurement
    params_on, rows_on, measured = train_case(cache, schedule=schedule, alignment_every=3)
    assert cache.hits == 1
    assert none == [] and rows_on == rows_off
    for unit_off, unit_on in zip(params_off, params_on):
        for name in unit_off:
            np.testing.assert_array_equal(unit_on[name], unit_off[name])
    assert sorted({row["step"] for row in measured}) == [0, 3, 6, 9]
    assert {row["epoch"] for row in measured if row["step"] == 6} == {1}
    per_step = len(measured) // 4
    assert per_step == 9 * 4 + (1 if schedule == "unfair-back" else 9)  # signal x3 + update per unit; error rows


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["unfair-back", "adversarial"])
def test_compiled_training_is_bit_identical_with_alignment_on(schedule):
    """compile xla: the steps between measured ones run the very executable they run with
    alignment off (one trace of the unmeasured chunk for both cases), and the measured step,
    compiled by XLA on its own, leaves the same weights: every metrics row and the weights
    after 24 steps are equal bit for bit (measured, float32, SGD and Adam; the tolerance for
    XLA fusing the measured step differently was not needed)."""
    from workers.data import load_dataset
    from workers.trainer import StepCache, train, unpack_checkpoint

    def case_run(cache, **changes):
        case = settings_module.from_dict({"model": "mlp", "hidden": [8, 8], "schedule": schedule, "compile": "xla",
                                          "optimizer": "adam" if schedule == "adversarial" else "sgd", "lr": 0.05,
                                          "batch_size": 40, "epochs": 6,
                                          "data": {"name": "moons", "samples": 200, "noise": 0.2}, **changes})
        reports = []
        train(case, load_dataset(case.data), reports.append, cache=cache, max_chunk=5)
        params = unpack_checkpoint([r.checkpoint for r in reports if r.checkpoint is not None][-1])[0]
        rows = [{k: v for k, v in row.items() if k not in ("wall_time", "examples_per_sec")}
                for r in reports for row in r.rows]
        return params, rows, [row for r in reports for row in r.alignment], reports[0].info

    cache = StepCache()
    params_off, rows_off, none, info_off = case_run(cache)
    (steps,) = cache.entries.values()
    assert steps.measured_chunk.experimental_get_tracing_count() == 0 and "alignment_compile" not in info_off
    params_on, rows_on, measured, info_on = case_run(cache, alignment_every=5)
    assert cache.hits == 1 and steps.train_chunk.experimental_get_tracing_count() == 1  # the same executable
    assert info_on["compile"] == "xla" and info_on["alignment_compile"] == "xla"
    assert none == [] and rows_on == rows_off and len(rows_on) == 24 + 6
    for unit_off, unit_on in zip(params_off, params_on):
        for name in unit_off:
            np.testing.assert_array_equal(unit_on[name], unit_off[name])
    assert sorted({row["step"] for row in measured}) == [0, 5, 10, 15, 20]


# ---------------------------------------------------------------------- stored like metrics


def test_rows_are_committed_like_metrics_and_loaded_with_names(tmp_path, monkeypatch):
    """RUN/alignment/: typed columns, a commit's rows invisible until its ledger write, a crash
    before it leaves nothing (recover deletes the staged part), and analysis.load joins the
    case's name and group."""
    import json

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    import analysis
    from analysis.rundir import RunDir
    from workers.data import load_dataset
    from workers.trainer import train

    values = {"model": "mlp", "hidden": [6], "data": {"name": "moons", "samples": 120}, "batch_size": 16, "epochs": 2,
              "steps_per_epoch": 3, "lr": 0.01, "alignment_every": 2, "seed": 3}
    case = settings_module.from_dict(values)
    reports = []
    train(case, load_dataset(case.data), reports.append, report_every_seconds=1e9, commit_every=1e9,
          checkpoint_every_steps=3, max_chunk=1)
    row = {"case_id": "c0", "name": "mlp-s3", "group": "mlp", "num_cpus": 1.0, "num_gpus": 0.0, "steps_total": 6,
           "settings_json": json.dumps(case.to_dict(), default=list), **case.flat()}
    run = RunDir.create(str(tmp_path / "run"), {"suite": "t"}, [row])
    produced = [r for report in reports for r in report.alignment]
    assert sorted({r["step"] for r in produced}) == [0, 2, 4]
    first = reports[0]
    entry = run.entry("c0")
    original = RunDir._put_entry

    def dying(self, entry):  # the driver dies before the ledger write, i.e. before the commit
        raise OSError("killed")

    monkeypatch.setattr(RunDir, "_put_entry", dying)
    with pytest.raises(OSError):
        run.commit("c0", entry, checkpoint=first.checkpoint, tables={"metrics": first.rows, "alignment": first.alignment})
    monkeypatch.setattr(RunDir, "_put_entry", original)
    assert list((tmp_path / "run" / "alignment" / "case_id=c0").glob("part-*")) == []
    notes = RunDir.open(str(tmp_path / "run")).recover()
    assert any("deleted uncommitted alignment/" in note for note in notes), notes
    assert not list((tmp_path / "run" / "alignment").rglob(".staged-*"))
    run = RunDir.open(str(tmp_path / "run"))
    for report in reports:
        if report.checkpoint is None and report.status != "done":
            continue
        entry = run.entry("c0")
        entry.state = "done" if report.status == "done" else "running"
        run.commit("c0", entry, checkpoint=report.checkpoint, tables={"metrics": report.rows, "alignment": report.alignment})
    table = pq.read_table(tmp_path / "run" / "alignment")
    types = {f.name: f.type for f in table.schema}
    assert types["step"] == pa.int64() and types["unit"] == pa.int64() and types["value"] == pa.float64()
    assert types["layer"] == pa.string() and types["quantity"] == pa.string()
    assert table.num_rows == len(produced)
    assert run.verify() == []
    loaded = analysis.load(tmp_path / "run").alignment
    assert list(loaded.columns[:3]) == ["case_id", "name", "group"]
    assert set(loaded["name"].astype(str)) == {"mlp-s3"} and set(loaded["group"].astype(str)) == {"mlp"}
    columns = ["step", "layer", "quantity", "value"]
    mine = loaded[columns].astype({"layer": str, "quantity": str}).sort_values(columns[:3]).reset_index(drop=True)
    want = pd.DataFrame(produced)[columns].sort_values(columns[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, want)
    assert len(analysis.load(tmp_path / "run", datasets=()).alignment) == 0
    # the report: the section with its table and figure, and the sentence when nothing was measured
    from analysis.alignment import SKIPPED
    from analysis.report import write_report

    report = write_report(tmp_path / "run", out_dir=tmp_path / "report").read_text()
    assert "## Alignment with the true gradient" in report and "![](alignment_angles.png)" in report
    assert (tmp_path / "report" / "alignment_layers.csv").exists()
    data = analysis.load(tmp_path / "run")
    data.alignment = data.alignment.iloc[:0]
    assert SKIPPED in write_report(data, out_dir=tmp_path / "plain", figures=False).read_text()


# ---------------------------------------------------------------------- the report's section


def fake_alignment():
    """Two groups x two seeds x two layers, two epochs of two measured steps, known values."""
    import pandas as pd

    rows = []
    for group, offset in (("back", 30.0), ("std", 0.0)):
        for seed in (1, 2):
            case = f"{group}-s{seed}"
            for epoch in (0, 1):
                for step in (epoch * 10, epoch * 10 + 5):
                    for unit, layer in ((0, "l1"), (1, "l2")):
                        angle = offset + 10 * unit + seed + epoch * 100 + (step % 10)
                        rows.append({"case_id": case, "name": case, "group": group, "step": step, "epoch": epoch,
                                     "layer": layer, "unit": unit, "quantity": "signal_angle", "value": angle})
                        rows.append({"case_id": case, "name": case, "group": group, "step": step, "epoch": epoch,
                                     "layer": layer, "unit": unit, "quantity": "signal_norm_ratio", "value": float(seed)})
    return pd.DataFrame(rows)


def test_layer_table_is_the_last_epoch_mean_over_seeds_with_its_interval():
    from analysis.alignment import layer_table

    table = layer_table(fake_alignment()).set_index(["group", "layer"])
    # back, l1: seed s's last-epoch mean is 30 + s + 100 + 2.5; mean over s = 1, 2 is 134.0
    assert table.at[("back", "l1"), "signal_angle_mean"] == pytest.approx(134.0)
    assert table.at[("std", "l2"), "signal_angle_mean"] == pytest.approx(114.0)
    assert table.at[("std", "l2"), "n"] == 2
    sd = np.std([1.0, 2.0], ddof=1)  # the seeds' ratios 1 and 2: t(0.975, 1) = 12.706
    assert table.at[("std", "l1"), "signal_norm_ratio_ci95"] == pytest.approx(12.706204736174707 * sd / np.sqrt(2))
    assert table.at[("back", "l1"), "signal_angle_ci95"] == pytest.approx(12.706204736174707 * sd / np.sqrt(2))


def test_section_is_skipped_without_measurements_and_draws_with_them(tmp_path):
    import pandas as pd

    from analysis.alignment import section

    assert section(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), tmp_path) is None
    frame = fake_alignment()
    cases = frame.drop_duplicates("case_id")[["case_id", "name", "group"]].assign(
        schedule=lambda f: f["group"].map({"back": "unfair-back", "std": "standard"}))
    per_case = cases.assign(final_test_acc=[0.5, 0.6, 0.9, 0.95])
    part = section(frame, per_case, cases, tmp_path)
    text = "\n".join(part.lines)
    assert part.title == "Alignment with the true gradient" and "| back | 0 | l1 | 2 | 134 | 6.3531 |" in text
    assert (tmp_path / "alignment_angles.png").stat().st_size > 0
    assert (tmp_path / "alignment_vs_accuracy.png").stat().st_size > 0
    versus = part.csvs["alignment_vs_accuracy"].set_index("name")
    assert versus.at["back-s1", "mean_signal_angle"] == pytest.approx((131 + 141 + 5) / 2)
    assert versus.at["std-s2", "final_test_acc"] == 0.95
    assert "correlation" in text


@pytest.mark.timeout(60)
def test_each_panel_is_titled_by_its_group_and_the_settings_that_set_groups_apart(tmp_path, monkeypatch):
    """A panel says which schedule it shows, as the report's other figures do ("back: schedule=
    unfair-back"), not only the group's name; with several runs, the runs it pools."""
    import matplotlib.axes
    import pandas as pd

    from analysis.alignment import group_titles, section

    frame = fake_alignment()
    cases = frame.drop_duplicates("case_id")[["case_id", "name", "group"]].assign(
        schedule=lambda f: f["group"].map({"back": "unfair-back", "std": "standard"}), seed=[1, 2, 1, 2])
    titles = group_titles(cases, ["schedule"])
    assert titles == {"back": "back: schedule=unfair-back", "std": "std: schedule=standard"}
    assert group_titles(pd.DataFrame(), ["schedule"]) == {}
    drawn = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, text, *a, **k: (drawn.append(text), real(ax, text, *a, **k))[1])
    section(frame, cases.assign(final_test_acc=0.5), cases, tmp_path, titles=titles)
    assert drawn[:2] == ["back: schedule=unfair-back", "std: schedule=standard"]
    drawn.clear()
    two_runs = frame.assign(run=np.where(frame["case_id"].str.endswith("s1"), "r1", "r2"))
    run_cases = cases.assign(run=np.where(cases["case_id"].str.endswith("s1"), "r1", "r2"))
    assert group_titles(run_cases, ["schedule"]) == titles
    pooled = pd.DataFrame({"run": ["A", "B"], "case_id": ["m", "m"], "group": ["mid", "mid"], "lr": [0.01, 0.02]})
    assert group_titles(pooled, ["lr"]) == {"mid": "mid: lr=0.01|0.02"}  # both runs' values, not the first's
    section(two_runs, run_cases.assign(final_test_acc=0.5), run_cases, tmp_path, titles=titles)
    assert drawn[:2] == ["back: schedule=unfair-back (r1, r2)", "std: schedule=standard (r1, r2)"]


@pytest.mark.timeout(60)
def test_a_panel_of_zero_angles_says_so():
    """Back propagation's angles are 0 at every step: the lines lie on the axis, so the panel
    says what that means; a panel with real angles has no such note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.alignment import plot_layer_angles

    frame = fake_alignment()
    angles = frame[frame["quantity"] == "signal_angle"]
    fig, (flat, real) = plt.subplots(1, 2)
    plot_layer_angles(flat, angles.assign(value=0.0))
    plot_layer_angles(real, angles)
    assert [t.get_text() for t in flat.texts] == ["every layer within 0.5 degrees\nof the true gradient at every step"]
    assert len(real.texts) == 0
    plt.close(fig)
