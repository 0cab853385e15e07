"""The hand-written optimisers, weight decay and learning-rate schedules against values
computed by hand in NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from workers import layers as L, models, optimizers
from workers.engine import Net
from workers.settings import CaseSettings


def dense_net(w, b):
    model = models.Model("one", [models.Unit("u", [L.Dense(2, 2)])], L.SoftmaxCrossEntropy(), (2,), 2)
    return Net(model, [{"w": np.array(w, dtype=np.float64), "b": np.array(b, dtype=np.float64)}], dtype=tf.float64)


def apply_steps(settings, net, steps, lr=0.1):
    """Apply each {param: gradient} of `steps` to unit 0, one optimiser step each."""
    opt = optimizers.make_optimizer(settings, net)
    for grads in steps:
        opt.apply(0, {k: tf.constant(v, tf.float64) for k, v in grads.items()}, lr)
    return {k: v.numpy() for k, v in net.variables[0].items()}


W0, B0 = np.array([[0.3, -0.2], [0.5, 0.1]]), np.array([0.05, -0.4])
G1 = {"w": np.array([[0.5, -1.0], [0.2, 0.0]]), "b": np.array([0.3, -0.6])}
G2 = {"w": np.array([[-0.1, 0.4], [0.7, 0.2]]), "b": np.array([-0.2, 0.1])}


@pytest.mark.timeout(60)
def test_momentum_two_steps_by_hand():
    beta, lr = 0.8, 0.1
    out = apply_steps(CaseSettings(optimizer="momentum", beta1=beta), dense_net(W0, B0), [G1, G2], lr)
    for name, start in (("w", W0), ("b", B0)):
        v1 = G1[name]
        v2 = beta * v1 + G2[name]
        np.testing.assert_allclose(out[name], start - lr * v1 - lr * v2, rtol=1e-12)
    # not plain SGD
    assert not np.allclose(out["w"], W0 - lr * G1["w"] - lr * G2["w"])


@pytest.mark.timeout(60)
def test_weight_decay_on_weights_not_biases_by_hand():
    wd, lr = 0.3, 0.1
    out = apply_steps(CaseSettings(optimizer="sgd", weight_decay=wd), dense_net(W0, B0), [G1], lr)
    np.testing.assert_allclose(out["w"], W0 - lr * (G1["w"] + wd * W0), rtol=1e-12)
    np.testing.assert_allclose(out["b"], B0 - lr * G1["b"], rtol=1e-12)


def test_ops_name_their_weights():
    assert L.Dense(2, 3).weight_names == ("w",) and L.Conv2D(3, 1, 2, bias=True).weight_names == ("w",)
    assert L.RNNCell(4, 3, first=True).weight_names == ("wx",)
    assert L.RNNCell(4, 3, first=False).weight_names == ("wx", "wh")
    for op in (L.Dense(2, 3), L.Conv2D(3, 1, 2, bias=True), L.RNNCell(4, 3, first=False)):
        assert set(op.weight_names) <= set(op.param_names) == set(op.param_shapes())
    assert L.Tanh().weight_names == () and L.Tanh().param_names == ()


@pytest.mark.timeout(120)
def test_dni_rnn_recurrent_weights_get_weight_decay_by_hand():
    """loss += wd/2 * sum(w^2) over weights: d/dw = wd * w for wx and wh, nothing for b or the
    synthetic-gradient model (sg_w, sg_b)."""
    wd, lr = 0.5, 0.2
    settings = CaseSettings(model="dni_rnn", hidden=(3,), optimizer="sgd", weight_decay=wd)
    model = models.build_model(settings, (4,), 2)
    assert [unit.weight_names for unit in model.units] == [("wx",), ("wx", "wh"), ("w",)]
    rng = np.random.default_rng(0)
    params = [{k: rng.normal(size=v.shape) for k, v in unit.items()} for unit in model.init_params(1, np.float64)]
    net = Net(model, params, dtype=tf.float64)
    opt = optimizers.make_optimizer(settings, net)
    grads = {name: rng.normal(size=value.shape) for name, value in params[1].items()}
    opt.apply(1, {k: tf.constant(v) for k, v in grads.items()}, lr)
    after = net.numpy_params()[1]
    for name in ("wx", "wh"):
        np.testing.assert_allclose(after[name], params[1][name] - lr * (grads[name] + wd * params[1][name]), rtol=1e-12)
    for name in ("b", "sg_w", "sg_b"):
        np.testing.assert_allclose(after[name], params[1][name] - lr * grads[name], rtol=1e-12)


@pytest.mark.timeout(120)
def test_dni_rnn_layer_statistics_cover_every_weight():
    from workers.trainer import layer_statistics

    settings = CaseSettings(model="dni_rnn", hidden=(3,))
    model = models.build_model(settings, (4,), 2)
    net = Net(model, model.init_params(1, np.float64), dtype=tf.float64)
    rows = layer_statistics(net, tf.constant(np.ones((2, 4))), step=0, epoch=0)
    weights = {row["layer"]: row for row in rows if row["quantity"] == "weights"}
    assert set(weights) == {"t1", "t2", "out"}
    import json

    assert sum(json.loads(weights["t2"]["hist"])) == 4 * 3 + 3 * 3  # wx and wh
    everything = np.concatenate([net.variables[1]["wx"].numpy().ravel(), net.variables[1]["wh"].numpy().ravel()])
    assert weights["t2"]["max"] == pytest.approx(everything.max())


@pytest.mark.timeout(30)
def test_learning_rate_schedules_by_hand():
    step = CaseSettings(lr=0.1, lr_schedule="step", lr_decay=0.5, lr_decay_epochs=3)
    assert [optimizers.learning_rate(step, e) for e in range(8)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])
    inverse = CaseSettings(lr=0.1, lr_schedule="inverse", lr_decay=0.5)
    assert [optimizers.learning_rate(inverse, e) for e in range(4)] == pytest.approx([0.1, 0.1 / 1.5, 0.1 / 2, 0.1 / 2.5])
    constant = CaseSettings(lr=0.1, lr_decay=0.5)
    assert {optimizers.learning_rate(constant, e) for e in range(5)} == {0.1}


@pytest.mark.timeout(300)
def test_trainer_logs_the_scheduled_learning_rate_per_epoch():
    from workers import settings as settings_module
    from workers.data import load_dataset
    from workers.trainer import train

    case = settings_module.from_dict({"model": "mlp", "hidden": [4], "optimizer": "sgd", "lr": 0.2, "batch_size": 0,
                                      "epochs": 3, "lr_schedule": "step", "lr_decay": 0.5, "lr_decay_epochs": 1,
                                      "data": {"name": "moons", "samples": 40}})
    reports = []
    train(case, load_dataset(case.data), reports.append)
    lrs = {row["epoch"]: row["lr"] for r in reports for row in r.rows if row["split"] == "train"}
    assert lrs == pytest.approx({0: 0.2, 1: 0.1, 2: 0.05})
