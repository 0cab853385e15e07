"""Learning rules (workers/rules/): exact oracles in float64 without training, one step of each
rule against a NumPy transcription of its paper's equations on a small MLP and a small conv
net, and the rules' state in the engine (seeded, checkpointed, refused where it cannot run).

Oracles: tf.GradientTape (back propagation), NumPy written here from the equations of
docs/learning-rules.md; never the rule's own code."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import train_case
from workers import layers as L
from workers import models, optimizers, registry, rules, schedules
from workers.engine import Net
from workers.layers import Context
from workers.settings import CaseSettings, SettingsError, from_dict

pytestmark = pytest.mark.timeout(120)

LR, DECAY = 0.05, 0.1
RULE_CASES = [("feedback-alignment", {}), ("direct-feedback", {}), ("sign-symmetry", {}),
              ("sign-symmetry", {"sign_feedback": "frsf"}), ("sign-symmetry", {"sign_feedback": "brsf"}),
              ("kolen-pollack", {"weight_decay": DECAY})]


# ---------------------------------------------------------------------- small nets


def small_mlp(settings) -> models.Model:
    """x (B, 6) -> dense 5 tanh -> dense 4 tanh -> dense 3 -> softmax cross-entropy."""
    units = [models.Unit("l1", [L.Dense(6, 5), L.Tanh()]), models.Unit("l2", [L.Dense(5, 4), L.Tanh()]),
             models.Unit("l3", [L.Dense(4, 3)])]
    return models.Model("mlp", units, L.SoftmaxCrossEntropy(), (6,), 3)


def small_conv(settings) -> models.Model:
    """x (B, 5, 5, 2) -> conv 3x3 SAME 3 channels tanh -> flatten -> dense 3 -> softmax cross-entropy."""
    units = [models.Unit("c1", [L.Conv2D(3, 2, 3), L.Tanh()]), models.Unit("out", [L.Flatten(), L.Dense(75, 3)])]
    return models.Model("conv", units, L.SoftmaxCrossEntropy(), (5, 5, 2), 3)


def random_params(model, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for unit in model.units:
        out.append({name: rng.normal(size=shape) * 0.5 for name, shape in unit.param_shapes().items()})
    return out


def batch(model, seed=1, size=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, *model.input_shape))
    labels = rng.integers(0, model.num_classes, size=size)
    return x, np.eye(model.num_classes)[labels]


def rule_step(schedule, extra, build, params=None, state=None, seed=3):
    """One step of `schedule` with SGD at LR in float64: (params before, state before, x, y,
    params after, state after)."""
    settings = CaseSettings(model="mlp", schedule=schedule, optimizer="sgd", lr=LR, **extra)
    model = build(settings)
    params = params or random_params(model)
    state = state or rules.initial_state(settings, model, params, seed, np.float64)
    net = Net(model, params, dtype=tf.float64, rule_state=state)
    optimizer = optimizers.make_optimizer(settings, net)
    x, y = batch(model)
    ctx = Context(training=True, seed=tf.constant([seed, 11], tf.int64))
    stepper = schedules.Stepper(net, optimizer, ctx, tf.constant(LR, tf.float64), settings)
    schedules.get_schedule(settings)(stepper, tf.constant(x), tf.constant(y))
    return params, net.numpy_rule_state(), state, x, y, net.numpy_params(), settings, net


# ---------------------------------------------------------------------- NumPy transcriptions


def softmax_error(z, y):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return (p - y) / len(y)  # e = d loss / d z of the batch-mean cross-entropy


def conv_same(x, w):
    """y[b,i,j,o] = sum_{di,dj,c} x_pad[b,i+di,j+dj,c] w[di,dj,c,o] (stride 1, SAME)."""
    k = w.shape[0]
    pad = (k - 1) // 2
    xp = np.pad(x, [(0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)])
    out = np.zeros((*x.shape[:3], w.shape[3]))
    for di in range(k):
        for dj in range(k):
            out += np.einsum("bijc,co->bijo", xp[:, di:di + x.shape[1], dj:dj + x.shape[2]], w[di, dj])
    return out


def conv_same_filter_grad(x, d_y, k):
    pad = (k - 1) // 2
    xp = np.pad(x, [(0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)])
    grad = np.zeros((k, k, x.shape[3], d_y.shape[3]))
    for di in range(k):
        for dj in range(k):
            grad[di, dj] = np.einsum("bijc,bijo->co", xp[:, di:di + x.shape[1], dj:dj + x.shape[2]], d_y)
    return grad


def conv_same_input_grad(d_y, carrier, x_shape):
    """d_x of a SAME stride-1 conv computed with the kernel `carrier` (W, or B)."""
    k = carrier.shape[0]
    pad = (k - 1) // 2
    padded = np.zeros((x_shape[0], x_shape[1] + k - 1, x_shape[2] + k - 1, x_shape[3]))
    for di in range(k):
        for dj in range(k):
            padded[:, di:di + x_shape[1], dj:dj + x_shape[2]] += np.einsum("bijo,co->bijc", d_y, carrier[di, dj])
    return padded[:, pad:pad + x_shape[1], pad:pad + x_shape[2]]


def usf(w):
    receptive = int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1
    return np.sqrt(2.0 / (w.shape[-2] * receptive + w.shape[-1] * receptive)) * np.sign(w)


def numpy_mlp_step(schedule, extra, params, state, x, y):
    """(params after, feedback after) of one SGD step, from the papers' equations."""
    w = [p["w"] for p in params]
    b = [p["b"] for p in params]
    h1 = np.tanh(x @ w[0] + b[0])
    h2 = np.tanh(h1 @ w[1] + b[1])
    e = softmax_error(h2 @ w[2] + b[2], y)
    if schedule == "direct-feedback":  # Nokland: delta_i = (e B_i) * f'(a_i); the top gets e
        d2 = (e @ state[1]["direct"]) * (1 - h2 ** 2)
        d1 = (e @ state[0]["direct"]) * (1 - h1 ** 2)
    else:
        if schedule == "sign-symmetry":  # B = s sign(W) (usf), |M| sign(W) (frsf), from W before the step
            kind = extra.get("sign_feedback", "usf")
            if kind == "usf":
                fb = [usf(wi) for wi in w]
            elif kind == "frsf":
                fb = [state[i]["w_magnitude"] * np.sign(w[i]) for i in range(3)]
            else:
                fb = None  # brsf: checked separately (the draw is TensorFlow's)
        else:
            fb = [s["w"] for s in state]  # FA, KP: B as it was before the step
        d2 = (e @ fb[2].T) * (1 - h2 ** 2)  # Lillicrap: delta_l = (delta_{l+1} B^T) * f'
        d1 = (d2 @ fb[1].T) * (1 - h1 ** 2)
    deltas, inputs = [d1, d2, e], [x, h1, h2]
    grads = [(inputs[i].T @ deltas[i], deltas[i].sum(axis=0)) for i in range(3)]
    decay = extra.get("weight_decay", 0.0)
    after = [{"w": w[i] - LR * (grads[i][0] + decay * w[i]), "b": b[i] - LR * grads[i][1]} for i in range(3)]
    feedback = None
    if schedule == "kolen-pollack":  # Akrout: B <- B - lr (x^T delta) - lr wd B
        feedback = [{"w": state[i]["w"] - LR * (grads[i][0] + decay * state[i]["w"])} for i in range(3)]
    return after, feedback


