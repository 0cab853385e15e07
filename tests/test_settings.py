"""Settings: case ids and digests pinned (existing runs must resume), validation, the
published suite schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import plan, suites
from workers import settings as settings_module
from workers.settings import CaseSettings, DataSpec

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- pinned ids
#
# Computed once on the dataclass settings (before the move to pydantic) and never to be
# edited by hand: a case id names a case's folder, ledger entry and checkpoints, so a
# changed id would make `bplab run --resume` start every case of an existing run again.
# Suites whose data ships with the code (digits, moons): the full case id of
# jobs.plan.make_plan (name + digest of settings and data fingerprint).
CASE_IDS = {
    'adversarial-quick': [
        'standard-bc1273d210',
        'adv-b5e12c83c7',
        'dilated-791418fc94',
        'adv-dilated-021631bbe7',
        'nokland-a069fd8d00',
    ],
    'dcn-quick': [
        'dcn-228eae29bc',
        'tanh-b0d221a2ca',
        'momentum-67eb30c9a5',
    ],
    'dni-quick': [
        'synthetic-93ff94a92c',
        'bptt-057fae7a00',
        'autodiff-0e0c99c335',
    ],
    'moons': [
        'h3-act_tanh-e92042179c',
        'h3-act_sigmoid-168d82b2ef',
        'h3-act_relu-20090064b7',
        'h5-act_tanh-921e889ee7',
        'h5-act_sigmoid-918fb0a725',
        'h5-act_relu-14db940e15',
        'h8-act_tanh-6ef76228c3',
        'h8-act_sigmoid-cf73273c91',
        'h8-act_relu-dffb684834',
        'h50-act_tanh-4b5d4ac953',
        'h50-act_sigmoid-7ed80f62ac',
        'h50-act_relu-89b17d937e',
        'deep-act_tanh-d4c44803e7',
        'deep-act_sigmoid-3ea16f37d5',
        'deep-act_relu-8fa2116bec',
    ],
    'moons-quick': [
        'tanh-h3-a7d2e75dee',
        'relu-h50-7a71761996',
        'deep-a1400d8bdd',
    ],
    'quick': [
        'a-91da269b0b',
        'b-ea61d796a6',
        'c-446314ae43',
        'd-161e1c9364',
        'e-4951556321',
        'f-e1629a3783',
    ],
    'unfair-source-quick': [
        'a-1ce078b32a',
        'a-src-e9ef96858d',
        'b-250f13aa42',
        'b-src-a241e53900',
        'c-7daad02ef6',
        'c-src-27945adc79',
        'd-492cf5637c',
        'd-src-d1973da503',
        'e-44dea96582',
        'e-src-c8f9de9044',
        'f-19773ead95',
        'f-src-ca90fae7af',
    ],
}

# Suites needing MNIST or CIFAR-10 files: CaseSettings.digest() without a data fingerprint.
DIGESTS = {
    'adversarial': {'adv-a': '59149d77e13c', 'adv-b': 'c6f7e7dc82aa', 'adv-c': '8aee27008e28', 'nokland': '5e64986fa34a'},
    'dcn': {'dcn': '53e52eb9546c', 'tanh': '52664300f7f8', 'xavier': '6680fce5bf95', 'sgd': '3fde28b09a6c', 'momentum': 'cc129485cb70'},
    'dni': {'mnist-synthetic': '493702c43fad', 'mnist-bptt': '97ede9a906d0', 'mnist-autodiff': 'db1dd1ef86d6', 'digits-synthetic': 'f6e39823c732', 'digits-bptt': '1ad457fb6d4b', 'digits-autodiff': 'e15772c6cc47'},
    'unfair': {'a': 'b6635b8e173c', 'b': '41250a034fb5', 'c': 'e683f7dc3b6c', 'd': 'd342cc9eb494', 'e': 'f700e839082d', 'f': '649a9eeaa953'},
    'unfair-source': {'a': 'b6635b8e173c', 'a-src': '2ebb16d01396', 'b': '41250a034fb5', 'b-src': 'fa3886259d5e', 'c': 'e683f7dc3b6c', 'c-src': 'b829be6b522d', 'd': 'd342cc9eb494', 'd-src': '981ced877d84', 'e': 'f700e839082d', 'e-src': 'a0311806d3b3', 'f': '649a9eeaa953', 'f-src': 'c7c78b4c3fb9'},
}


# The source-reproduction suites, re-pinned when their -src cases were checked line by line against
# the original scripts (docs/experiments.md) and the -tf1 and adversarial-source cases were added.
CASE_IDS.update({'unfair-source-quick': ['a-1ce078b32a', 'a-src-e88e2c131a', 'b-250f13aa42', 'b-src-ee9c24bebe', 'c-7daad02ef6', 'c-src-334ae7f82a', 'c-tf1-ab8cb0c8e7', 'd-492cf5637c', 'd-src-a0aff61f9e', 'd-tf1-23746b77dd', 'e-44dea96582', 'e-src-8039964604', 'e-tf1-55fcb533de', 'f-19773ead95', 'f-src-8981c541d8', 'f-tf1-ddbe546b0c'], 'adversarial-source-quick': ['adv-a-5555708b0b', 'adv-a-src-50fc70a97f', 'adv-b-abfdf22562', 'adv-b-src-b8dce9c734', 'adv-c-82e55e39cd', 'adv-c-src-67208c2166']})
DIGESTS.update({'unfair-source': {'a': 'b6635b8e173c', 'a-src': '4e734bda5e2a', 'b': '41250a034fb5', 'b-src': '31ad9dc49006', 'c': 'e683f7dc3b6c', 'c-src': '46ca0ad78b28', 'c-tf1': '8be7a4518708', 'd': 'd342cc9eb494', 'd-src': '43f3853d6519', 'd-tf1': 'f8b151871d32', 'e': 'f700e839082d', 'e-src': 'e4fe9dba0d52', 'e-tf1': '05bdf90397f6', 'f': '649a9eeaa953', 'f-src': 'dc34a3a9ad33', 'f-tf1': '73837613d656'}, 'adversarial-source': {'adv-a': '59149d77e13c', 'adv-a-src': 'ad1ae343a6ba', 'adv-b': 'c6f7e7dc82aa', 'adv-b-src': 'fd0e00823c68', 'adv-c': '8aee27008e28', 'adv-c-src': 'd94e2cefdf8c'}})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(CASE_IDS))
def test_case_ids_of_builtin_suites_with_embedded_data_are_pinned(name):
    suite = suites.load_suite(name)
    planned = plan.make_plan(suite, plan.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)
    assert [p.case_id for p in planned] == CASE_IDS[name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_settings_digests_of_builtin_suites_needing_files_are_pinned(name):
    suite = suites.load_suite(name)
    assert {c.name: c.settings.digest() for c in suite.cases} == DIGESTS[name]


def test_every_builtin_suite_is_pinned():
    assert set(CASE_IDS) | set(DIGESTS) == set(suites.builtin_names())


DEFAULT_DICT = json.loads(
    '{"model": "allconv9", "width": 1.0, "hidden": [50], "activation": "default", "init": "default", '
    '"init_std": 0.05, "dropout": 0.0, "data": {"name": "digits", "path": null, "classes": null, "train_size": null, '
    '"test_size": null, "resize": null, "standardize": "none", "noise": 0.1, "samples": 1000}, "augment": false, '
    '"schedule": "standard", "engine": "manual", "optimizer": "adam", "lr": 0.0001, "lr_schedule": "constant", '
    '"lr_decay": 0.1, "lr_decay_epochs": 10, "beta1": 0.9, "beta2": 0.9, "epsilon": 1e-08, "weight_decay": 0.0, '
    '"batch_size": 10, "epochs": 10, "seed": 678, "adversarial_epsilon": 0.1, "dilation_rate": 0.5, '
    '"dilation_decay": 0.05, "synthetic_lr": 0.0001, "recurrent_lr": 1e-06, "steps_per_epoch": null, '
    '"layer_stats_every": 0, "quirks": []}')


def test_default_settings_dict_and_digest_are_pinned():
    settings = CaseSettings()
    assert json.loads(json.dumps(settings.to_dict(), default=list)) == DEFAULT_DICT
    assert list(settings.to_dict()) == list(DEFAULT_DICT)  # the order of the cases table's columns
    assert settings.digest() == "0dba00524371"
    assert settings.digest("fp") == "7f28c296d3db"
    other = CaseSettings(model="mlp", hidden=(7, 5), quirks=("elu_derivative_two",),
                         data=DataSpec(name="mnist", classes=(0, 1), resize=32))
    assert other.digest() == "dd34921bda50"
    assert other.to_dict()["hidden"] == (7, 5) and other.to_dict()["data"]["classes"] == (0, 1)


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


# ---------------------------------------------------------------------- the suite schema


@pytest.mark.timeout(30)
def test_checked_in_schema_is_the_generated_one():
    assert json.loads((ROOT / "docs" / "suite.schema.json").read_text()) == settings_module.suite_schema(), (
        "docs/suite.schema.json is stale: regenerate it with `bplab schema > docs/suite.schema.json`")


@pytest.mark.timeout(30)
def test_bplab_schema_prints_it(capsys):
    from jobs.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == settings_module.suite_schema()


def _schema_errors(document) -> list[str]:
    """Errors of `document` against the published schema (jsonschema if installed, else the pydantic model)."""
    try:
        import jsonschema
    except ImportError:
        from pydantic import ValidationError

        try:
            settings_module.SuiteFile.model_validate(document)
        except ValidationError as error:
            return [str(e) for e in error.errors()]
        return []
    validator = jsonschema.Draft202012Validator(settings_module.suite_schema())
    return [error.message for error in validator.iter_errors(document)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", suites.builtin_names())
def test_every_builtin_suite_file_validates_against_the_schema(name):
    import yaml

    document = yaml.safe_load((suites.SUITE_DIR / f"{name}.yaml").read_text())
    assert _schema_errors(document) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", [
    {"defaults": {"schedule": "sideways"}},
    {"defaults": {"learning_rate": 0.1}},
    {"cases": {"a": {"lr": -1}}},
    {"cases": {"a b": {}}},
    {"grid": {"epoch": [1, 2]}},
    {"grid": {"seed": []}},
    {"default": {}},
    {"cases": {"a": {"data": {"name": "mnist", "resize": 0}}}},
])
def test_the_schema_refuses_what_the_loader_refuses(change):
    import yaml

    document = {**yaml.safe_load((suites.SUITE_DIR / "quick.yaml").read_text()), **change}
    assert _schema_errors(document), change


# ---------------------------------------------------------------------- one registry per kind


@pytest.mark.timeout(120)
def test_every_registered_name_has_an_implementation():
    from workers import gradcheck, layers, models, optimizers, registry, schedules
    from workers.data import DataError, load_dataset

    assert tuple(models.MODELS) == registry.MODELS and set(gradcheck.CHECK_CONFIGS) == set(registry.MODELS)
    assert tuple(schedules.SCHEDULES) == registry.SCHEDULES
    assert tuple(optimizers.OPTIMIZERS) == registry.OPTIMIZERS
    assert tuple(layers.ACTIVATIONS) == registry.ACTIVATIONS
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
