"""Learning rules: what a unit hands down in place of back propagation's d_y W^T.

A rule is one module in this package that defines `RULE = Rule(...)`: its schedule name
(also listed in workers.registry.RULES, the leaf list the settings validate against), how
its state is made (`make_state`: NumPy arrays per unit, drawn from the case seed), how that
state changes in a step (`update` in place of the plain optimiser step, `after_step` once
the weights have changed), and, for a rule that does not pass the error down unit by unit,
`direct` (the gradient each unit receives at its output). Between steps (and so in every
checkpoint) the state is the one the next step uses. The modules are found by name:
adding a rule is one module here and its name in workers.registry.RULES
(docs/learning-rules.md walks through one).

The state lives in `Net.rule_state` (tf.Variables, checkpointed with the weights and the
optimiser state, workers.trainer); an entry named after a weight that carries the
gradient down (`Unit.feedback_names`, e.g. "w") is that unit's feedback weights B, which
`Net.backward` hands to the op (workers.layers) that computes d_x. No TensorFlow is
imported here or at a rule module's import: the driver checks at plan time whether a rule
fits a model (`check_fits`).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from workers import registry

STATE_SALT = 0xFEEDB  # the rule state's random stream: (seed, STATE_SALT, unit index)


@dataclass(frozen=True)
class Rule:
    """A learning rule, by its hooks (each called while the step is traced)."""

    name: str
    """The schedule name (workers.registry.RULES)."""
    summary: str
    """One line: what goes down instead of d_y W^T."""
    make_state: Callable
    """(model, index, params, settings, rng) -> {name: NumPy array} for unit `index`: a
    weight's name (e.g. "w") for its feedback weights B, any other name for other state.
    `params` are the unit's initial forward parameters, `rng` a NumPy Generator of its own."""
    after_step: Optional[Callable] = None
    """(step) -> None: set the state for the next step, from the weights this step left."""
    direct: Optional[Callable] = None
    """(step, d_out, acts) -> {unit: gradient at its output}: units that receive their
    error directly (Net.backward's `direct`), not from the unit above."""
    update: Optional[Callable] = None
    """(step, grads) -> None: apply the step's gradients (default: step.update(grads))."""
    fits: Optional[Callable] = None
    """(settings, model) -> None or a reason the rule cannot run on this model (plan time)."""


def is_rule(schedule: str) -> bool:
    return schedule in RULES


def initial_state(settings, model, params: list[dict], seed: int, dtype=np.float32) -> list[dict]:
    """The rule's state per unit at the start of a case ({} per unit for a schedule that is
    no rule): a pure function of the seed, each unit from its own stream."""
    rule = RULES.get(settings.schedule)
    if rule is None:
        return [{} for _ in model.units]
    state = []
    for index, unit_params in enumerate(params):
        rng = np.random.default_rng([seed, STATE_SALT, index])
        arrays = rule.make_state(model, index, unit_params, settings, rng)
        state.append({name: np.asarray(value).astype(dtype) for name, value in arrays.items()})
    return state


def step(rule: Rule, stepper, x, y_onehot):
    """One training step under `rule`: forward, backward through Net.backward with the
    feedback weights (and the direct errors), update, then the state for the next step."""
    acts, caches = stepper.forward(x)
    loss, d_out = stepper.loss(acts[-1], y_onehot)
    direct = rule.direct(stepper, d_out, acts) if rule.direct is not None else None
    grads, _ = stepper.net.backward(d_out, caches, direct=direct, use_feedback=True)
    if rule.update is not None:
        rule.update(stepper, grads)
    else:
        stepper.update(grads)
    if rule.after_step is not None:
        rule.after_step(stepper)
    return loss, acts[-1]


def schedule(name: str) -> Callable:
    """The schedule function `(step, x, y_onehot) -> (loss, output)` of rule `name`."""
    rule = RULES[name]

    def rule_step(stepper, x, y_onehot):
        return step(rule, stepper, x, y_onehot)

    rule_step.__name__ = rule_step.__qualname__ = name.replace("-", "_")
    rule_step.__doc__ = f"{name}: {rule.summary}"
    return rule_step


def carries_feedback(model) -> Optional[str]:
    """None if every unit with weights has an op that computes d_x from weights a rule can
    replace (dense, conv); else the reason."""
    for unit in model.units:
        op = unit.param_op
        if op is not None and not op.feedback_names:
            return (f"{model.name}'s unit {unit.name} ({op!r}) has no feedback hook; learning rules run on "
                    "models of dense and conv units (mlp, dcn, allconv9, celu7)")
    return None


def check_fits(settings, model) -> Optional[str]:
    """Why the case's rule cannot run on `model` (None: it can, or the schedule is no rule)."""
    rule = RULES.get(settings.schedule)
    if rule is None:
        return None
    reason = carries_feedback(model)
    if reason is None and rule.fits is not None:
        reason = rule.fits(settings, model)
    return None if reason is None else f"schedule {rule.name}: {reason}"


def feedback_weights(model, index: int, rng, kind: str) -> dict:
    """Fixed random B of each gradient-carrying weight's shape of unit `index` (kind:
    workers.registry.FEEDBACK_INITS)."""
    from workers.models import draw_weights

    op = model.units[index].param_op
    if op is None:
        return {}
    shapes = op.param_shapes()
    return {name: draw_weights(rng, kind, shapes[name]) for name in op.feedback_names}


def _discover() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        rule = getattr(module, "RULE", None)
        assert isinstance(rule, Rule), f"workers/rules/{info.name}.py defines no RULE = Rule(...)"
        assert rule.name not in found, f"two rules named {rule.name}"
        found[rule.name] = rule
    return {name: found[name] for name in registry.RULES if name in found} | found


RULES: dict = _discover()
assert tuple(RULES) == registry.RULES, (
    f"rules in workers/rules/ {sorted(RULES)} and workers.registry.RULES {sorted(registry.RULES)} differ")
