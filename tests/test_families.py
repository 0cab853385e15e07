"""The other experiment families (docs/experiments.md s2-s4): dilated back propagation against a
gradient assembled by hand, synthetic gradients, and every source quirk changing exactly
what it names."""

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import QUICK_SUITES
from workers import layers as L
from workers import models, optimizers, settings as settings_module
from workers.engine import Net
from workers.layers import Context
from workers.settings import CaseSettings


# ---------------------------------------------------------------------- dilated


def unit_vjp(net, index, x_in, incoming):
    """(d input, {param: d param}) of one unit by tf.GradientTape: the per-unit oracle."""
    variables = net.variables[index]
    with tf.GradientTape() as tape:
        tape.watch(x_in)
        y, _ = net.forward_unit(index, x_in, Context())
        objective = tf.reduce_sum(y * incoming)
    names = sorted(variables)
    grads = tape.gradient(objective, [x_in] + [variables[n] for n in names])
    return grads[0], dict(zip(names, grads[1:]))


def test_dilated_backward_matches_a_gradient_assembled_by_hand():
    rate = 0.37
    settings = CaseSettings(model="celu7", width=0.05)
    model = models.build_model(settings, (32, 32, 1), 10)
    net = Net(model, model.init_params(1, dtype=np.float64), dtype=tf.float64)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 32, 32, 1)))
    y = tf.one_hot([1, 2, 3], 10, dtype=tf.float64)
    acts, caches = net.forward(x, Context())
    _, d_out = net.loss_and_gradient(acts[-1], y)
    skip_units = (1, 2, 3, 4)  # layers 2, 3, 4, 5 of docs/experiments.md s2; 1, 6, 7 get no skip
    grads, _ = net.backward(d_out, caches, skip_units=skip_units, skip_rate=rate)

    # By hand: walk down; unit i's incoming gradient is what unit i+1 sent down, plus, for
    # layers 2-5, rate * the gradient unit i+2 sent down, upsampled by repeating pixels.
    sent_down, expected = {}, {}
    for i in reversed(range(7)):
        incoming = d_out.numpy() if i == 6 else sent_down[i + 1]
        if i in skip_units:
            skip = sent_down[i + 2]
            factor = incoming.shape[1] // skip.shape[1]
            assert factor == 2  # every skip crosses one 2x2 pool
            incoming = incoming + rate * np.repeat(np.repeat(skip, factor, axis=1), factor, axis=2)
        d_input, d_params = unit_vjp(net, i, acts[i], tf.constant(incoming))
        sent_down[i], expected[i] = d_input.numpy(), d_params
    for i in range(7):
        np.testing.assert_allclose(grads[i]["w"], expected[i]["w"], rtol=1e-9, atol=1e-13)
    # and the skips matter: without them layer 2 gets another gradient
    plain, _ = net.backward(d_out, caches)
    assert not np.allclose(plain[1]["w"], grads[1]["w"])
    np.testing.assert_allclose(plain[6]["w"], grads[6]["w"])  # the top is untouched


def test_dilation_rate_decays_with_the_epoch():
    from workers.schedules import dilation_rate

    settings = CaseSettings(dilation_rate=0.5, dilation_decay=0.05)
    assert [dilation_rate(settings, e) for e in (0, 1, 20)] == pytest.approx([0.5, 0.5 / 1.05, 0.25])


# ---------------------------------------------------------------------- synthetic gradients


def test_rnn_cell_and_take_last_gradients_match_autodiff():
    from tests.helpers import check_op

    rng = np.random.default_rng(3)
    check_op(L.RNNCell(6, 3, first=True), (4, 6), {"wx": rng.normal(size=(6, 3)), "b": rng.normal(size=(3,))})
    check_op(L.RNNCell(6, 3, first=False), (4, 9), {"wx": rng.normal(size=(6, 3)), "wh": rng.normal(size=(3, 3)),
                                                   "b": rng.normal(size=(3,))})
    check_op(L.TakeLast(3), (4, 9))


def test_dni_model_gradients_match_autodiff():
    from workers import gradcheck

    assert max(gradcheck.check_model("dni_rnn").values()) <= 1e-6


