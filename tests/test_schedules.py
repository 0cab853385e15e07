"""Schedule contracts, checked by running them and against a naive autodiff oracle
(full forward + tf.GradientTape + SGD per stage, no activation reuse)."""

import numpy as np
import pytest
import tensorflow as tf

from workers import models, optimizers, schedules
from workers.engine import Net
from workers.layers import Context
from workers.settings import CaseSettings

pytestmark = pytest.mark.timeout(300)  # per test; a test's own mark wins

LR = 0.05


def setup(schedule="standard", optimizer="sgd", model="allconv9", **extra):
    settings = CaseSettings(model=model, width=0.04, schedule=schedule, optimizer=optimizer, lr=LR, **extra)
    shape = (8, 8, 3) if model == "allconv9" else (32, 32, 1)
    built = models.build_model(settings, shape, 10)
    params = built.init_params(3, dtype=np.float64)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(4, *shape)) + 0.2)
    y = tf.one_hot([1, 4, 7, 9], 10, dtype=tf.float64)
    return settings, built, params, x, y


def run_step(settings, built, params, x, y, engine_schedule=None):
    net = Net(built, params, dtype=tf.float64)
    opt = optimizers.make_optimizer(settings, net)
    seen = []
    original_apply = opt.apply

    def recording_apply(unit, grads, lr):
        seen.append((unit, {k: v.numpy() for k, v in grads.items()}))
        original_apply(unit, grads, lr)

    opt.apply = recording_apply
    step = schedules.Stepper(net, opt, Context(training=True), tf.constant(LR, tf.float64), settings, tf.constant(0.5, tf.float64))
    (engine_schedule or schedules.get_schedule(settings))(step, x, y)
    return net, step, seen


def naive_stages(built, params, x, y, stages):
    """Oracle: for each stage, a full forward from scratch, tape gradients, SGD on the stage's units."""
    net = Net(built, params, dtype=tf.float64)
    for units in stages:
        with tf.GradientTape() as tape:
            loss = net.loss.forward(net.forward(x, Context())[0][-1], y)[0]
        grads = tape.gradient(loss, [net.variables[i] for i in units])
        for i, unit_grads in zip(units, grads):
            for name, grad in unit_grads.items():
                net.variables[i][name].assign_sub(LR * grad)
    return net.numpy_params()


def assert_params_close(a, b, tol=1e-9):
    for unit_a, unit_b in zip(a, b):
        for name in unit_a:
            np.testing.assert_allclose(unit_a[name], unit_b[name], rtol=0, atol=tol * max(1.0, np.abs(unit_b[name]).max()))


def test_standard_updates_each_unit_once():
    settings, built, params, x, y = setup("standard")
    net, step, _ = run_step(settings, built, params, x, y)
    assert step.updates == [1] * 9 and step.forward_passes == 1 and step.stages == 1
    assert_params_close(net.numpy_params(), naive_stages(built, params, x, y, [list(range(9))]))


def test_unfair_back_contract_and_oracle():
    settings, built, params, x, y = setup("unfair-back")
    net, step, seen = run_step(settings, built, params, x, y)
    assert step.updates == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # layer 9 nine times ... layer 1 once
    assert sum(step.updates) == 45
    assert step.forward_passes == 10 and step.stages == 9
    assert step.units_forwarded == 9 + sum(range(1, 10))  # 1 full, 8 partial, 1 full
    oracle = naive_stages(built, params, x, y, [list(range(9 - k, 9)) for k in range(1, 10)])
    assert_params_close(net.numpy_params(), oracle)
    # Stage 1 touches only layer 9, with exactly a standard step's gradient.
    _, _, standard_seen = run_step(CaseSettings(**{**settings.to_dict(), "schedule": "standard", "data": settings.data}), built, params, x, y)
    assert seen[0][0] == 8
    np.testing.assert_array_equal(seen[0][1]["w"], dict(standard_seen)[8]["w"])


