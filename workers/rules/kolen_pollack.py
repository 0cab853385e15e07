"""Kolen-Pollack (Akrout, Wilson, Humphreys, Lillicrap and Tweed 2019, arXiv:1904.05391).

Feedback weights B start random (`feedback_init`) and carry the error down like feedback
alignment's (dense d_x = d_y B^T, conv Conv2DBackpropInput(B, d_y)), but B receives the same
update as W and the same weight decay. With SGD:
    W <- W - lr (x^T d_y) - lr wd W,   B <- B - lr (x^T d_y) - lr wd B,
so B - W <- (1 - lr wd) (B - W) at every step and B converges to W. With any optimiser B
takes the change the optimiser made to W, and the decay acts on B - W as it does with SGD:
    B <- B + (W_after - W_before) - lr wd (B - W_before).
"""

from __future__ import annotations

from workers.layers import tf
from workers.rules import Rule, feedback_weights


def make_state(model, index, params, settings, rng) -> dict:
    """B per gradient-carrying weight of the unit, random at the start."""
    return feedback_weights(model, index, rng, settings.feedback_init)


def update(step, grads) -> None:
    """The optimiser's step on W; then B follows it and decays toward W."""
    net = step.net
    before = {index: {name: tf.identity(net.variables[index][name]) for name in net.feedback[index]} for index in grads}
    step.update(grads)
    lr = tf.cast(step.lr, net.dtype) if tf.is_tensor(step.lr) else tf.constant(step.lr, net.dtype)
    decay = lr * tf.constant(step.settings.weight_decay, net.dtype)
    for index in sorted(grads):
        for name, b in net.feedback[index].items():
            w_before = before[index][name]
            b.assign(b + (net.variables[index][name] - w_before) - decay * (b - w_before))


RULE = Rule(
    name="kolen-pollack",
    summary="d_y B^T, B updated like W with the same weight decay, so B - W shrinks by (1 - lr wd) a step",
    make_state=make_state,
    update=update,
)