def test_synthetic_gradient_error_falls_on_a_fixed_problem():
    """Freeze the net (tiny lr): the targets stand still and the linear synthetic-gradient
    models must learn to predict them."""
    from workers.data import load_dataset
    from workers.trainer import train

    case = settings_module.from_dict({"model": "dni_rnn", "hidden": [3], "schedule": "synthetic", "optimizer": "sgd",
                                      "lr": 1e-9, "recurrent_lr": 1e-9, "synthetic_lr": 0.3, "batch_size": 10, "epochs": 4,
                                      "data": {"name": "digits", "classes": [0, 1]}})
    reports = []
    train(case, load_dataset(case.data), reports.append)
    by_epoch = {}
    for report in reports:
        for row in report.rows:
            if row["split"] == "train":
                by_epoch.setdefault(row["epoch"], []).append(row["synthetic_error"])
    means = [np.mean(by_epoch[e]) for e in sorted(by_epoch)]
    assert means[-1] < 0.75 * means[0], means
    assert all(b <= a * 1.02 for a, b in zip(means, means[1:])), means


def test_synthetic_schedule_updates_each_unit_once_and_learns():
    from workers.data import load_dataset
    from workers.trainer import train

    case = settings_module.from_dict({"model": "dni_rnn", "hidden": [3], "schedule": "synthetic", "optimizer": "sgd",
                                      "lr": 0.1, "recurrent_lr": 0.1, "synthetic_lr": 0.1, "batch_size": 10, "epochs": 5,
                                      "data": {"name": "digits", "classes": [0, 1]}})
    reports = []
    train(case, load_dataset(case.data), reports.append)
    rows = [row for r in reports for row in r.rows]
    assert rows[0]["updates"] == [1, 1, 1]
    assert [row["accuracy"] for row in rows if row["split"] == "test"][-1] > 0.8


# ---------------------------------------------------------------------- quirks


def run_op(op, x, upstream):
    y, cache = op.forward(tf.constant(x), {}, Context())
    return y.numpy(), op.backward(tf.constant(upstream), cache)[0].numpy()


X = np.array([[-2.0, -0.5, 0.0, 0.3, 1.7]])
UP = np.array([[0.3, -1.2, 0.7, 2.0, -0.4]])


def test_elu_quirk_derivative_two_where_positive_only():
    y_ok, d_ok = run_op(L.ELU(), X, UP)
    y_q, d_q = run_op(L.ELU(derivative_two_quirk=True), X, UP)
    np.testing.assert_array_equal(y_q, y_ok)  # forward unchanged
    positive = X > 0
    np.testing.assert_array_equal(d_q[positive], 2 * UP[positive])
    np.testing.assert_array_equal(d_q[~positive], d_ok[~positive])
    np.testing.assert_allclose(d_ok[positive], UP[positive])


def test_celu_quirk_derivative_two_where_non_negative_only():
    y_ok, d_ok = run_op(L.CELU(2.0), X, UP)
    y_q, d_q = run_op(L.CELU(2.0, derivative_two_quirk=True), X, UP)
    np.testing.assert_array_equal(y_q, y_ok)
    at_or_above = X >= 0
    np.testing.assert_array_equal(d_q[at_or_above], 2 * UP[at_or_above])
    np.testing.assert_array_equal(d_q[~at_or_above], d_ok[~at_or_above])
    np.testing.assert_allclose(d_ok[~at_or_above], UP[~at_or_above] * np.exp(X[~at_or_above] / 2.0))


def test_pool_quirk_drops_only_the_averaging_factor():
    rng = np.random.default_rng(1)
    x, up = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 2, 2, 3))
    y_ok, d_ok = run_op(L.AvgPool2(), x, up)
    y_q, d_q = run_op(L.AvgPool2(unscaled_gradient_quirk=True), x, up)
    np.testing.assert_array_equal(y_q, y_ok)
    np.testing.assert_allclose(d_q, 4 * d_ok)
    np.testing.assert_allclose(d_ok[0, 0, 1, 2], up[0, 0, 0, 2] / 4)  # by hand: each of the 4 inputs gets 1/4
    y_ok, d_ok = run_op(L.GlobalMean(), x, up[:, 0, 0, :])
    y_q, d_q = run_op(L.GlobalMean(unscaled_gradient_quirk=True), x, up[:, 0, 0, :])
    np.testing.assert_array_equal(y_q, y_ok)
    np.testing.assert_allclose(d_q, 16 * d_ok)


def test_output_error_quirk_drops_only_the_batch_mean():
    logits = tf.constant([[1.0, 2.0, 0.5], [0.1, -1.0, 0.3]], tf.float64)
    y = tf.one_hot([1, 2], 3, dtype=tf.float64)
    ok, quirk = L.SoftmaxCrossEntropy(), L.SoftmaxCrossEntropy(unscaled_output_error_quirk=True)
    loss_ok, cache_ok = ok.forward(logits, y)
    loss_q, cache_q = quirk.forward(logits, y)
    assert float(loss_ok) == float(loss_q)
    np.testing.assert_allclose(quirk.backward(cache_q), 2 * ok.backward(cache_ok).numpy())
    np.testing.assert_allclose(ok.backward(cache_ok), (tf.nn.softmax(logits) - y).numpy() / 2)