def numpy_conv_step(schedule, extra, params, state, x, y):
    w0, w1, b1 = params[0]["w"], params[1]["w"], params[1]["b"]
    h = np.tanh(conv_same(x, w0))  # (B, 5, 5, 3)
    flat = h.reshape(len(x), -1)
    e = softmax_error(flat @ w1 + b1, y)
    if schedule == "direct-feedback":
        d_h = (e @ state[0]["direct"]).reshape(h.shape)
    else:
        if schedule == "sign-symmetry":
            kind = extra.get("sign_feedback", "usf")
            fb1 = usf(w1) if kind == "usf" else state[1]["w_magnitude"] * np.sign(w1)
        else:
            fb1 = state[1]["w"]
        d_h = (e @ fb1.T).reshape(h.shape)
    d_a = d_h * (1 - h ** 2)
    grad0 = conv_same_filter_grad(x, d_a, w0.shape[0])
    grad1 = flat.T @ e
    decay = extra.get("weight_decay", 0.0)
    after = [{"w": w0 - LR * (grad0 + decay * w0)}, {"w": w1 - LR * (grad1 + decay * w1), "b": b1 - LR * e.sum(axis=0)}]
    feedback = None
    if schedule == "kolen-pollack":
        feedback = [{"w": state[0]["w"] - LR * (grad0 + decay * state[0]["w"])},
                    {"w": state[1]["w"] - LR * (grad1 + decay * state[1]["w"])}]
    return after, feedback


