"""docs/learning-rules.md stays true: its walk-through of adding a rule names only things that
exist (modules, functions, settings, tests, files, commands), and the module it shows runs
against the real code: it builds its state and takes a step."""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "learning-rules.md").read_text()
WALK_THROUGH = DOC[DOC.index("## Adding a rule"):]
EXAMPLE_PATH = "workers/rules/weight_mirror.py"  # the module the walk-through adds: must not exist yet
EXAMPLE_NAME = "weight-mirror"


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", WALK_THROUGH, flags=re.S)
    assert len(blocks) == 1, "the walk-through shows one module"
    return "\n".join(line[3:] if line.startswith("   ") else line for line in blocks[0].splitlines())


def example_module() -> types.ModuleType:
    module = types.ModuleType("weight_mirror_example")
    exec(compile(example_source(), EXAMPLE_PATH, "exec"), module.__dict__)
    return module


def resolve(dotted: str):
    """The object a dotted name (package.module.attribute...) names; raises if there is none."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.timeout(60)
def test_every_name_the_walk_through_mentions_exists():
    from jobs.cli import COMMANDS
    from workers import registry
    from workers.rules import Rule
    from workers.settings import CaseSettings

    tests_of_rules = (ROOT / "tests" / "test_rules.py").read_text()
    defined_in_example = set(re.findall(r"^(?:def |)([A-Za-z_][A-Za-z0-9_]*)\b", example_source(), flags=re.M))
    rule_fields = {field.name for field in dataclasses.fields(Rule)}
    checked = []
    for token in re.findall(r"`([^`\n]+)`", WALK_THROUGH):
        if token == EXAMPLE_PATH:
            assert not (ROOT / token).exists(), "the example rule exists: the walk-through should add another"
        elif "/" in token and " " not in token:
            assert (ROOT / token).exists(), f"{token}: no such file"
        elif token.startswith("bplab "):
            assert token.split()[1] in COMMANDS, f"{token}: no such command"
        elif token in (f'"{EXAMPLE_NAME}"', "RULE = Rule(...)"):
            assert EXAMPLE_NAME not in registry.RULES
        elif token.startswith(("workers.", "jobs.")):
            resolve(token)
        elif token.startswith("test_"):
            assert f"def {token}(" in tests_of_rules, f"{token}: no such test in tests/test_rules.py"
        elif token in rule_fields or token in CaseSettings.model_fields or token in defined_in_example:
            pass
        else:
            raise AssertionError(f"the walk-through mentions `{token}`, which this test does not know how to check")
        checked.append(token)
    assert {"workers.rules.Rule", "workers.registry.RULES", "after_step", "sign_feedback",
            "test_one_step_equals_the_papers_equations"} <= set(checked)


@pytest.mark.timeout(120)
def test_the_walk_through_module_builds_its_state_and_takes_a_step():
    """The example against the real hooks: B starts random and after steps points closer to W."""
    import tensorflow as tf

    from workers import models, optimizers, rules, schedules
    from workers.engine import Net
    from workers.layers import Context
    from workers.rules import Rule
    from workers.settings import CaseSettings

    module = example_module()
    rule = module.RULE
    assert isinstance(rule, Rule) and rule.name == EXAMPLE_NAME and rule.after_step is not None
    settings = CaseSettings(model="mlp", hidden=(16,), schedule="feedback-alignment", optimizer="sgd", lr=0.05,
                            weight_decay=0.5)
    model = models.build_model(settings, (8, 8), 10)
    assert rule.fits(settings, model) is None
    conv = CaseSettings(model="dcn", width=0.1)
    assert "conv" in rule.fits(conv, models.build_model(conv, (28, 28, 1), 10))
    params = model.init_params(0, np.float64)
    state = [rule.make_state(model, i, p, settings, np.random.default_rng(i)) for i, p in enumerate(params)]
    net = Net(model, params, dtype=tf.float64, rule_state=state)
    optimizer = optimizers.make_optimizer(settings, net)
    rng = np.random.default_rng(1)

    def angle(a, b):
        a, b = a.ravel(), b.ravel()
        return np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))

    before = angle(net.rule_state[0]["w"].numpy(), net.variables[0]["w"].numpy())
    for step in range(20):
        stepper = schedules.Stepper(net, optimizer, Context(training=True, seed=tf.constant([0, step], tf.int64)),
                                    tf.constant(0.05, tf.float64), settings)
        x = tf.constant(rng.normal(size=(8, 8, 8)))
        y = tf.one_hot(rng.integers(0, 10, 8), 10, dtype=tf.float64)
        rules.step(rule, stepper, x, y)
    after = angle(net.rule_state[0]["w"].numpy(), net.variables[0]["w"].numpy())
    assert before > 80 and after < before - 10, (before, after)