def test_unfair_front_contract_and_oracle():
    settings, built, params, x, y = setup("unfair-front")
    net, step, _ = run_step(settings, built, params, x, y)
    assert step.updates == [9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert step.forward_passes == 10 and step.stages == 9 and step.units_forwarded == 90
    oracle = naive_stages(built, params, x, y, [list(range(0, k)) for k in range(1, 10)])
    assert_params_close(net.numpy_params(), oracle)


def test_oracle_can_tell_the_schedules_apart():
    settings, built, params, x, y = setup("unfair-back")
    net, _, _ = run_step(settings, built, params, x, y)
    wrong = naive_stages(built, params, x, y, [list(range(0, k)) for k in range(1, 10)])
    with pytest.raises(AssertionError):
        assert_params_close(net.numpy_params(), wrong)


def test_autodiff_engine_agrees_with_manual_adam():
    settings, built, params, x, y = setup("standard", optimizer="adam")
    manual, _, _ = run_step(settings, built, params, x, y)
    tape, step, _ = run_step(settings, built, params, x, y, engine_schedule=schedules.autodiff_standard)
    assert step.updates == [1] * 9
    assert_params_close(manual.numpy_params(), tape.numpy_params(), tol=1e-10)


def test_adversarial_input_gradient_matches_autodiff():
    settings, built, params, x, y = setup("adversarial", model="celu7", adversarial_epsilon=0.1)
    net = Net(built, params, dtype=tf.float64)
    acts, caches = net.forward(x, Context())
    _, d_out = net.loss_and_gradient(acts[-1], y)
    _, d_inputs = net.backward(d_out, caches, want_grads=set(), need_input_grad=True)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = net.loss.forward(net.forward(x, Context())[0][-1], y)[0]
    reference = tape.gradient(loss, x)
    np.testing.assert_allclose(d_inputs[0], reference, rtol=1e-9, atol=1e-12 * np.abs(reference).max())
    # and the adversarial step updates from the perturbed input only
    stepped, step, _ = run_step(settings, built, params, x, y)
    x_adv = x + 0.1 * tf.sign(reference)
    oracle = naive_stages(built, params, x_adv, y, [list(range(7))])
    assert step.forward_passes == 2 and step.updates == [1] * 7
    assert_params_close(stepped.numpy_params(), oracle)


@pytest.mark.timeout(120)
def test_adam_counts_steps_per_unit_under_unfair_back_by_hand():
    """unfair-back on a two-unit mlp with Adam: stage 1 updates the top unit (its t = 1), stage 2
    both units (top t = 2, bottom t = 1). Worked out in NumPy from tape gradients; counting t
    per stage instead (bottom t = 2) gives other weights."""
    b1, b2, eps = 0.9, 0.9, 1e-8
    settings = CaseSettings(model="mlp", hidden=(5,), schedule="unfair-back", optimizer="adam", lr=LR,
                            beta1=b1, beta2=b2, epsilon=eps)
    built = models.build_model(settings, (4,), 3)
    rng = np.random.default_rng(2)
    params = [{k: v + 0.1 * rng.standard_normal(v.shape) for k, v in unit.items()}
              for unit in built.init_params(3, dtype=np.float64)]
    x = tf.constant(rng.normal(size=(6, 4)))
    y = tf.one_hot([0, 1, 2, 0, 1, 2], 3, dtype=tf.float64)
    net, step, _ = run_step(settings, built, params, x, y)
    assert step.updates == [1, 2] and step.stages == 2

    def tape_grads(values, units):
        oracle = Net(built, values, dtype=tf.float64)
        with tf.GradientTape() as tape:
            loss = oracle.loss.forward(oracle.forward(x, Context())[0][-1], y)[0]
        grads = tape.gradient(loss, [oracle.variables[i] for i in units])
        return {i: {k: g.numpy() for k, g in unit.items()} for i, unit in zip(units, grads)}

    def by_hand(bottom_t):
        values = [dict(unit) for unit in params]
        m = [{k: np.zeros_like(v) for k, v in unit.items()} for unit in params]
        v = [{k: np.zeros_like(w) for k, w in unit.items()} for unit in params]
        for units, ts in (([1], {1: 1}), ([0, 1], {0: bottom_t, 1: 2})):
            grads = tape_grads(values, units)
            for i in units:
                for name, g in grads[i].items():
                    m[i][name] = b1 * m[i][name] + (1 - b1) * g
                    v[i][name] = b2 * v[i][name] + (1 - b2) * g * g
                    t = ts[i]
                    values[i][name] = values[i][name] - LR * (m[i][name] / (1 - b1 ** t)) / (
                        np.sqrt(v[i][name] / (1 - b2 ** t)) + eps)
        return values

    assert_params_close(net.numpy_params(), by_hand(bottom_t=1), tol=1e-10)
    with pytest.raises(AssertionError):
        assert_params_close(net.numpy_params(), by_hand(bottom_t=2), tol=1e-10)