def assert_close(actual: list[dict], expected: list[dict], tol=1e-12):
    for index, (unit_a, unit_e) in enumerate(zip(actual, expected)):
        for name in unit_e:
            np.testing.assert_allclose(unit_a[name], unit_e[name], rtol=tol, atol=tol, err_msg=f"unit {index} {name}")


# ---------------------------------------------------------------------- exact oracles


def tape_gradients(net, x, y):
    with tf.GradientTape() as tape:
        loss = net.loss.forward(net.predict(tf.constant(x), Context(training=True)), tf.constant(y))[0]
    return [{k: g.numpy() for k, g in unit.items()} for unit in tape.gradient(loss, net.variables)]


@pytest.mark.parametrize("build", [small_mlp, small_conv], ids=["mlp", "conv"])
def test_the_numpy_transcriptions_with_B_set_to_W_are_back_propagation(build):
    """The oracles themselves, against tf.GradientTape: with B = W their step is SGD on the true gradient."""
    model = build(None)
    params = random_params(model)
    x, y = batch(model)
    oracle = numpy_mlp_step if build is small_mlp else numpy_conv_step
    expected, _ = oracle("feedback-alignment", {}, params, [{"w": p["w"]} for p in params], x, y)
    grads = tape_gradients(Net(model, params, dtype=tf.float64), x, y)
    assert_close(expected, [{n: p[n] - LR * grads[i][n] for n in p} for i, p in enumerate(params)])


def test_the_numpy_conv_input_gradient_is_tensorflows():
    rng = np.random.default_rng(4)
    x, kernel, d_y = rng.normal(size=(2, 5, 5, 2)), rng.normal(size=(3, 3, 2, 3)), rng.normal(size=(2, 5, 5, 3))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = tf.reduce_sum(tf.nn.conv2d(xt, tf.constant(kernel), 1, "SAME") * d_y)
    np.testing.assert_allclose(conv_same_input_grad(d_y, kernel, x.shape), tape.gradient(out, xt).numpy(), rtol=1e-12)
    np.testing.assert_allclose(conv_same(x, kernel), tf.nn.conv2d(x, kernel, 1, "SAME").numpy(), rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "dcn", "allconv9"])
