"""Direct feedback alignment (Nokland 2016, arXiv:1609.01596).

The top unit receives the output error e = d loss / d logits itself; every other unit i
receives e B_i at its output, B_i a fixed random (classes x the unit's output size) matrix
(drawn by `feedback_init`), reshaped to the output's shape. Each unit then runs its own
backward (activation, pooling, then the weight gradient x^T delta); no unit hands a
gradient to the unit below, so none computes d_x.
"""

from __future__ import annotations

import numpy as np

from workers.layers import tf
from workers.rules import Rule


def make_state(model, index, params, settings, rng) -> dict:
    """B_i (classes, unit output size) for every unit but the top one."""
    if index == len(model.units) - 1:
        return {}
    from workers.models import draw_weights

    size = int(np.prod(model.output_shapes()[index]))
    return {"direct": draw_weights(rng, settings.feedback_init, (model.num_classes, size))}


def direct(step, d_out, acts) -> dict:
    """{unit: e B_i reshaped to the unit's output} for every unit below the top."""
    net = step.net
    return {index: tf.reshape(tf.matmul(d_out, net.rule_state[index]["direct"]), tf.shape(acts[index + 1]))
            for index in range(net.depth - 1)}  # (B, classes) @ (classes, size) -> (B, *output)


RULE = Rule(
    name="direct-feedback",
    summary="every hidden unit receives e B_i at its output (B_i fixed random, classes x output size); "
            "the top unit gets e",
    make_state=make_state,
    direct=direct,
)