def test_softmax_twice_quirks_change_only_their_logged_cost():
    logits = tf.constant([[1.0, 2.0, 0.5]], tf.float64)
    y = tf.one_hot([1], 3, dtype=tf.float64)
    ok = L.SoftmaxCrossEntropy()
    train_quirk = L.SoftmaxCrossEntropy(softmax_twice_train_quirk=True)
    test_quirk = L.SoftmaxCrossEntropy(softmax_twice_test_quirk=True)
    p = np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum()
    twice = np.exp(p) / np.exp(p).sum()
    right, wrong = -np.log(p[1]), -np.log(twice[1])
    assert float(ok.logged_cost(logits, y, "train")) == pytest.approx(right)
    assert float(train_quirk.logged_cost(logits, y, "train")) == pytest.approx(wrong)
    assert float(train_quirk.logged_cost(logits, y, "test")) == pytest.approx(right)
    assert float(test_quirk.logged_cost(logits, y, "test")) == pytest.approx(wrong)
    assert float(test_quirk.logged_cost(logits, y, "train")) == pytest.approx(right)
    for quirk in (train_quirk, test_quirk):
        np.testing.assert_array_equal(quirk.backward(quirk.forward(logits, y)[1]), ok.backward(ok.forward(logits, y)[1]))


def test_gradient_quirks_are_refused_with_autodiff_and_synthetic_needs_dni():
    with pytest.raises(settings_module.SettingsError, match="elu_derivative_two"):
        settings_module.from_dict({"engine": "autodiff", "quirks": ["elu_derivative_two"]})
    settings_module.from_dict({"engine": "autodiff", "quirks": ["softmax_twice_in_train_cost"]})  # a logging quirk is fine
    with pytest.raises(settings_module.SettingsError, match="dni_rnn"):
        settings_module.from_dict({"schedule": "synthetic", "model": "mlp"})


def one_variable_net(value):
    model = models.Model("one", [models.Unit("u", [L.Dense(1, 2, bias=False)])], L.SoftmaxCrossEntropy(), (1,), 2)
    return Net(model, [{"w": np.array([value])}], dtype=tf.float64)


def adam_steps(quirks, optimizer, grads, lr=0.1, b1=0.9, b2=0.9, eps=1e-8):
    settings = CaseSettings(optimizer=optimizer, beta1=b1, beta2=b2, epsilon=eps, quirks=quirks)
    net = one_variable_net([[0.0, 0.0]])
    opt = optimizers.make_optimizer(settings, net)
    for g in grads:
        opt.apply(0, {"w": tf.constant([g], tf.float64)}, lr)
    return net.variables[0]["w"].numpy().ravel()


def test_adam_bias_correction_quirk_by_hand():
    g1, g2 = np.array([0.5, -1.0]), np.array([0.2, 0.4])
    b1 = b2 = 0.9
    m1, v1 = (1 - b1) * g1, (1 - b2) * g1 ** 2
    m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2 ** 2
    w_ok = -0.1 * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + 1e-8)
    w_ok -= 0.1 * (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - b2 ** 2)) + 1e-8)
    w_q = -0.1 * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + 1e-8)
    w_q -= 0.1 * (m2 / (1 - b1)) / (np.sqrt(v2 / (1 - b2)) + 1e-8)
    np.testing.assert_allclose(adam_steps((), "adam", [g1, g2]), w_ok, rtol=1e-12)
    np.testing.assert_allclose(adam_steps(("adam_constant_bias_correction",), "adam", [g1, g2]), w_q, rtol=1e-12)
    assert not np.allclose(w_ok, w_q)