def test_feedback_alignment_with_B_set_to_W_is_back_propagation(name):
    """Every gradient within 1e-12 of tf.GradientTape's, on the models the rules run on."""
    from workers.gradcheck import CHECK_CONFIGS

    config, shape, classes = CHECK_CONFIGS[name]
    settings = CaseSettings(model=name, schedule="feedback-alignment", **{**config, "dropout": 0.0})
    model = models.build_model(settings, shape, classes)
    rng = np.random.default_rng(0)
    params = [{k: v + 0.1 * rng.standard_normal(v.shape) for k, v in unit.items()}
              for unit in model.init_params(0, dtype=np.float64)]
    state = [{"w": unit["w"]} for unit in params]
    net = Net(model, params, dtype=tf.float64, rule_state=state)
    assert all(set(fb) == {"w"} for fb in net.feedback)
    x = rng.normal(size=(3, *shape))
    y = np.eye(classes)[rng.integers(0, classes, 3)]
    acts, caches = net.forward(tf.constant(x), Context(training=True))
    _, d_out = net.loss_and_gradient(acts[-1], tf.constant(y))
    grads, _ = net.backward(d_out, caches, use_feedback=True)
    expected = tape_gradients(net, x, y)
    for index, unit in enumerate(expected):
        for param, value in unit.items():
            scale = max(np.abs(value).max(), 1e-300)
            assert np.abs(grads[index][param].numpy() - value).max() / scale <= 1e-12, (name, index, param)
    # and the feedback is really used: another B gives other gradients below the top, and
    # without use_feedback the backward is back propagation whatever B is
    net.rule_state[-1]["w"].assign(net.rule_state[-1]["w"] * 2.0)
    grads, _ = net.backward(d_out, caches, use_feedback=True)
    assert not np.allclose(grads[0]["w"].numpy(), expected[0]["w"])
    np.testing.assert_allclose(grads[net.depth - 1]["w"].numpy(), expected[-1]["w"], rtol=1e-12)
    grads, _ = net.backward(d_out, caches)
    np.testing.assert_allclose(grads[0]["w"].numpy(), expected[0]["w"], rtol=1e-12)


