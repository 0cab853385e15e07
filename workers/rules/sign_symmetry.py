"""Sign symmetry (Liao, Leibo and Poggio 2016, arXiv:1510.05067), as BioTorch scales it.

The feedback weights share the forward weights' signs, recomputed from the weights each
step starts from (after every update, for the next step; the first from the initial
weights): B = s sign(W) with s = sqrt(2 / (fan_in + fan_out)) (BioTorch's uSF), or with
`sign_feedback` frsf B = |M| sign(W), M fixed random (drawn by `feedback_init`), or brsf
B = |R| sign(W), R Xavier-uniform and redrawn every step. Dense d_x = d_y B^T, conv
Conv2DBackpropInput(B, d_y); d_W = x^T d_y.
"""

from __future__ import annotations

import numpy as np

from workers.layers import tf
from workers.rules import Rule

REDRAW_SALT = 0x51647  # brsf: the draw after step t for unit i comes from fold_in(seed of step t, REDRAW_SALT + i)


def scale(shape) -> float:
    """uSF's s = sqrt(2 / (fan_in + fan_out))."""
    from workers.models import fans

    fan_in, fan_out = fans(tuple(shape))
    return float(np.sqrt(2.0 / (fan_in + fan_out)))


def make_state(model, index, params, settings, rng) -> dict:
    """B from the initial W (and M, kept as `<name>_magnitude`, for frsf)."""
    from workers.models import draw_weights

    op = model.units[index].param_op
    state = {}
    for name in (op.feedback_names if op is not None else ()):
        w = np.asarray(params[name], dtype=np.float64)
        if settings.sign_feedback == "usf":
            state[name] = scale(w.shape) * np.sign(w)
        elif settings.sign_feedback == "frsf":
            magnitude = np.abs(draw_weights(rng, settings.feedback_init, w.shape))
            state[f"{name}_magnitude"] = magnitude
            state[name] = magnitude * np.sign(w)
        else:  # brsf: redrawn at every step; this first draw shows the starting state
            state[name] = np.abs(draw_weights(rng, "xavier", w.shape)) * np.sign(w)
    return state


def after_step(step) -> None:
    """B <- magnitude * sign(W) for every unit, from the weights the step left (the next step's)."""
    net, kind = step.net, step.settings.sign_feedback
    for index, feedback in enumerate(net.feedback):
        for name, b in feedback.items():
            sign = tf.sign(net.variables[index][name])
            if kind == "usf":
                b.assign(tf.constant(scale(b.shape), net.dtype) * sign)
            elif kind == "frsf":
                b.assign(net.rule_state[index][f"{name}_magnitude"] * sign)
            else:
                assert step.ctx.seed is not None, "brsf draws from the step's seed"
                from workers.models import fans

                fan_in, fan_out = fans(tuple(b.shape))
                limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
                seed = tf.random.experimental.stateless_fold_in(step.ctx.seed, REDRAW_SALT + index)
                redrawn = tf.random.stateless_uniform(b.shape, seed=seed, minval=-limit, maxval=limit, dtype=net.dtype)
                b.assign(tf.abs(redrawn) * sign)


RULE = Rule(
    name="sign-symmetry",
    summary="d_y B^T with B = s sign(W) every step (sign_feedback: usf, frsf |M| sign(W), brsf |R| sign(W))",
    make_state=make_state,
    after_step=after_step,
)
