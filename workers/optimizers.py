"""Hand-written optimisers over a Net's variables, with per-unit step counts.

Unfair schedules update some units more often than others in one batch, so the Adam
step t (for bias correction) is counted per unit: t_i = number of updates of unit i.
State is tf.Variables so that updates run inside the traced step; `state()` /
`load_state()` give NumPy copies for checkpoints.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from workers import registry
from workers.layers import const


class Optimizer:
    """Base: slots per parameter, a step counter per unit, `apply(unit, grads, lr)`."""

    slot_names: tuple[str, ...] = ()

    def __init__(self, settings, net):
        self.settings = settings
        self.net = net
        self.weight_decay = settings.weight_decay
        # Read here, not inside the traced step: tf.function's autograph would try to convert
        # the settings' methods (pydantic models), which it cannot.
        self.quirks = frozenset(settings.quirks)
        self.steps = [tf.Variable(0.0, dtype=net.dtype, name=f"t_{index}") for index in range(net.depth)]
        self.slots = [
            {name: {slot: tf.Variable(tf.zeros_like(var), name=f"{slot}_{index}_{name}") for slot in self.slot_names}
             for name, var in unit.items()}
            for index, unit in enumerate(net.variables)
        ]

    def apply(self, unit: int, grads: dict, lr) -> None:
        t = self.steps[unit].assign_add(const(1.0, self.net.dtype))
        # tf.cast of a Python float goes through float32 first: make the constant in the right dtype
        lr = tf.cast(lr, self.net.dtype) if tf.is_tensor(lr) else tf.constant(lr, self.net.dtype)
        for name, d_param in grads.items():
            var = self.net.variables[unit][name]
            if self.weight_decay and name in self.net.units[unit].weight_names:  # L2 on weights, not biases
                d_param = d_param + const(self.weight_decay, var.dtype) * var
            self.update(var, d_param, self.slots[unit][name], lr, t)

    def update(self, var, d_param, slots, lr, t) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        out = {f"t/{i}": step.numpy() for i, step in enumerate(self.steps)}
        for i, unit in enumerate(self.slots):
            for name, slots in unit.items():
                for slot, var in slots.items():
                    out[f"{slot}/{i}/{name}"] = var.numpy()
        return out

    def load_state(self, state: dict) -> None:
        for i, step in enumerate(self.steps):
            step.assign(state[f"t/{i}"])
        for i, unit in enumerate(self.slots):
            for name, slots in unit.items():
                for slot, var in slots.items():
                    var.assign(state[f"{slot}/{i}/{name}"])


class SGD(Optimizer):
    """w <- w - lr * d_w."""

    def update(self, var, d_param, slots, lr, t):
        var.assign_sub(lr * d_param)


class Momentum(Optimizer):
    """v <- beta1 * v + d_w;  w <- w - lr * v."""

    slot_names = ("velocity",)

    def update(self, var, d_param, slots, lr, t):
        velocity = slots["velocity"].assign(const(self.settings.beta1, var.dtype) * slots["velocity"] + d_param)
        var.assign_sub(lr * velocity)


class Adam(Optimizer):
    """m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  w <- w - lr m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps).

    Quirk adam_constant_bias_correction divides by (1-b1) and (1-b2) instead."""

    slot_names = ("m", "v")

    def corrections(self, t):
        b1, b2 = self.settings.beta1, self.settings.beta2
        if "adam_constant_bias_correction" in self.quirks:
            return 1.0 - b1, 1.0 - b2
        one = const(1.0, t.dtype)
        return one - tf.pow(const(b1, t.dtype), t), one - tf.pow(const(b2, t.dtype), t)

    def moments(self, d_param, slots):
        b1, b2 = self.settings.beta1, self.settings.beta2
        dtype = d_param.dtype
        m = slots["m"].assign(const(b1, dtype) * slots["m"] + const(1.0 - b1, dtype) * d_param)
        v = slots["v"].assign(const(b2, dtype) * slots["v"] + const(1.0 - b2, dtype) * d_param * d_param)
        return m, v

    def update(self, var, d_param, slots, lr, t):
        if "adam_tf1_unordered_reads" in self.quirks:
            return self.update_from_previous_moments(var, d_param, slots, lr, t)
        m, v = self.moments(d_param, slots)
        c1, c2 = self.corrections(t)
        var.assign_sub(lr * (m / c1) / (tf.sqrt(v / c2) + const(self.settings.epsilon, var.dtype)))

    def update_from_previous_moments(self, var, d_param, slots, lr, t):
        """Quirk adam_tf1_unordered_reads (docs/experiments.md, "What TF1 executed"):
        w <- w - lr m_prev/c1 / (sqrt(v_prev/c2) + eps) with the moments stored before this
        update (bias correction at their own step count t-1; zero moments give a zero step),
        then m, v take this update's gradient as usual."""
        step = lr * (slots["m"] / self.corrections(tf.maximum(t - 1.0, 1.0))[0])
        step = step / (tf.sqrt(slots["v"] / self.corrections(tf.maximum(t - 1.0, 1.0))[1]) + self.settings.epsilon)
        step = tf.identity(step)  # read the old moments before they are assigned
        self.moments(d_param, slots)
        var.assign_sub(step)


class AMSGrad(Adam):
    """Adam with v_hat <- max(v_hat, v) element-wise, bias-corrected like Adam.

    Quirk amsgrad_whole_tensor_max keeps the old v_hat unless sum(v) > sum(v_hat) and
    drops the bias correction (the adversarial study's source)."""

    slot_names = ("m", "v", "v_hat")

    def update(self, var, d_param, slots, lr, t):
        m, v = self.moments(d_param, slots)
        eps = self.settings.epsilon
        if "amsgrad_whole_tensor_max" in self.quirks:
            v_hat = slots["v_hat"].assign(tf.cond(tf.reduce_sum(v) > tf.reduce_sum(slots["v_hat"]), lambda: v, lambda: tf.identity(slots["v_hat"])))
            var.assign_sub(lr * m / (tf.sqrt(v_hat) + eps))
            return
        v_hat = slots["v_hat"].assign(tf.maximum(slots["v_hat"], v))
        c1, c2 = self.corrections(t)
        var.assign_sub(lr * (m / c1) / (tf.sqrt(v_hat / c2) + const(eps, var.dtype)))


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "amsgrad": AMSGrad}
assert tuple(OPTIMIZERS) == registry.OPTIMIZERS, "an optimizer registered here but not in workers.registry (or the reverse)"


def make_optimizer(settings, net) -> Optimizer:
    return OPTIMIZERS[settings.optimizer](settings, net)


def learning_rate(settings, epoch: int) -> float:
    """The learning rate of an epoch (a pure function of the settings and the epoch)."""
    if settings.lr_schedule == "step":
        return settings.lr * settings.lr_decay ** (epoch // settings.lr_decay_epochs)
    if settings.lr_schedule == "inverse":
        return settings.lr / (1.0 + settings.lr_decay * epoch)
    assert settings.lr_schedule == "constant", settings.lr_schedule
    return settings.lr