def test_direct_feedback_with_B_set_to_the_transposed_output_weights_is_back_propagation():
    settings = CaseSettings(model="mlp", hidden=(7,), schedule="direct-feedback", activation="tanh")
    model = models.build_model(settings, (4, 4, 1), 3)
    params = random_params(model)
    assert set(rules.initial_state(settings, model, params, 0, np.float64)[0]) == {"direct"}
    state = [{"direct": params[1]["w"].T.copy()}, {}]  # (classes, hidden) = W2^T
    net = Net(model, params, dtype=tf.float64, rule_state=state)
    assert net.feedback == [{}, {}]  # DFA's matrices replace no forward weight
    x, y = batch(model)
    acts, caches = net.forward(tf.constant(x), Context(training=True))
    _, d_out = net.loss_and_gradient(acts[-1], tf.constant(y))
    direct = rules.RULES["direct-feedback"].direct(SimpleNamespace(net=net), d_out, acts)
    grads, d_inputs = net.backward(d_out, caches, direct=direct)
    assert d_inputs == {}  # no unit hands a gradient down under DFA
    expected = tape_gradients(net, x, y)
    for index, unit in enumerate(expected):
        for param, value in unit.items():
            np.testing.assert_allclose(grads[index][param].numpy(), value, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- one step against the papers


@pytest.mark.parametrize("schedule,extra", [c for c in RULE_CASES if c[1].get("sign_feedback") != "brsf"],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
@pytest.mark.parametrize("build", [small_mlp, small_conv], ids=["mlp", "conv"])
def test_one_step_equals_the_papers_equations(schedule, extra, build):
    params, state_after, state, x, y, after, settings, _ = rule_step(schedule, extra, build)
    oracle = numpy_mlp_step if build is small_mlp else numpy_conv_step
    expected, feedback = oracle(schedule, extra, params, state, x, y)
    assert_close(after, expected)
    if feedback is not None:
        assert_close(state_after, feedback)
    elif schedule == "sign-symmetry":  # the next step's B: s sign(W) (or |M| sign(W)) of the weights this step left
        for unit, p in zip(state_after, after):
            if "w" in unit:
                carrier = usf(p["w"]) if extra.get("sign_feedback", "usf") == "usf" else unit["w_magnitude"] * np.sign(p["w"])
                np.testing.assert_array_equal(unit["w"], carrier)
    else:  # fixed: FA and DFA never change their feedback
        assert_close(state_after, state, tol=0)


def test_brsf_redraws_every_step_from_the_step_seed():
    """|R| sign(W), R uniform within the Xavier limit, a new R after every step, the same for the same step seed."""
    _, first, start, _, _, after, _, _ = rule_step("sign-symmetry", {"sign_feedback": "brsf"}, small_mlp, seed=3)
    _, again, _, _, _, _, _, _ = rule_step("sign-symmetry", {"sign_feedback": "brsf"}, small_mlp, seed=3)
    _, other, _, _, _, _, _, _ = rule_step("sign-symmetry", {"sign_feedback": "brsf"}, small_mlp, seed=4)
    for unit, same, different, begun, p in zip(first, again, other, start, after):
        np.testing.assert_array_equal(unit["w"], same["w"])
        assert not np.array_equal(unit["w"], different["w"])
        assert not np.array_equal(np.abs(unit["w"]), np.abs(begun["w"]))  # redrawn, not the starting magnitudes
        np.testing.assert_array_equal(np.sign(unit["w"]), np.sign(p["w"]))
        limit = np.sqrt(6.0 / sum(p["w"].shape))
        assert np.abs(unit["w"]).max() <= limit and np.abs(unit["w"]).min() > 0


def test_kolen_pollack_with_adam_shrinks_B_minus_W_by_one_minus_lr_decay():
    settings_extra = {"weight_decay": DECAY}
    settings = CaseSettings(model="mlp", schedule="kolen-pollack", optimizer="adam", lr=LR, **settings_extra)
    model = small_mlp(settings)
    params = random_params(model)
    state = rules.initial_state(settings, model, params, 3, np.float64)
    net = Net(model, params, dtype=tf.float64, rule_state=state)
    stepper = schedules.Stepper(net, optimizers.make_optimizer(settings, net), Context(), tf.constant(LR, tf.float64), settings)
    x, y = batch(model)
    schedules.get_schedule(settings)(stepper, tf.constant(x), tf.constant(y))
    for before_w, before_b, after_w, after_b in zip(params, state, net.numpy_params(), net.numpy_rule_state()):
        np.testing.assert_allclose(after_b["w"] - after_w["w"], (1 - LR * DECAY) * (before_b["w"] - before_w["w"]),
                                   rtol=1e-10, atol=1e-14)


def test_kolen_pollack_started_from_B_equal_W_stays_there():
    settings = CaseSettings(model="mlp", schedule="kolen-pollack", optimizer="momentum", lr=LR, weight_decay=DECAY)
    model = small_conv(settings)
    params = random_params(model)
    net = Net(model, params, dtype=tf.float64, rule_state=[{"w": p["w"]} for p in params])
    stepper_optimizer = optimizers.make_optimizer(settings, net)
    for step in range(3):
        stepper = schedules.Stepper(net, stepper_optimizer, Context(), tf.constant(LR, tf.float64), settings)
        x, y = batch(model, seed=step)
        schedules.get_schedule(settings)(stepper, tf.constant(x), tf.constant(y))
    for unit, state in zip(net.numpy_params(), net.numpy_rule_state()):
        np.testing.assert_allclose(state["w"], unit["w"], rtol=0, atol=1e-15)


# ---------------------------------------------------------------------- the rules as state of the case


def test_rule_state_is_a_function_of_the_seed_and_of_W_shape():
    for schedule, extra in RULE_CASES:
        settings = CaseSettings(model="mlp", hidden=(9, 5), schedule=schedule, **extra)
        model = models.build_model(settings, (8, 8, 1), 10)
        params = model.init_params(1)
        first = rules.initial_state(settings, model, params, 1)
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, rules.initial_state(settings, model, params, 1)) for k in a)
        other = rules.initial_state(settings, model, params, 2)
        if schedule != "sign-symmetry" or extra:  # uSF depends on W only
            assert any(not np.array_equal(a[k], b[k]) for a, b in zip(first, other) for k in a), schedule
        for unit, p, out in zip(first, params, model.output_shapes()):
            if "w" in unit:
                assert unit["w"].shape == p["w"].shape
            if "direct" in unit:
                assert unit["direct"].shape == (10, int(np.prod(out)))


