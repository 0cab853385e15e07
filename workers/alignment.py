"""How far a step's update is from the true gradient, per unit (setting `alignment_every`).

At a measured step the trainer hands the schedule's Stepper a `Probe` (and sets it as
`Net.probe`). The probe never changes what the step computes; it only reads:

- the variables the step started from (read before the schedule's first update);
- the true gradient of the training loss at those variables and on the step's batch, by full
  back propagation with the hand-written backward. It reuses the schedule's first full forward
  of the batch when that comes before any update (every schedule but `synthetic`, which
  forwards unit by unit and updates in between: there the probe forwards once more itself,
  just before the first update). The true error at every unit's output comes with it;
- every gradient the schedule hands the optimiser (`Stepper.update`), per unit and stage;
- the error each unit received in the backward whose gradient was handed over (`Net.backward`
  reports its `incoming` gradient; the synthetic schedule reports its g_hat);
- the synthetic-gradient predictions and the true gradients through time that arrive for them;
- feedback weights, for learning rules that keep them (`Net.feedback`: one dict per unit,
  forward weight name -> the tf.Variable B used in its place in the backward pass).

`Probe.finish()` returns (keys, values): the static list of (unit, quantity) measured and one
float64 vector of their values. `rows()` turns them into the tidy rows of RUN/alignment/:

| quantity | what |
|---|---|
| signal_cosine, signal_angle | cosine (angle in degrees) between the unit's gradient handed to the optimiser, summed over the stages that updated it, and the true gradient |
| signal_norm_ratio | norm of that summed gradient / norm of the true gradient |
| update_cosine | cosine between the change the step made to the unit's parameters (after the optimiser) and the negative true gradient |
| error_angle | (Akrout et al.'s delta angle) angle between the error the unit received at its output and back propagation's, for a unit updated once in the step |
| feedback_angle, feedback_ratio | (BioTorch's layer alignment) angle between vec B and vec W, and norm B / norm W, over the unit's weights that have a feedback matrix of their shape |
| sg_cosine, sg_relative_error | at a synthetic-gradient interface: cosine and norm(g_hat - target) / norm(target) against the true gradient through time that arrives |

A unit is every parameter of it the loss depends on (weights and biases, flattened and joined;
a synthetic-gradient model's own parameters are not). A unit the schedule did not update in the
step gets no signal or update row. A cosine with a zero vector is NaN (undefined, not 0): a
synthetic-gradient model starts at zero, so its first predictions are. The L2 term
(`weight_decay`), which the optimiser adds the same way for every schedule, is in neither the
true gradient nor the signal; it is in the update.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

# What the traced step outputs (cosines); rows() adds the angles.
TRACED = ("signal_cosine", "signal_norm_ratio", "update_cosine", "error_cosine", "feedback_cosine",
          "feedback_ratio", "sg_cosine", "sg_relative_error")
QUANTITIES = ("signal_cosine", "signal_angle", "signal_norm_ratio", "update_cosine", "error_angle",
              "feedback_angle", "feedback_ratio", "sg_cosine", "sg_relative_error")


def _flat(tensors: list) -> tf.Tensor:
    return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)


def _norm(v):
    return tf.sqrt(tf.reduce_sum(v * v))


def _cosine(a, b):
    """<a, b> / (|a| |b|) in float64 (NaN when either is zero)."""
    return tf.reduce_sum(a * b) / (_norm(a) * _norm(b))


def angle_degrees(cosine: float) -> float:
    """(180 / pi) arccos(clip(cosine, -1, 1)); NaN stays NaN."""
    if not math.isfinite(cosine):
        return float("nan")
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


class Probe:
    """What one measured step did, read while it is traced (see the module docstring)."""

    def __init__(self, net, x, y_onehot, ctx):
        self.net, self.x, self.y_onehot, self.ctx = net, x, y_onehot, ctx
        # Read now, before the schedule runs: automatic control dependencies keep the reads
        # of a traced step in program order, so these are the values the step started from.
        self.start = [{name: tf.identity(var) for name, var in unit.items()} for unit in net.variables]
        feedback = getattr(net, "feedback", None) or [{} for _ in net.variables]
        self.feedback = [{name: tf.identity(b) for name, b in unit.items()} for unit in feedback]
        self.true_grads: dict | None = None  # unit -> {param: d_param} of full back propagation
        self.true_errors: dict = {}  # unit -> back propagation's error at the unit's output
        self.stage_grads: dict = {index: [] for index in range(net.depth)}  # unit -> one dict per update
        self.errors_used: dict = {index: [] for index in range(net.depth)}  # unit -> (error, first column) per update
        self.interfaces: dict = {}  # unit -> (g_hat, target)
        self._pending_errors: dict = {}
        self._collecting = False
        self.forwarded = False  # True when the probe had to forward the batch itself

    # ------------------------------------------------------------------ hooks
    def observe_forward(self, x, start: int, acts, caches) -> None:
        """Stepper.forward: the first full forward of the batch, before any update, gives the true gradient."""
        if self.true_grads is None and start == 0 and x is self.x and not any(self.stage_grads.values()):
            self._true_from(acts, caches)

    def saw_error(self, index: int, error, first_column: int = 0) -> None:
        """Net.backward (and the synthetic schedule): the error at unit `index`'s output that
        its next update's gradient comes from; columns before `first_column` do not reach
        the unit's parameters (the carried input of a recurrent step)."""
        if self._collecting:
            self.true_errors[index] = error
        else:
            self._pending_errors[index] = (error, first_column)

    def interface(self, index: int, predicted, target) -> None:
        """The synthetic schedule: unit `index`'s synthetic gradient and the true gradient through time that arrived for it."""
        self.interfaces[index] = (predicted, target)

    def record_update(self, index: int, grads: dict) -> None:
        """Stepper.update, before the optimiser applies `grads` to unit `index`."""
        if self.true_grads is None:  # no full forward before the first update: forward now, at the start values
            acts, caches = self.net.forward(self.x, self.ctx)
            self.forwarded = True
            self._true_from(acts, caches)
        self.stage_grads[index].append(grads)
        if index in self._pending_errors:
            self.errors_used[index].append(self._pending_errors.pop(index))

    def _true_from(self, acts, caches) -> None:
        _, d_out = self.net.loss_and_gradient(acts[-1], self.y_onehot)
        self._collecting = True
        try:
            self.true_grads, _ = self.net.backward(d_out, caches)
        finally:
            self._collecting = False

    # ------------------------------------------------------------------ the numbers
    def finish(self) -> tuple[list, tf.Tensor]:
        """(keys, values): keys a list of (unit, quantity in TRACED), values a float64 vector.
        Call after the schedule: the parameters read here are the step's result."""
        assert self.true_grads is not None, "a measured step that updated nothing"
        keys, values = [], []

        def add(index, quantity, value):
            keys.append((index, quantity))
            values.append(value)

        for index in range(self.net.depth):
            names = sorted(self.true_grads.get(index, {}))
            if not names:
                continue
            true = _flat([self.true_grads[index][n] for n in names])
            stages = self.stage_grads[index]
            if stages:
                signal = tf.add_n([_flat([grads[n] if n in grads else tf.zeros_like(self.start[index][n])
                                          for n in names]) for grads in stages])
                add(index, "signal_cosine", _cosine(signal, true))
                add(index, "signal_norm_ratio", _norm(signal) / _norm(true))
                variables = self.net.variables[index]
                change = _flat([tf.identity(variables[n]) for n in names]) - _flat([self.start[index][n] for n in names])
                add(index, "update_cosine", _cosine(change, -true))
                errors = self.errors_used[index]
                if len(stages) == 1 and len(errors) == 1 and index in self.true_errors:
                    error, first = errors[0]
                    true_error = self.true_errors[index]
                    add(index, "error_cosine", _cosine(_flat([error[:, first:]]), _flat([true_error[:, first:]])))
            pairs = [(b, self.start[index][name]) for name, b in sorted(self.feedback[index].items())
                     if name in self.start[index] and tuple(b.shape) == tuple(self.start[index][name].shape)]
            if pairs:
                feedback, forward = _flat([b for b, _ in pairs]), _flat([w for _, w in pairs])
                add(index, "feedback_cosine", _cosine(feedback, forward))
                add(index, "feedback_ratio", _norm(feedback) / _norm(forward))
            if index in self.interfaces:
                predicted, target = (_flat([t]) for t in self.interfaces[index])
                add(index, "sg_cosine", _cosine(predicted, target))
                add(index, "sg_relative_error", _norm(predicted - target) / _norm(target))
        return keys, tf.stack(values) if values else tf.zeros([0], tf.float64)


def rows(keys: list, values, step: int, epoch: int, unit_names: list) -> list[dict]:
    """The tidy rows of one measured step: one per unit x quantity (QUANTITIES), angles in degrees."""
    out = []
    names = {"error_cosine": "error_angle", "feedback_cosine": "feedback_angle"}
    for (index, quantity), value in zip(keys, np.asarray(values, dtype=np.float64)):
        value = float(value)
        base = {"step": int(step), "epoch": int(epoch), "layer": unit_names[index], "unit": int(index)}
        if quantity in names:
            out.append({**base, "quantity": names[quantity], "value": angle_degrees(value)})
            continue
        out.append({**base, "quantity": quantity, "value": value})
        if quantity == "signal_cosine":
            out.append({**base, "quantity": "signal_angle", "value": angle_degrees(value)})
    return out
