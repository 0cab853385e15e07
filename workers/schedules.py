"""Schedules: which units are updated in each stage of one training step.

A schedule is a function `(step: Stepper, x, y_onehot) -> (loss, output)` picked by
name from SCHEDULES. It calls `step.forward`, `step.net.backward` and `step.update`;
the Stepper counts forward passes, stages and per-unit updates while the step is
traced, so the counts logged are the ones the schedule really performed. Adding a
schedule touches this file and its name in workers.registry.SCHEDULES (which the
settings validate against without importing TensorFlow); a learning rule (feedback
weights in the backward) is a module of workers/rules/ instead, and its schedule comes
from there. Whether a schedule fits a model's shapes is checked at plan time
(jobs.plan.check_schedule_fits).
"""

from __future__ import annotations

from workers import dni, registry, rules


def dilation_rate(settings, epoch: int) -> float:
    """r = r0 / (1 + decay * epoch) of docs/experiments.md s2 (epoch counted from 0)."""
    return settings.dilation_rate / (1.0 + settings.dilation_decay * epoch)


def dilated_units(depth: int) -> tuple:
    """Units whose incoming gradient gets the skip from two units above: all but the
    first and the top two (celu7: layers 2, 3, 4, 5 of docs/experiments.md s2)."""
    return tuple(range(1, depth - 2))


class Stepper:
    """What a schedule works with: the net, the optimiser and counters of what it did."""

    def __init__(self, net, optimizer, ctx, lr, settings, skip_rate=None, probe=None):
        self.net, self.optimizer, self.ctx, self.lr, self.settings = net, optimizer, ctx, lr, settings
        self.skip_rate = skip_rate
        self.probe = probe  # a measured step's workers.alignment.Probe (None: not measured)
        self.updates = [0] * net.depth
        self.forward_passes = 0
        self.units_forwarded = 0
        self.stages = 0
        self.extras: dict = {}  # extra scalar metrics a schedule logs (e.g. synthetic_error)
        self.last_output = None  # unfair schedules: the output re-computed after the last stage

    def forward(self, x, start: int = 0, acts=None, caches=None):
        self.forward_passes += 1
        self.units_forwarded += self.net.depth - start
        acts, caches = self.net.forward(x, self.ctx, start=start, acts=acts, caches=caches)
        if self.probe is not None:
            self.probe.observe_forward(x, start, acts, caches)
        return acts, caches

    def loss(self, output, y_onehot):
        return self.net.loss_and_gradient(output, y_onehot)

    def update(self, grads: dict, lr=None) -> None:
        """Apply one optimiser step to each unit in `grads` (one stage), at `lr` or the step's."""
        self.stages += 1
        for index in sorted(grads):
            if self.probe is not None:
                self.probe.record_update(index, grads[index])
            self.optimizer.apply(index, grads[index], self.lr if lr is None else lr)
            self.updates[index] += 1


    def saw_error(self, index: int, error, first_column: int = 0) -> None:
        """A schedule that computes a unit's error outside Net.backward says so here (measured steps only)."""
        if self.probe is not None:
            self.probe.saw_error(index, error, first_column)

    def interface(self, index: int, predicted, target) -> None:
        """A synthetic gradient and the true gradient through time that arrived for it (measured steps only)."""
        if self.probe is not None:
            self.probe.interface(index, predicted, target)


def standard(step: Stepper, x, y_onehot):
    """Forward, backward through every unit, update every unit once."""
    acts, caches = step.forward(x)
    loss, d_out = step.loss(acts[-1], y_onehot)
    grads, _ = step.net.backward(d_out, caches)
    step.update(grads)
    return loss, acts[-1]


def unfair_back(step: Stepper, x, y_onehot):
    """Stage k = 1..n updates units n-k..n-1 (top k), back-propagating only that far, then
    re-forwards from the lowest updated unit; stage k+1 starts from the new output.
    Per batch unit i (0-based) is updated i+1 times; n+1 forward passes. The last
    re-forward is part of the schedule as docs/experiments.md defines it, but nothing reads its
    output, so inside tf.function TensorFlow prunes it (benchmarks/README.md)."""
    depth = step.net.depth
    acts, caches = step.forward(x)
    loss, d_out = step.loss(acts[-1], y_onehot)
    output = acts[-1]
    for stage in range(1, depth + 1):
        lowest = depth - stage
        if stage > 1:
            _, d_out = step.loss(acts[-1], y_onehot)
        grads, _ = step.net.backward(d_out, caches, down_to=lowest)
        step.update(grads)
        # Units below `lowest` did not change: reuse their activations and caches.
        acts, caches = step.forward(x, start=lowest, acts=acts, caches=caches)
    step.last_output = acts[-1]
    return loss, output


