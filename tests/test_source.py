"""The source-reproduction cases match the original scripts: a table of what each script does
checked against every -src case, each source-reproduction quirk changing only what it names
(checked against NumPy or autodiff), and an augmented step of batch_size images."""

import numpy as np
import pytest
import tensorflow as tf

from jobs.suites import load_suite
from workers import models, optimizers, schedules, settings as settings_module
from workers.data import Dataset, _standardize, apply_input_quirks
from workers.engine import Net
from workers.layers import Context
from workers.settings import CaseSettings, DataSpec
from workers.trainer import batch_plan, epoch_order, train, unpack_checkpoint

# ---------------------------------------------------------------------- what each script does

UNFAIR_MANUAL = {"elu_derivative_two", "pool_gradient_unscaled", "output_error_unscaled",
                 "adam_constant_bias_correction", "softmax_twice_in_train_cost", "train_cost_after_last_stage",
                 "softmax_twice_in_test_cost"}
ADVERSARIAL = {"celu_derivative_two", "pool_gradient_unscaled", "output_error_unscaled", "amsgrad_whole_tensor_max",
               "softmax_twice_in_test_cost"}
# -src case -> (script, schedule, augment, engine, quirks), read off the scripts line by line
# (docs/experiments.md quotes the lines).
SCRIPTS = {
    "a-src": ("Unfair/a.py without augmentation", "standard", False, "autodiff", set()),
    "b-src": ("Unfair/a.py", "standard", True, "autodiff", {"float_images_to_imgaug"}),
    "c-src": ("Unfair/d_back.py without augmentation", "unfair-back", False, "manual", UNFAIR_MANUAL),
    "d-src": ("Unfair/d_back.py", "unfair-back", True, "manual", UNFAIR_MANUAL | {"float_images_to_imgaug"}),
    "e-src": ("Unfair/e_front.py without augmentation", "unfair-front", False, "manual", UNFAIR_MANUAL),
    "f-src": ("Unfair/e_front.py", "unfair-front", True, "manual", UNFAIR_MANUAL | {"float_images_to_imgaug"}),
    "adv-a-src": ("AdversarialGrad/a.py", "adversarial", False, "manual", ADVERSARIAL | {"pixels_0_255"}),
    "adv-b-src": ("AdversarialGrad/b.py", "adversarial", False, "manual", ADVERSARIAL | {"test_set_own_statistics"}),
    "adv-c-src": ("AdversarialGrad/c.py", "adversarial+dilated", False, "manual",
                  ADVERSARIAL | {"test_set_own_statistics"}),
}
SOURCE_SUITES = ("unfair-source", "unfair-source-quick", "adversarial-source", "adversarial-source-quick")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suite", SOURCE_SUITES)
def test_every_src_case_does_what_its_script_does(suite):
    cases = {case.name: case.settings for case in load_suite(suite).cases}
    checked = 0
    for name, settings in cases.items():
        base = name.replace("-tf1", "-src")
        if base not in SCRIPTS:
            assert not settings.quirks, f"{suite}:{name} is a correct case with quirks"
            continue
        script, schedule, augment, engine, quirks = SCRIPTS[base]
        expected = quirks | ({"adam_tf1_unordered_reads"} if name.endswith("-tf1") else set())
        assert (settings.schedule, settings.augment, settings.engine) == (schedule, augment, engine), f"{name}: {script}"
        assert set(settings.quirks) == expected, f"{suite}:{name} ({script})"
        correct = cases[base.removesuffix("-src")]
        # the correct twin differs only by the quirks (and a/b's engine)
        assert settings.to_dict() | {"quirks": (), "engine": "manual"} == correct.to_dict(), name
        checked += 1
    assert checked >= 3
    if suite.startswith("unfair"):
        assert "softmax_twice_in_train_cost" not in cases["a-src"].quirks + cases["b-src"].quirks
        assert {f"{c}-tf1" for c in "cdef"} <= set(cases)


# ---------------------------------------------------------------------- a small trainer run

def tiny_data(images=False, n=20, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, 8, 8, 1) if images else (n, 4)
    x = rng.uniform(0, 1, size=shape).astype(np.float64)
    y = (np.arange(n) % 3).astype(np.int64)
    return Dataset("tiny", x, y, x[:6].copy(), y[:6].copy(), num_classes=3, fingerprint="tiny", source="test")


def run_case(settings, data):
    reports = []
    train(settings, data, reports.append, dtype="float64")
    rows = [row for r in reports for row in r.rows]
    params = unpack_checkpoint([r.checkpoint for r in reports if r.checkpoint is not None][-1])[0]
    return rows, params


