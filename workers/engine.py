"""The network at run time: variables, unit-wise forward, unit-wise backward.

`Net.forward` keeps every unit's input and cache so that a schedule can re-forward
from any unit; `Net.backward` walks down from the top to a given unit and returns the
weight gradients only of the units asked for. Both are plain Python over TensorFlow ops,
traced into one graph per schedule by the trainer's tf.function.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from workers.layers import Context, upsample_to


class Net:
    """A model's units with their tf.Variables."""

    def __init__(self, model, params: list[dict], dtype=tf.float32):
        assert len(params) == len(model.units), "one parameter dict per unit"
        self.model = model
        self.units = model.units
        self.loss = model.loss
        self.dtype = dtype
        self.variables = [
            {name: tf.Variable(np.asarray(value), dtype=dtype, name=f"{unit.name}_{name}") for name, value in unit_params.items()}
            for unit, unit_params in zip(model.units, params)
        ]
        # A measured step's workers.alignment.Probe: told the error each unit receives in
        # backward (None: nothing is measured, and backward is exactly what it was).
        self.probe = None

    @property
    def depth(self) -> int:
        return len(self.units)

    def numpy_params(self) -> list[dict]:
        return [{name: var.numpy() for name, var in unit.items()} for unit in self.variables]

    def assign(self, params: list[dict]) -> None:
        for unit_vars, unit_params in zip(self.variables, params):
            for name, var in unit_vars.items():
                var.assign(unit_params[name])

    # ------------------------------------------------------------------ forward
    def forward_unit(self, index: int, x, ctx: Context):
        caches = []
        for op in self.units[index].ops:
            x, cache = op.forward(x, self.variables[index], ctx)
            caches.append(cache)
        return x, caches

    def forward(self, x, ctx: Context, start: int = 0, acts=None, caches=None):
        """acts[i] is the input of unit i, acts[-1] the output; re-forward from `start` reusing the rest."""
        acts = list(acts) if acts is not None else [x] + [None] * self.depth
        caches = list(caches) if caches is not None else [None] * self.depth
        if start == 0:
            acts[0] = x
        for index in range(start, self.depth):
            acts[index + 1], caches[index] = self.forward_unit(index, acts[index], ctx)
        return acts, caches

    def predict(self, x, ctx: Context | None = None):
        ctx = ctx or Context(training=False)
        for index in range(self.depth):
            x, _ = self.forward_unit(index, x, ctx)
        return x

    # ------------------------------------------------------------------ backward
    def backward_unit(self, index: int, d_y, caches, need_d_x: bool, need_grads: bool):
        grads = {}
        ops = self.units[index].ops
        for position in reversed(range(len(ops))):
            # Only the unit's first op hands a gradient to the unit below.
            d_y, op_grads = ops[position].backward(d_y, caches[position], need_d_x=need_d_x or position > 0,
                                                   need_grads=need_grads)
            grads.update(op_grads)
        return d_y, grads

    def backward(self, d_out, caches, down_to: int = 0, want_grads=None, need_input_grad: bool = False,
                 skip_units=(), skip_rate=None):
        """Back-propagate d_out from the top down to unit `down_to`.

        Returns (grads, d_inputs): grads[i] = {param: d_param} for every unit i >= down_to in
        `want_grads` (None: all of them); d_inputs[i] = gradient at the input of unit i.
        With `skip_units` (dilated back propagation), unit i's incoming gradient also gets
        skip_rate * upsample(d_inputs[i + 2]): the gradient that unit i+2 sends down.
        """
        grads, d_inputs = {}, {}
        for index in reversed(range(down_to, self.depth)):
            incoming = d_out if index == self.depth - 1 else d_inputs[index + 1]
            if index in skip_units:
                skip = d_inputs[index + 2]
                incoming = incoming + skip_rate * upsample_to(skip, incoming.shape)
            need_d_x = index > down_to or need_input_grad
            need_grads = want_grads is None or index in want_grads
            if self.probe is not None and need_grads:
                self.probe.saw_error(index, incoming)
            d_x, unit_grads = self.backward_unit(index, incoming, caches[index], need_d_x, need_grads)
            if need_grads:
                grads[index] = unit_grads
            if need_d_x:
                d_inputs[index] = d_x
        return grads, d_inputs

    def loss_and_gradient(self, output, y_onehot):
        loss, cache = self.loss.forward(output, y_onehot)
        return loss, self.loss.backward(cache)
