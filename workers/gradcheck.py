"""`bplab gradcheck`: hand-written gradients of a model against tf.GradientTape.

For each unit: the largest relative error max|manual - tape| / max|tape| over the
parameters the tape differentiates (a parameter the hand-written backward leaves out
counts as an error of infinity), in float64 at random inputs; also the gradient with
respect to the input (what the adversarial schedule uses). Run it after writing a new
layer or model.
"""

from __future__ import annotations

import math

import numpy as np

# A small, fast configuration per model: (settings overrides, input shape, classes).
CHECK_CONFIGS = {
    "allconv9": ({"width": 0.04}, (8, 8, 3), 10),
    "celu7": ({"width": 0.05}, (32, 32, 1), 10),
    "mlp": ({"hidden": (7, 5), "activation": "tanh"}, (4, 4, 1), 3),
    "dcn": ({"width": 0.05, "dropout": 0.5}, (28, 28, 1), 10),
    "dni_rnn": ({"hidden": (3,)}, (4, 4, 1), 2),
}
TOLERANCE = 1e-6


def check_model(name: str, seed: int = 0, overrides: dict | None = None) -> dict[str, float]:
    """{unit name (or 'input'): max relative error} for one model."""
    import tensorflow as tf

    from workers import models, settings as settings_module
    from workers.engine import Net
    from workers.layers import Context

    config, input_shape, classes = CHECK_CONFIGS[name]
    settings = settings_module.CaseSettings(model=name, **{**config, **(overrides or {})})
    model = models.build_model(settings, input_shape, classes)
    rng = np.random.default_rng(seed)
    params = model.init_params(seed, dtype=np.float64)
    # Biases initialised to constants would hide a wrong bias gradient's sign: randomise.
    params = [{k: v + 0.1 * rng.standard_normal(v.shape) for k, v in unit.items()} for unit in params]
    net = Net(model, params, dtype=tf.float64)
    x = tf.constant(rng.normal(size=(4, *input_shape)), dtype=tf.float64)
    y = tf.one_hot(rng.integers(0, classes, size=4), classes, dtype=tf.float64)
    ctx = Context(training=True, seed=tf.constant([seed, 1], tf.int64))

    acts, caches = net.forward(x, ctx)
    _, d_out = net.loss_and_gradient(acts[-1], y)
    grads, d_inputs = net.backward(d_out, caches, need_input_grad=True)

    with tf.GradientTape() as tape:
        tape.watch(x)
        output = net.forward(x, ctx)[0][-1]
        loss = net.loss.forward(output, y)[0]
    reference = tape.gradient(loss, [x, net.variables])
    errors = {"input": _relative(d_inputs[0], reference[0])}
    for index, unit in enumerate(model.units):
        # Over the tape's keys: a parameter outside the loss (a synthetic-gradient model) has
        # no tape gradient; one the loss depends on must have a hand-written gradient too.
        expected = [name for name, g in reference[1][index].items() if g is not None]
        manual = grads.get(index, {})
        errors[unit.name] = max((_relative(manual[name], reference[1][index][name]) if name in manual else math.inf
                                 for name in expected), default=0.0)
        extra = set(manual) - set(expected)
        if extra:  # a gradient for a parameter the loss does not depend on
            errors[unit.name] = max(errors[unit.name], max(float(np.abs(np.asarray(manual[n])).max()) for n in extra))
    return errors


def _relative(manual, reference) -> float:
    manual, reference = np.asarray(manual), np.asarray(reference)
    scale = max(np.abs(reference).max(), 1e-12)
    return float(np.abs(manual - reference).max() / scale)


def main(names: list[str], tolerance: float = TOLERANCE) -> int:
    """Print a table of errors; 0 if every error is within tolerance, else 1."""
    worst, failed = 0.0, False
    for name in names:
        errors = check_model(name)
        print(f"{name}")
        for unit, error in errors.items():
            flag = "ok" if error <= tolerance else "FAIL"
            shown = "a gradient is missing" if math.isinf(error) else f"max relative error {error:.2e}"
            print(f"  {unit:<8} {shown}  {flag}")
            worst = max(worst, error)
            failed |= not error <= tolerance  # nan fails too
    print(f"worst {worst:.2e} (tolerance {tolerance:.0e})")
    return 1 if failed else 0