def mlp_logits(params, x):
    h = np.tanh(x @ params[0]["w"] + params[0]["b"])
    return h @ params[1]["w"] + params[1]["b"]


def cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["unfair-back", "unfair-front"])
def test_train_cost_after_last_stage_changes_only_the_logged_train_cost(schedule):
    data = tiny_data()
    base = dict(model="mlp", hidden=(5,), schedule=schedule, batch_size=5, epochs=1, steps_per_epoch=1, lr=0.05)
    ok_rows, ok_params = run_case(CaseSettings(**base), data)
    q_rows, q_params = run_case(CaseSettings(**base, quirks=("train_cost_after_last_stage",)), data)
    for a, b in zip(ok_params, q_params):  # same training
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    ok_train, q_train = ok_rows[0], q_rows[0]
    assert ok_train["split"] == "train" and ok_train["accuracy"] == q_train["accuracy"]  # first pass's accuracy
    assert [r["cost"] for r in ok_rows[1:]] == [r["cost"] for r in q_rows[1:]]  # test cost unchanged
    batch = epoch_order(678, 0, len(data.x_train))[:5]
    x, labels = data.x_train[batch], data.y_train[batch]
    # the first pass: initial weights; after the last stage every unit is updated: final weights
    first = CaseSettings(**base)
    init = models.build_model(first, (4,), 3).init_params(first.seed, dtype=np.float64)
    assert ok_train["cost"] == pytest.approx(cross_entropy(mlp_logits(init, x), labels), rel=1e-10)
    assert q_train["cost"] == pytest.approx(cross_entropy(mlp_logits(q_params, x), labels), rel=1e-10)
    assert q_train["cost"] != pytest.approx(ok_train["cost"], rel=1e-6)


# ---------------------------------------------------------------------- TF1's unordered reads

