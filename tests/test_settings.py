"""Settings: validation, defaults and the published suite schema (the ids of the built-in
suites are pinned in tests/test_names.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from workers import settings as settings_module
from workers.settings import CaseSettings, DataSpec

ROOT = Path(__file__).resolve().parents[1]

# The case ids of the built-in suites are pinned in tests/test_names.py (a changed id would
# make `bplab run --resume` start every case of an existing run again).

# Every default, pinned. A case id leaves out the settings at their defaults, so a default is
# part of what every id means: changing one here must come with its OLD value entered in
# workers.settings.ID_DEFAULTS (the cases that leave it unset then get new ids, the others keep
# theirs). A new setting is pinned here with its default.
DEFAULT_DICT = json.loads(
    '{"model": "allconv9", "width": 1.0, "hidden": [50], "activation": "default", "init": "default", '
    '"init_std": 0.05, "dropout": 0.0, "data": {"name": "digits", "path": null, "classes": null, "train_size": null, '
    '"test_size": null, "resize": null, "standardize": "none", "noise": 0.1, "samples": 1000}, "augment": false, '
    '"schedule": "standard", "engine": "manual", "optimizer": "adam", "lr": 0.0001, "lr_schedule": "constant", '
    '"lr_decay": 0.1, "lr_decay_epochs": 10, "beta1": 0.9, "beta2": 0.9, "epsilon": 1e-08, "weight_decay": 0.0, '
    '"batch_size": 10, "epochs": 10, "seed": 678, "adversarial_epsilon": 0.1, "dilation_rate": 0.5, '
    '"dilation_decay": 0.05, "synthetic_lr": 0.0001, "recurrent_lr": 1e-06, "steps_per_epoch": null, '
    '"layer_stats_every": 0, "eval_every": 1, "quirks": [], "feedback_init": "xavier", "sign_feedback": "usf", "alignment_every": 0, "compile": "auto", "graph_optimizer": "auto"}')


@pytest.mark.timeout(30)
def test_every_default_is_pinned():
    settings = CaseSettings()
    assert json.loads(json.dumps(settings.to_dict(), default=list)) == DEFAULT_DICT, (
        "a default changed or a setting was added: pin it in DEFAULT_DICT (a changed default also goes "
        "into workers.settings.ID_DEFAULTS with its old value)")
    assert list(settings.to_dict()) == list(DEFAULT_DICT)  # the order of the cases table's columns
    assert settings_module.ID_DEFAULTS == {}  # no default has changed since ids left defaults out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.mark.timeout(30)
def test_digest_hashes_the_settings_that_differ_from_their_defaults():
    # the hashed text written out by hand: sorted keys, JSON lists for tuples, data nested
    assert CaseSettings().digest() == _sha('{"data": "", "settings": {}}')
    assert CaseSettings().digest("fp") == _sha('{"data": "fp", "settings": {}}')
    other = CaseSettings(model="mlp", hidden=(7, 5), quirks=("elu_derivative_two",), lr=1e-4, beta2=0.9,
                         data=DataSpec(name="mnist", classes=(0, 1), resize=32, noise=0.1))
    assert other.digest("fp") == _sha('{"data": "fp", "settings": {"data": {"classes": [0, 1], "name": "mnist", '
                                      '"resize": 32}, "hidden": [7, 5], "model": "mlp", '
                                      '"quirks": ["elu_derivative_two"]}}')
    # a setting written at its default is the default: the same case, the same id
    spelled = settings_module.from_dict({"lr": 0.0001, "data": {"name": "digits", "samples": 1000}, "eval_every": 1})
    assert spelled.digest("x") == CaseSettings().digest("x")
    assert other.to_dict()["hidden"] == (7, 5) and other.to_dict()["data"]["classes"] == (0, 1)
    assert "eval_every" in CaseSettings().to_dict()  # stored settings hold every field


@pytest.mark.timeout(30)
def test_a_changed_default_moves_only_the_ids_of_the_cases_that_leave_it_unset(monkeypatch):
    from pydantic import create_model

    old = {"unset": CaseSettings(), "old value": CaseSettings(lr=1e-4), "other": CaseSettings(lr=0.5, seed=3)}
    before = {key: value.digest("fp") for key, value in old.items()}
    new_default = create_model("CaseSettings", __base__=CaseSettings, lr=(float, 1e-3))
    monkeypatch.setitem(settings_module.ID_DEFAULTS, "lr", 1e-4)  # what the change must come with
    after = {"unset": new_default(), "old value": new_default(lr=1e-4), "other": new_default(lr=0.5, seed=3)}
    assert after["unset"].lr == 1e-3
    assert after["unset"].digest("fp") == _sha('{"data": "fp", "settings": {"lr": 0.001}}') != before["unset"]
    assert after["old value"].digest("fp") == before["old value"] == before["unset"]
    assert after["other"].digest("fp") == before["other"]
    # settings stored before the setting existed read back with the value they ran with
    monkeypatch.setattr(settings_module, "CaseSettings", new_default)
    stored = json.loads(json.dumps(CaseSettings(seed=3).to_dict(), default=list))
    del stored["lr"]
    assert settings_module.from_json(stored).lr == 1e-4
    assert settings_module.from_dict({}).lr == 1e-3


# ---------------------------------------------------------------------- validation


@pytest.mark.timeout(30)
@pytest.mark.parametrize("values, message", [
    ({"schedule": "sideways"}, "where.schedule: unknown schedule 'sideways'; expected one of standard, unfair-back"),
    ({"lr": -0.001}, "where.lr: must be > 0, got -0.001"),
    ({"epochs": "3"}, "where.epochs: expected an integer, got '3'"),
    ({"epochs": True}, "where.epochs: expected an integer, got True"),
    ({"lr": True}, "where.lr: expected a number, got True"),
    ({"augment": 1}, "where.augment: expected true or false, got 1"),
    ({"hidden": [3, 0]}, "where.hidden[1]: must be >= 1, got 0"),
    ({"hidden": []}, "where.hidden: expected at least 1 value(s)"),
    ({"seed": 2 ** 31}, "where.seed: must be < 2147483648"),
    ({"data": {"name": "mnist", "resize": 2048}}, "where.data.resize: must be <= 1024, got 2048"),
    ({"data": {"classes": [1, 1]}}, "where.data.classes: repeated label"),
    ({"data": {"nam": "mnist"}}, "where.data.nam: unknown setting (did you mean 'name'?)"),
    ({"optimiser": "sgd"}, "where.optimiser: unknown setting (did you mean 'optimizer'?)"),
    ({"quirks": ["nope"]}, "where.quirks[0]: unknown quirk 'nope'"),
    ({"engine": "autodiff", "schedule": "unfair-back"}, "where.engine: autodiff runs the standard schedule only"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(values, message):
    with pytest.raises(settings_module.SettingsError) as error:
        settings_module.from_dict(values, where="where")
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.timeout(30)
def test_yaml_values_are_read_as_before():
    settings = settings_module.from_dict({"lr": "1e-3", "width": 1, "hidden": 7, "quirks": "elu_derivative_two",
                                          "data": "mnist", "seed": 2 ** 31 - 1})
    assert settings.lr == 1e-3 and isinstance(settings.width, float) and settings.width == 1.0
    assert settings.hidden == (7,) and settings.quirks == ("elu_derivative_two",)
    assert settings.data == DataSpec("mnist") == DataSpec(name="mnist")
    assert settings_module.from_json(json.loads(json.dumps(settings.to_dict(), default=list))) == settings


@pytest.mark.timeout(60)
def test_settings_are_frozen_and_hashable():
    a, b = settings_module.from_dict({"data": {"name": "moons", "samples": 50}}), CaseSettings(data=DataSpec("moons", samples=50))
    assert a == b and hash(a) == hash(b) and {a.data: 1}[b.data] == 1
    with pytest.raises(Exception):
        a.lr = 1.0  # frozen


@pytest.mark.timeout(120)
def test_largest_seed_works_in_numpy_and_tensorflow():
    import numpy as np
    import tensorflow as tf

    seed = settings_module.from_dict({"seed": settings_module.SEED_LIMIT - 1}).seed
    np.random.default_rng([seed, 0x1417]).standard_normal(2)
    for dtype in (tf.int32, tf.int64):
        tf.random.stateless_uniform((2,), seed=tf.constant([seed, 1], dtype))


# The suite schema and the loader's agreement with it: tests/test_suite_schema.py.


# ---------------------------------------------------------------------- one registry per kind


@pytest.mark.timeout(120)
def test_every_registered_name_has_an_implementation():
    """Names the modules themselves check at import (models, schedules, optimizers and
    activations against workers.registry) are not checked again; here, what they do not."""
    from workers import gradcheck, models, optimizers, registry
    from workers.data import DataError, load_dataset

    assert set(gradcheck.CHECK_CONFIGS) == set(registry.MODELS)  # every model is gradient-checked
    for name in registry.MODELS:  # and builds (no TensorFlow) at its checked configuration
        config, shape, classes = gradcheck.CHECK_CONFIGS[name]
        assert models.build_model(CaseSettings(model=name, **config), shape, classes).unit_names
    for name in registry.LR_SCHEDULES:
        optimizers.learning_rate(CaseSettings(lr_schedule=name), 3)
    for name in registry.INITS:
        assert models._init_for(CaseSettings(init=name), ("default", 0.0))[0] == name
    for name in registry.DATASETS:  # loads, or asks for its files: never an unknown name
        try:
            load_dataset(DataSpec(name, path="/nonexistent/bplab-test", samples=20))
        except DataError as error:
            assert name in str(error)
    assert set(registry.QUIRK_DOCS) == set(registry.QUIRKS) and set(registry.GRADIENT_QUIRKS) <= set(registry.QUIRKS)
    assert settings_module.QUIRKS is registry.QUIRKS


@pytest.mark.timeout(120)
def test_settings_and_planner_import_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import jobs.plan, jobs.suites, workers.settings, workers.registry, workers.models, "
            "workers.schedules; assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=100)