def test_amsgrad_whole_tensor_max_quirk_by_hand():
    # second gradient: one element grows, the other shrinks more, so sum(v) falls
    g1, g2 = np.array([1.0, 1.0]), np.array([2.0, 0.0])
    b1 = b2 = 0.9
    m1, v1 = 0.1 * g1, 0.1 * g1 ** 2
    m2, v2 = b1 * m1 + 0.1 * g2, b2 * v1 + 0.1 * g2 ** 2  # v2 = [0.49, 0.09]: the first element grows
    # element-wise max with bias correction (bplab's default)
    vh1, vh2 = v1, np.maximum(v1, v2)
    w_ok = -0.1 * (m1 / (1 - b1)) / (np.sqrt(vh1 / (1 - b2)) + 1e-8)
    w_ok -= 0.1 * (m2 / (1 - b1 ** 2)) / (np.sqrt(vh2 / (1 - b2 ** 2)) + 1e-8)
    # the source: v_hat <- v only if sum(v) > sum(v_hat), no bias correction
    vq1 = v1  # sum 0.2 > 0
    vq2 = v2 if v2.sum() > vq1.sum() else vq1
    w_q = -0.1 * m1 / (np.sqrt(vq1) + 1e-8) - 0.1 * m2 / (np.sqrt(vq2) + 1e-8)
    np.testing.assert_allclose(adam_steps((), "amsgrad", [g1, g2]), w_ok, rtol=1e-12)
    np.testing.assert_allclose(adam_steps(("amsgrad_whole_tensor_max",), "amsgrad", [g1, g2]), w_q, rtol=1e-12)


@pytest.mark.timeout(120)
def test_float_images_quirk_changes_only_the_augmented_half():
    """Pixels k/255 augmented through uint8 stay on the k/255 grid (imgaug interpolates in
    uint8); fed as floats (the quirk) an affine warp interpolates between them, off the grid."""
    from workers.augment import augment_batch

    rng = np.random.default_rng(0)
    n = 12
    x = (rng.integers(0, 256, size=(n, 8, 8, 1)) / 255).astype(np.float32)
    y = np.arange(n)
    ok_x, ok_y = augment_batch(x, y, 1, 0, 0)
    q_x, q_y = augment_batch(x, y, 1, 0, 0, float_images_quirk=True)
    np.testing.assert_array_equal(ok_y, q_y)  # same order, same labels
    originals = [i for i in range(2 * n) if any(np.array_equal(ok_x[i], o) for o in x)]
    assert len(originals) >= n
    for i in originals:  # the original half is untouched by the quirk
        np.testing.assert_array_equal(q_x[i], ok_x[i])
    augmented = [i for i in range(2 * n) if i not in originals]

    def off_grid(image):
        return float(np.abs(image * 255 - np.round(image * 255)).max())

    assert all(off_grid(ok_x[i]) < 1e-4 for i in augmented)
    assert any(off_grid(q_x[i]) > 1e-2 for i in augmented), "the quirk did not reach imgaug"
    assert not np.array_equal(q_x, ok_x)


def test_quirks_are_named_documented_and_off_by_default():
    assert CaseSettings().quirks == ()
    assert set(settings_module.QUIRK_DOCS) == set(settings_module.QUIRKS)
    with pytest.raises(settings_module.SettingsError, match="quirks"):
        settings_module.from_dict({"quirks": ["elu_derivative_2"]})


# ---------------------------------------------------------------------- suites end to end

# Every case of every embedded suite runs a step in tests/test_suites_run.py; these two run for
# longer because they have more to show: moons-quick's report draws decision boundaries and
# layer statistics, and dni-quick logs the synthetic-gradient error.


@pytest.mark.slow
@pytest.mark.parametrize("suite", list(QUICK_SUITES))
def test_quick_suite_runs_end_to_end_on_local_ray(suite, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import pandas as pd

    from jobs.suites import load_suite

    run = tmp_path / "run"
    overrides = [arg for value in QUICK_SUITES[suite] for arg in ("--set", value)]
    report = [] if suite == "moons-quick" else ["--no-report"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "jobs", "run", suite, "--out", str(run), "--progress-every", "0",
                           *overrides, *report], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = {case.name for case in load_suite(suite).cases}
    states = {json.loads(p.read_text())["name"]: json.loads(p.read_text())["state"] for p in (run / "ledger").glob("*.json")}
    assert states == {name: "done" for name in expected}
    metrics = pd.read_parquet(run / "metrics")
    assert metrics["case_id"].astype(str).nunique() == len(expected)
    assert not metrics.duplicated(["case_id", "step", "split"]).any()
    aligned = pd.read_parquet(run / "alignment")  # both suites measure alignment
    assert aligned["case_id"].astype(str).nunique() == len(expected)
    assert not aligned.duplicated(["case_id", "step", "unit", "quantity"]).any()
    if suite == "moons-quick":
        assert (run / "report" / "decision_boundaries.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(pd.read_parquet(run / "layer_stats")) > 0
        assert (run / "report" / "alignment_angles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if suite == "dni-quick":
        assert metrics["synthetic_error"].notna().any()
        assert {"sg_cosine", "sg_relative_error", "error_angle"} <= set(aligned["quantity"].astype(str))
