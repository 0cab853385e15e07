"""The network at run time: variables, unit-wise forward, unit-wise backward.

`Net.forward` keeps every unit's input and cache so that a schedule can re-forward
from any unit; `Net.backward` walks down from the top to a given unit and returns the
weight gradients only of the units asked for. Both are plain Python over TensorFlow ops,
traced into one graph per schedule by the trainer's tf.function.

A learning rule (workers.rules) keeps its state in `Net.rule_state`, one dict of
tf.Variables per unit; the part of it that stands in for a forward weight in the backward
pass is `Net.feedback` (per unit: forward weight name -> B, empty where the unit has none),
which `Net.backward(..., use_feedback=True)` hands to the op that carries the gradient
down. Back propagation is the backward without it; the weight gradients are always the
unit's own input x error.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from workers.layers import Context, upsample_to


class Net:
    """A model's units with their tf.Variables."""

    def __init__(self, model, params: list[dict], dtype=tf.float32, rule_state: list[dict] | None = None):
        assert len(params) == len(model.units), "one parameter dict per unit"
        rule_state = rule_state if rule_state is not None else [{} for _ in model.units]
        assert len(rule_state) == len(model.units), "one rule-state dict per unit"
        self.model = model
        self.units = model.units
        self.loss = model.loss
        self.dtype = dtype
        self.variables = [
            {name: tf.Variable(np.asarray(value), dtype=dtype, name=f"{unit.name}_{name}") for name, value in unit_params.items()}
            for unit, unit_params in zip(model.units, params)
        ]
        self.rule_state = [
            {name: tf.Variable(np.asarray(value), dtype=dtype, trainable=False, name=f"{unit.name}_feedback_{name}")
             for name, value in unit_state.items()}
            for unit, unit_state in zip(model.units, rule_state)
        ]
        # The feedback weights proper: the entries named after a weight that carries the gradient down.
        self.feedback = [{name: var for name, var in state.items() if name in unit.feedback_names}
                         for unit, state in zip(model.units, self.rule_state)]
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

    def numpy_rule_state(self) -> list[dict]:
        return [{name: var.numpy() for name, var in unit.items()} for unit in self.rule_state]

    def assign_rule_state(self, state: list[dict]) -> None:
        assert [sorted(unit) for unit in state] == [sorted(unit) for unit in self.rule_state], "rule state of another rule"
        for unit_vars, unit_state in zip(self.rule_state, state):
            for name, var in unit_vars.items():
                var.assign(unit_state[name])

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
    def backward_unit(self, index: int, d_y, caches, need_d_x: bool, need_grads: bool, feedback: dict | None = None):
        """(d_x, grads) of unit `index`; `feedback` ({weight name: B}) goes to the op whose
        weights carry the gradient down, which then computes d_x with B."""
        grads = {}
        ops = self.units[index].ops
        for position in reversed(range(len(ops))):
            op = ops[position]
            extra = {"feedback": feedback} if feedback and op.feedback_names else {}
            # Only the unit's first op hands a gradient to the unit below.
            d_y, op_grads = op.backward(d_y, caches[position], need_d_x=need_d_x or position > 0,
                                        need_grads=need_grads, **extra)
            grads.update(op_grads)
        return d_y, grads

    def backward(self, d_out, caches, down_to: int = 0, want_grads=None, need_input_grad: bool = False,
                 skip_units=(), skip_rate=None, direct: dict | None = None, use_feedback: bool = False):
        """Back-propagate d_out from the top down to unit `down_to`.

        Returns (grads, d_inputs): grads[i] = {param: d_param} for every unit i >= down_to in
        `want_grads` (None: all of them); d_inputs[i] = gradient at the input of unit i.
        With `skip_units` (dilated back propagation), unit i's incoming gradient also gets
        skip_rate * upsample(d_inputs[i + 2]): the gradient that unit i+2 sends down.
        With `direct` ({unit: gradient at its output}), those units receive the given gradient
        instead of what the unit above hands down (direct feedback alignment), and the unit
        above computes no d_x for them. With use_feedback (a learning rule's step), every unit
        computes d_x with its `feedback` weights where it has them; without, this is back
        propagation, whatever state a rule keeps.
        """
        direct = direct or {}
        grads, d_inputs = {}, {}
        for index in reversed(range(down_to, self.depth)):
            if index in direct:
                incoming = direct[index]
            else:
                incoming = d_out if index == self.depth - 1 else d_inputs[index + 1]
            if index in skip_units:
                skip = d_inputs[index + 2]
                incoming = incoming + skip_rate * upsample_to(skip, incoming.shape)
            need_d_x = (index > down_to and index - 1 not in direct) or (index == down_to and need_input_grad)
            need_grads = want_grads is None or index in want_grads
            if self.probe is not None and need_grads:
                self.probe.saw_error(index, incoming)
            feedback = self.feedback[index] if use_feedback else None
            d_x, unit_grads = self.backward_unit(index, incoming, caches[index], need_d_x, need_grads, feedback)
            if need_grads:
                grads[index] = unit_grads
            if need_d_x:
                d_inputs[index] = d_x
        return grads, d_inputs

    def loss_and_gradient(self, output, y_onehot):
        loss, cache = self.loss.forward(output, y_onehot)
        return loss, self.loss.backward(cache)