def test_feedback_init_draws_xavier_or_normal_fan_sum():
    rng = np.random.default_rng(0)
    shape = (300, 200)
    xavier = models.draw_weights(rng, "xavier", shape)
    assert np.abs(xavier).max() <= np.sqrt(6 / 500) and np.isclose(xavier.std(), np.sqrt(2 / 500), rtol=0.02)
    normal = models.draw_weights(rng, "normal_fan_sum", shape)
    assert np.isclose(normal.std(), np.sqrt(1 / 500), rtol=0.02) and np.abs(normal).max() > np.sqrt(6 / 500)
    kernel = models.draw_weights(rng, "normal_fan_sum", (5, 5, 16, 32))
    assert np.isclose(kernel.std(), np.sqrt(1 / (25 * 48)), rtol=0.02)


def test_every_rule_is_a_schedule_and_a_module():
    assert tuple(rules.RULES) == registry.RULES
    for name, rule in rules.RULES.items():
        assert name in registry.SCHEDULES and schedules.SCHEDULES[name].__doc__.startswith(name)
        assert rule.summary and callable(rule.make_state)


def test_rules_are_refused_where_they_cannot_run_and_sign_feedback_only_for_sign_symmetry():
    from jobs import plan

    for name in registry.RULES:
        settings = CaseSettings(model="dni_rnn", hidden=(3,), schedule=name)
        with pytest.raises(SettingsError, match=f"schedule {name}: dni_rnn's unit t1 .* has no feedback hook"):
            plan.check_schedule_fits(settings, models.build_model(settings, (8, 8, 1), 2))
        for model in ("mlp", "dcn", "allconv9", "celu7"):
            settings = CaseSettings(model=model, schedule=name, width=0.05)
            plan.check_schedule_fits(settings, models.build_model(settings, (32, 32, 1), 10))
    with pytest.raises(SettingsError, match="^case.sign_feedback: only the sign-symmetry schedule reads it"):
        from_dict({"schedule": "feedback-alignment", "sign_feedback": "frsf"})
    with pytest.raises(SettingsError, match="^case.engine: autodiff runs the standard schedule only"):
        from_dict({"schedule": "kolen-pollack", "engine": "autodiff"})


def test_new_settings_leave_ids_of_cases_without_them_unchanged():
    plain = from_dict({"model": "mlp"})
    assert "feedback_init" not in plain.changed() and "sign_feedback" not in plain.changed()
    changed = from_dict({"model": "mlp", "schedule": "sign-symmetry", "sign_feedback": "frsf", "feedback_init": "normal_fan_sum"})
    assert changed.changed()["sign_feedback"] == "frsf" and changed.changed()["feedback_init"] == "normal_fan_sum"
    assert changed.digest() != from_dict({"model": "mlp", "schedule": "sign-symmetry"}).digest()
    assert from_dict(changed.to_dict()) == changed


# ---------------------------------------------------------------------- in the trainer


def train_reports(values: dict, **kwargs):
    """tests.helpers.train_case of the settings `values`."""
    return train_case(from_dict(values), **kwargs)


def last_state(reports):
    from workers.trainer import unpack_checkpoint

    return unpack_checkpoint([r.checkpoint for r in reports if r.checkpoint is not None][-1])


def train_rows(reports):
    return [{k: v for k, v in row.items() if k not in ("wall_time", "examples_per_sec")} for r in reports for row in r.rows]