def adam_by_hand(w, grads_at, batches, lr, b1=0.9, b2=0.9, eps=1e-8):
    """One step per batch from the moments stored before it (constant bias correction)."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for batch in batches:
        g = grads_at(w, batch)  # at the batch's starting weights
        w = w - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return w


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["unfair-back", "unfair-front"])
def test_tf1_unordered_reads_one_adam_step_per_batch_from_previous_moments(schedule):
    quirks = ("adam_constant_bias_correction", "adam_tf1_unordered_reads")
    settings = settings_module.from_dict({"model": "mlp", "hidden": [5], "schedule": schedule, "quirks": list(quirks)})
    model = models.build_model(settings, (4,), 3)
    init = model.init_params(settings.seed, dtype=np.float64)
    net = Net(model, init, dtype=tf.float64)
    optimizer = optimizers.make_optimizer(settings, net)
    data = tiny_data()
    batches = [np.arange(0, 5), np.arange(5, 10), np.arange(10, 15)]
    lr = 0.05
    step = None
    for index, batch in enumerate(batches):
        step = schedules.Stepper(net, optimizer, Context(training=True), lr, settings)
        schedules.get_schedule(settings)(step, tf.constant(data.x_train[batch]), tf.one_hot(data.y_train[batch], 3, dtype=tf.float64))
        if index == 0:  # zero moments: no weight moves at step 1 (what the TF1 runs showed)
            for unit, start in zip(net.numpy_params(), init):
                for name in unit:
                    np.testing.assert_array_equal(unit[name], start[name])
    assert step.updates == [1, 1] and step.stages == 1

    def grads_at(flat_units, batch):  # autodiff oracle: the standard gradient at the given weights
        variables = [{k: tf.Variable(v) for k, v in unit.items()} for unit in flat_units]
        with tf.GradientTape() as tape:
            h = tf.tanh(data.x_train[batch] @ variables[0]["w"] + variables[0]["b"])
            logits = h @ variables[1]["w"] + variables[1]["b"]
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(tf.one_hot(data.y_train[batch], 3, dtype=tf.float64), logits))
        # output_error_unscaled is off: the gradient of the batch mean
        grads = tape.gradient(loss, variables)
        return [{k: g.numpy() for k, g in unit.items()} for unit in grads]

    # by hand, over all parameters at once
    keys = [(i, k) for i, unit in enumerate(init) for k in unit]
    pack = lambda units: np.concatenate([units[i][k].ravel() for i, k in keys])

    def unpack(flat):
        out, at = [dict() for _ in init], 0
        for i, k in keys:
            size = init[i][k].size
            out[i][k] = flat[at:at + size].reshape(init[i][k].shape)
            at += size
        return out

    expected = adam_by_hand(pack(init), lambda w, b: pack(grads_at(unpack(w), b)), batches, lr)
    np.testing.assert_allclose(pack(net.numpy_params()), expected, rtol=1e-9, atol=1e-14)
    # and it is not the written schedule
    written = Net(model, init, dtype=tf.float64)
    plain = settings_module.from_dict({"model": "mlp", "hidden": [5], "schedule": schedule,
                                       "quirks": ["adam_constant_bias_correction"]})
    opt = optimizers.make_optimizer(plain, written)
    for batch in batches:
        s = schedules.Stepper(written, opt, Context(training=True), lr, plain)
        schedules.get_schedule(plain)(s, tf.constant(data.x_train[batch]), tf.one_hot(data.y_train[batch], 3, dtype=tf.float64))
    assert not np.allclose(pack(written.numpy_params()), expected)


@pytest.mark.timeout(30)
def test_tf1_quirk_needs_adam_and_a_manual_standard_or_unfair_schedule():
    for bad in ({"optimizer": "amsgrad"}, {"schedule": "adversarial"}, {"engine": "autodiff"}):
        with pytest.raises(settings_module.SettingsError, match="adam_tf1_unordered_reads"):
            settings_module.from_dict({**bad, "quirks": ["adam_tf1_unordered_reads"]})


# ---------------------------------------------------------------------- input quirks

@pytest.mark.timeout(30)
def test_pixels_0_255_scales_only_the_inputs():
    x_train = (np.arange(12, dtype=np.float32).reshape(3, 2, 2, 1) / 11).astype(np.float32)
    x_test = np.array([[[[0.5]]]], dtype=np.float32)
    settings = CaseSettings(quirks=("pixels_0_255",))
    a, b = apply_input_quirks(settings, x_train, x_test)
    np.testing.assert_array_equal(a, np.round(x_train.astype(np.float64) * 255))  # e.g. 1/11 -> 23
    assert b[0, 0, 0, 0] == 128.0  # 127.5 rounds half to even... and up here: numpy rounds 127.5 to 128
    same_a, same_b = apply_input_quirks(CaseSettings(), x_train, x_test)
    assert same_a is x_train and same_b is x_test
    with pytest.raises(settings_module.SettingsError, match="pixels_0_255"):
        settings_module.from_dict({"data": {"standardize": "per_pixel"}, "quirks": ["pixels_0_255"]})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["per_pixel", "global"])
def test_test_set_own_statistics_standardises_the_test_set_with_its_own(how):
    rng = np.random.default_rng(1)
    raw_train = rng.uniform(0, 1, size=(50, 3, 3, 2)).astype(np.float32)
    raw_test = (rng.uniform(0, 1, size=(30, 3, 3, 2)) * 3 + 2).astype(np.float32)  # other statistics
    x_train, x_test = _standardize(raw_train, raw_test, how)  # what load_dataset gives
    settings = CaseSettings(data=DataSpec(standardize=how), quirks=("test_set_own_statistics",))
    a, b = apply_input_quirks(settings, x_train, x_test)
    assert a is x_train
    axis = 0 if how == "per_pixel" else None
    own = (raw_test - raw_test.mean(axis=axis, dtype=np.float64)) / raw_test.std(axis=axis, dtype=np.float64)
    np.testing.assert_allclose(b, own, rtol=1e-5, atol=1e-5)
    assert not np.allclose(x_test, own, atol=1e-2)  # the training statistics give another test set
    with pytest.raises(settings_module.SettingsError, match="test_set_own_statistics"):
        settings_module.from_dict({"quirks": ["test_set_own_statistics"]})


# ---------------------------------------------------------------------- augmentation and batch size

@pytest.mark.timeout(300)
def test_an_augmented_step_trains_on_batch_size_images():
    case = CaseSettings(model="allconv9", width=0.05, init="xavier", augment=True, batch_size=10, epochs=1,
                        steps_per_epoch=2, quirks=tuple(UNFAIR_MANUAL), schedule="unfair-back")
    assert batch_plan(CaseSettings(augment=True, batch_size=10), 20) == (10, 4)  # 5 originals a step: 4 steps
    assert batch_plan(CaseSettings(batch_size=10), 20) == (10, 2)
    rows, _ = run_case(case, tiny_data(images=True))
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["examples"] for row in train_rows] == [10, 10]
    with pytest.raises(settings_module.SettingsError, match="batch_size"):
        settings_module.from_dict({"augment": True, "batch_size": 1})