def unfair_front(step: Stepper, x, y_onehot):
    """Mirror image: stage k = 1..n updates units 0..k-1. Each stage back-propagates to
    the bottom (weight gradients only for the units it updates) and re-forwards fully.
    Per batch unit i is updated n-i times; n+1 forward passes (the last one unread, and
    pruned inside tf.function, as in unfair_back)."""
    depth = step.net.depth
    acts, caches = step.forward(x)
    loss, d_out = step.loss(acts[-1], y_onehot)
    output = acts[-1]
    for stage in range(1, depth + 1):
        if stage > 1:
            _, d_out = step.loss(acts[-1], y_onehot)
        grads, _ = step.net.backward(d_out, caches, down_to=0, want_grads=set(range(stage)))
        step.update(grads)
        acts, caches = step.forward(x, acts=acts, caches=caches)
    step.last_output = acts[-1]
    return loss, output


def dilated(step: Stepper, x, y_onehot):
    """Standard step whose backward adds r * upsample(gradient from two units above) to
    the incoming gradient of units 1..n-3; r = r0 / (1 + decay * epoch)."""
    acts, caches = step.forward(x)
    loss, d_out = step.loss(acts[-1], y_onehot)
    grads, _ = step.net.backward(d_out, caches, skip_units=dilated_units(step.net.depth), skip_rate=step.skip_rate)
    step.update(grads)
    return loss, acts[-1]


def adversarial(step: Stepper, x, y_onehot, dilate: bool = False):
    """Clean forward and backward to d loss/d x (no update); x_adv = x + eps * sign(d_x);
    forward on x_adv; backward and update from that pass only (Nokland 2015).
    Train metrics come from the adversarial pass."""
    import tensorflow as tf

    acts, caches = step.forward(x)
    _, d_out = step.loss(acts[-1], y_onehot)
    _, d_inputs = step.net.backward(d_out, caches, want_grads=set(), need_input_grad=True)
    x_adv = x + step.settings.adversarial_epsilon * tf.sign(d_inputs[0])
    acts, caches = step.forward(x_adv)
    loss, d_out = step.loss(acts[-1], y_onehot)
    skip_units = dilated_units(step.net.depth) if dilate else ()
    grads, _ = step.net.backward(d_out, caches, skip_units=skip_units, skip_rate=step.skip_rate)
    step.update(grads)
    return loss, acts[-1]


def adversarial_dilated(step: Stepper, x, y_onehot):
    """adversarial, with the dilated backward in the update pass."""
    return adversarial(step, x, y_onehot, dilate=True)


def synthetic(step: Stepper, x, y_onehot):
    """Decoupled neural interfaces: see workers.dni (needs model dni_rnn)."""
    return dni.synthetic_step(step, x, y_onehot)


def autodiff_standard(step: Stepper, x, y_onehot):
    """The standard step with gradients from tf.GradientTape (engine: autodiff)."""
    import tensorflow as tf

    net = step.net
    with tf.GradientTape() as tape:
        output = step.forward(x)[0][-1]
        loss = net.loss.forward(output, y_onehot)[0]
    variables = [unit for unit in net.variables]
    tape_grads = tape.gradient(loss, variables)
    # Unit parameters outside the loss (a synthetic-gradient model) get no gradient.
    grads = {index: {name: g for name, g in unit.items() if g is not None} for index, unit in enumerate(tape_grads)}
    step.update({index: unit for index, unit in grads.items() if unit})
    return loss, output


SCHEDULES = {
    "standard": standard,
    "unfair-back": unfair_back,
    "unfair-front": unfair_front,
    "adversarial": adversarial,
    "dilated": dilated,
    "adversarial+dilated": adversarial_dilated,
    "synthetic": synthetic,
    **{name: rules.schedule(name) for name in rules.RULES},  # learning rules: workers/rules/
}
assert tuple(SCHEDULES) == registry.SCHEDULES, "a schedule registered here but not in workers.registry (or the reverse)"


def tf1_unordered_reads(step: Stepper, x, y_onehot):
    """What TF1 executed for the unfair scripts (quirk adam_tf1_unordered_reads, with the
    optimiser's half in workers.optimizers.Adam): every read of w, m and v ran before any
    assign, so every stage saw the batch's starting weights. Each stage's gradient for a
    unit is then that unit's full-backward gradient, all of a unit's assigns write the same
    value, and the step reduces to one forward, one full backward and one update per unit.
    The output after the last stage equals the first pass's."""
    loss, output = standard(step, x, y_onehot)
    step.last_output = output
    return loss, output


def get_schedule(settings):
    if settings.engine == "autodiff":
        return autodiff_standard
    if "adam_tf1_unordered_reads" in settings.quirks:
        return tf1_unordered_reads
    return SCHEDULES[settings.schedule]