SMALL = {"model": "mlp", "hidden": [12], "data": {"name": "digits", "train_size": 200, "test_size": 60},
         "optimizer": "adam", "lr": 0.01, "batch_size": 10, "epochs": 2, "seed": 5}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("values", [
    {"schedule": "feedback-alignment"}, {"schedule": "direct-feedback"}, {"schedule": "sign-symmetry"},
    {"schedule": "sign-symmetry", "sign_feedback": "frsf"}, {"schedule": "sign-symmetry", "sign_feedback": "brsf"},
    {"schedule": "kolen-pollack", "weight_decay": 0.01},
    pytest.param({"schedule": "kolen-pollack", "model": "dcn", "width": 0.1, "dropout": 0.5, "weight_decay": 0.01},
                 marks=pytest.mark.slow),
    pytest.param({"schedule": "direct-feedback", "model": "allconv9", "width": 0.05, "init": "xavier", "epochs": 1},
                 marks=pytest.mark.slow),
], ids=["fa", "dfa", "usf", "frsf", "brsf", "kp", "kp-dcn", "dfa-allconv9"])
def test_a_rule_resumed_from_a_checkpoint_is_bit_identical(values):
    """Stopped after its second commit and resumed with another chunking: the same rows and the
    same final weights, optimiser state and rule state as the uninterrupted run."""
    values = {**SMALL, **values}
    whole = train_reports(values, checkpoint_every_steps=7)
    part = train_reports(values, checkpoint_every_steps=7, stop_after_checkpoints=2)
    rest = train_reports(values, resume=[r.checkpoint for r in part if r.checkpoint is not None][-1],
                         checkpoint_every_steps=5, max_chunk=3)
    assert train_rows(part) + train_rows(rest) == train_rows(whole)
    params, optimizer_state, meta, rule_state = last_state(whole)
    params_r, optimizer_r, meta_r, rule_r = last_state(rest)
    assert meta == meta_r and optimizer_state.keys() == optimizer_r.keys()
    assert any(unit for unit in rule_state), "a rule with no state"
    for unit, unit_r in zip(params + rule_state, params_r + rule_r):
        assert unit.keys() == unit_r.keys()
        for name in unit:
            np.testing.assert_array_equal(unit[name], unit_r[name])
    for key in optimizer_state:
        np.testing.assert_array_equal(optimizer_state[key], optimizer_r[key])


@pytest.mark.timeout(300)
def test_rule_state_is_seeded_checkpointed_and_in_the_weight_and_layer_statistics():
    from workers.trainer import unpack_checkpoint

    values = {**SMALL, "schedule": "direct-feedback", "hidden": [12, 8], "layer_stats_every": 20, "epochs": 1}
    reports = train_reports(values)
    case = from_dict(values)
    model = models.build_model(case, (8, 8), 10)
    start = rules.initial_state(case, model, model.init_params(case.seed), case.seed)
    histograms = [row for r in reports for row in r.histograms]
    for phase in ("before", "after"):
        shown = {(row["layer"], row["param"]) for row in histograms if row["phase"] == phase}
        assert {("l1", "feedback_direct"), ("l2", "feedback_direct")} <= shown and ("l3", "feedback_direct") not in shown
    before = [row for row in histograms if row["phase"] == "before" and row["layer"] == "l1" and row["param"] == "feedback_direct"]
    assert [row["count"] for row in before] == np.histogram(start[0]["direct"].astype(np.float64), bins=30)[0].tolist()
    stats = {(row["layer"], row["quantity"]) for r in reports for row in r.layer_stats}
    assert ("l1", "feedback_direct") in stats and ("l3", "feedback_direct") not in stats
    _, _, _, final = unpack_checkpoint([r.checkpoint for r in reports if r.checkpoint is not None][-1])
    np.testing.assert_array_equal(final[0]["direct"], start[0]["direct"])  # DFA's matrices are fixed
    assert final[2] == {}
    fa = train_reports({**values, "schedule": "feedback-alignment"})
    assert {("l1", "feedback"), ("l3", "feedback")} <= {(row["layer"], row["quantity"]) for r in fa for row in r.layer_stats}


def suite_case(name: str) -> dict:
    from jobs import suites

    case = {c.name: c for c in suites.load_suite("feedback-quick").cases}[name]
    return case.settings.model_dump(mode="python")


