"""Every hand-written backward against tf.GradientTape (float64, random non-zero inputs,
a random upstream gradient): relative error <= 1e-6."""

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import TOL, check_op, rel_error
from workers import layers as L

pytestmark = pytest.mark.timeout(120)  # per test; a test's own mark wins

@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d(kernel, padding, stride, bias):
    rng = np.random.default_rng(kernel)
    params = {"w": rng.normal(size=(kernel, kernel, 3, 4))}
    if bias:
        params["b"] = rng.normal(size=(4,))
    check_op(L.Conv2D(kernel, 3, 4, stride=stride, padding=padding, bias=bias), (2, 7, 7, 3), params)


def test_conv2d_output_shape_matches_tf():
    op = L.Conv2D(3, 2, 5, stride=2, padding="SAME")
    y, _ = op.forward(tf.zeros((1, 7, 9, 2)), {"w": tf.zeros((3, 3, 2, 5))}, L.Context())
    assert tuple(y.shape[1:]) == op.output_shape((7, 9, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_dense(bias):
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(6, 4))}
    if bias:
        params["b"] = rng.normal(size=(4,))
    check_op(L.Dense(6, 4, bias=bias), (5, 6), params)


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (2, 5, 7, 2)])  # odd sizes: VALID pool drops a row
def test_avg_pool(shape):
    check_op(L.AvgPool2(), shape)


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (2, 5, 5, 2)])
def test_max_pool(shape):
    check_op(L.MaxPool2(), shape)


def test_global_mean():
    check_op(L.GlobalMean(), (3, 4, 5, 6))


def test_flatten():
    check_op(L.Flatten(), (3, 4, 5, 2))


def test_dropout_training_and_eval():
    check_op(L.Dropout(0.5, salt=3), (4, 10))
    check_op(L.Dropout(0.5), (4, 10), ctx=L.Context(training=False))


@pytest.mark.parametrize("op", [L.ELU(), L.CELU(2.0), L.CELU(1.0), L.ReLU(), L.Tanh(), L.Sigmoid()], ids=repr)
def test_activation(op):
    check_op(op, (3, 4, 4, 2))


def test_celu_forward_matches_tf():
    x = tf.constant(np.linspace(-3, 3, 13))
    y, _ = L.CELU(2.0).forward(x, {}, L.Context())
    np.testing.assert_allclose(y, tf.nn.elu(x / 2.0) * 2.0, rtol=1e-12)


def test_elu_forward_matches_tf():
    x = tf.constant(np.linspace(-3, 3, 13))
    np.testing.assert_allclose(L.ELU().forward(x, {}, L.Context())[0], tf.nn.elu(x), rtol=1e-12)


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(2)
    logits = tf.constant(rng.normal(size=(5, 4)))
    y = tf.one_hot([0, 3, 1, 1, 2], 4, dtype=tf.float64)
    loss_fn = L.SoftmaxCrossEntropy()
    loss, cache = loss_fn.forward(logits, y)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        reference = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(y, logits))
    assert abs(float(loss) - float(reference)) < 1e-12
    assert rel_error(loss_fn.backward(cache), tape.gradient(reference, logits)) <= TOL


def test_squared_error_gradient():
    rng = np.random.default_rng(3)
    out = tf.constant(rng.normal(size=(5, 2)))
    y = tf.constant(rng.normal(size=(5, 2)))
    loss_fn = L.SquaredError()
    loss, cache = loss_fn.forward(out, y)
    with tf.GradientTape() as tape:
        tape.watch(out)
        reference = 0.5 * tf.reduce_mean(tf.reduce_sum((out - y) ** 2, axis=1))
    assert abs(float(loss) - float(reference)) < 1e-12
    assert rel_error(loss_fn.backward(cache), tape.gradient(reference, out)) <= TOL


def test_need_flags_skip_work_but_not_values():
    rng = np.random.default_rng(4)
    op = L.Conv2D(3, 2, 3)
    w = tf.constant(rng.normal(size=(3, 3, 2, 3)))
    y, cache = op.forward(tf.constant(rng.normal(size=(1, 5, 5, 2))), {"w": w}, L.Context())
    d_x_full, grads_full = op.backward(tf.ones_like(y), cache)
    d_x_none, grads_only = op.backward(tf.ones_like(y), cache, need_d_x=False)
    d_x_only, no_grads = op.backward(tf.ones_like(y), cache, need_grads=False)
    assert d_x_none is None and no_grads == {}
    np.testing.assert_array_equal(grads_only["w"], grads_full["w"])
    np.testing.assert_array_equal(d_x_only, d_x_full)


def test_shared_constants_let_a_traced_graph_and_its_variables_go():
    """const keeps a graph's constants on the graph: once the function is gone, its graph and the
    variables it captured are freed (a table outside the graph kept them all, and a worker's
    memory grew with every structure it evicted). The constants are still shared within a graph."""
    import gc
    import weakref

    graphs, variables = [], []
    for _ in range(3):
        w = tf.Variable(np.ones((4, 4), np.float32))

        @tf.function
        def step(x):
            return tf.matmul(x, w) * L.const(2.0, tf.float32) + L.const(2.0, tf.float32)

        assert float(step(tf.ones((1, 4)))[0, 0]) == 10.0
        graph = step.get_concrete_function(tf.TensorSpec((1, 4), tf.float32)).graph
        assert sum(op.type == "Const" for op in graph.get_operations()) == 1  # 2.0, once
        graphs.append(weakref.ref(graph))
        variables.append(weakref.ref(w))
        del step, graph, w
    gc.collect()
    assert [g() for g in graphs] == [None] * 3
    assert [v() for v in variables] == [None] * 3