def angle(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.degrees(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kolen_pollack_feedback_weights_align_with_W_within_the_quick_suite():
    """feedback-quick's kp case: the angle between B and W falls from about 90 degrees to below 5 in every unit."""
    values = suite_case("kp")
    case = from_dict(values)
    model = models.build_model(case, (8, 8), 10)
    params = model.init_params(case.seed)
    start = rules.initial_state(case, model, params, case.seed)
    assert all(angle(p["w"], s["w"]) > 80 for p, s in zip(params, start))
    final_params, _, _, final_state = last_state(train_reports(values))
    angles = [angle(p["w"], s["w"]) for p, s in zip(final_params, final_state)]
    assert max(angles) < 5, angles


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_feedback_alignment_error_signal_aligns_within_the_quick_suite():
    """feedback-quick's fa case: the angle between the error the hidden unit receives (e B^T) and
    back propagation's (e W^T), over the training set in NumPy, starts near 90 degrees and ends
    below 90 (Lillicrap et al.'s alignment); it does not move without training."""
    from workers.data import load_dataset

    values = suite_case("fa")
    case = from_dict(values)
    data = load_dataset(case.data)
    x = data.x_train.reshape(len(data.x_train), -1).astype(np.float64)
    y = np.eye(10)[data.y_train]

    def error_angle(params, state):
        h = np.tanh(x @ params[0]["w"] + params[0]["b"])
        e = softmax_error(h @ params[1]["w"] + params[1]["b"], y)
        return angle(e @ state[1]["w"].T, e @ params[1]["w"].T)

    model = models.build_model(case, data.x_train.shape[1:], 10)
    params = model.init_params(case.seed, np.float64)
    start = error_angle(params, rules.initial_state(case, model, params, case.seed, np.float64))
    final_params, _, _, final_state = last_state(train_reports(values))
    end = error_angle(final_params, final_state)
    assert start > 80 and end < 60, (start, end)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_alignment_measurement_of_feedback_alignment_agrees_with_numpy_and_falls_below_90():
    """feedback-quick's fa case measures alignment every 22 steps (workers.alignment): the
    hidden unit's error angle starts near 90 degrees and ends below 60, and at the last
    measured step it is the angle NumPy computes here from that step's checkpointed weights,
    feedback weights and batch (e B^T against e W^T)."""
    from workers.data import load_dataset
    from workers.trainer import batch_plan, epoch_order, unpack_checkpoint

    values = suite_case("fa")
    case = from_dict(values)
    assert case.alignment_every == 22
    reports = train_reports(values, checkpoint_every_steps=22)
    rows = sorted((row for r in reports for row in r.alignment if row["quantity"] == "error_angle" and row["unit"] == 0),
                  key=lambda row: row["step"])
    assert rows[0]["step"] == 0 and rows[0]["value"] > 80 and rows[-1]["value"] < 60, (rows[0], rows[-1])
    last = rows[-1]["step"]
    checkpoints = {unpack_checkpoint(r.checkpoint)[2]["position"]["global_step"]: r.checkpoint
                   for r in reports if r.checkpoint is not None}
    params, _, _, state = unpack_checkpoint(checkpoints[last])  # the weights measured step `last` started from
    data = load_dataset(case.data)
    batch, steps_per_epoch = batch_plan(case, len(data.x_train))
    epoch, in_epoch = divmod(last, steps_per_epoch)
    index = epoch_order(case.seed, epoch, len(data.x_train))[in_epoch * batch:(in_epoch + 1) * batch]
    x = data.x_train[index].reshape(batch, -1).astype(np.float32).astype(np.float64)
    y = np.eye(10)[data.y_train[index]]
    w = [{k: v.astype(np.float64) for k, v in unit.items()} for unit in params]
    h = np.tanh(x @ w[0]["w"] + w[0]["b"])
    e = softmax_error(h @ w[1]["w"] + w[1]["b"], y)
    expected = angle(e @ state[1]["w"].astype(np.float64).T, e @ w[1]["w"].T)
    assert abs(rows[-1]["value"] - expected) < 1e-3, (rows[-1]["value"], expected)

