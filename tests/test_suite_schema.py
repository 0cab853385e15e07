"""One truth for suite files: the loader (jobs.suites) validates a document with the pydantic
model (workers.settings.SuiteFile) the published JSON schema (docs/suite.schema.json) is
generated from. Some thousand suite documents, each a valid one with one thing changed, go
to both: the loader (written to a file, read by `load_suite`) and the schema (jsonschema); they
must refuse the same ones, apart from what a JSON schema cannot say (listed with the reason)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs import suites
from workers import settings as settings_module
from workers.settings import CaseFields, DataSpec

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "base", "description": "two small cases",
        "defaults": {"model": "mlp", "data": {"name": "moons", "samples": 40}, "epochs": 1},
        "cases": {"a": {}, "b": {"lr": 0.1}}}

# Values tried for every setting: wrong types, bounds, names of other kinds, lists and mappings.
VALUES = ["x", "", -1, 0, 1, 2, 10, 1024, 1025, 2 ** 31, -0.5, 0.5, 1.5, 1.0, True, False, None, [], [1], [1, 1],
          [0, 1], [8, 8], [-3], {}, {"a": 1}, "default", "tanh", "mnist", "digits", "unfair-back", "synthetic",
          "autodiff", "sgd", "elu_derivative_two", ["elu_derivative_two"], ["test_set_own_statistics"], "1e-3",
          "-1e-3", "nan"]
GRID_VALUES = ["x", -1, 0, 0.5, 1.0, None, [1], {"a": 1}, "1e-3", "tanh"]  # a grid's values are checked as the setting
NAMES = ["ok", "a.b_c-d", "1", "a+b", "a b", "a/b", "-a", ".a", "é", "a" * 100, "a" * 101, ""]

# What a JSON schema cannot say, each with the reason; any other disagreement fails the test.
RULE_TEXTS = ("runs the standard schedule only", "changes a hand-written backward", "need model dni_rnn",
              "augment needs", "needs optimizer", "needs data.standardize", "BPLAB_FORCE_LONG")


def loader_only(message: str, value) -> str | None:
    """Why the loader may refuse what the schema accepts, or None."""
    if any(text in message for text in RULE_TEXTS):
        return "a rule between settings, checked per expanded case (after defaults, grids and --set are merged)"
    if "expected an integer, got" in message and isinstance(value, float) and value.is_integer():
        return "JSON has one number type and counts 1.0 as an integer; YAML and the settings tell 1 from 1.0"
    if "two cases are both named" in message:
        return "a grid point listed twice names two cases alike (after the suite's and the case's grids are combined)"
    return None


def schema_only(value) -> str | None:
    """Why the schema may refuse what the loader accepts, or None."""
    if isinstance(value, str):
        try:
            float(value)
            return ("a number PyYAML (YAML 1.1) reads as a string (1e-3 without a dot); the loader takes it as the "
                    "number, an editor (YAML 1.2) reads a number and the schema checks it as one")
        except ValueError:
            pass
    return None


def documents():
    """(label, document, the value changed) for every change tried."""
    for name in CaseFields.model_fields:
        for value in VALUES:
            yield f"defaults.{name}={value!r}", {**BASE, "defaults": {**BASE["defaults"], name: value}}, value
        for value in GRID_VALUES:
            yield f"grid.{name}=[{value!r}]", {**BASE, "grid": {name: [value]}}, value
        yield f"grid.{name} not a list", {**BASE, "grid": {name: 3}}, 3
        yield f"grid.{name} empty", {**BASE, "cases": {"a": {"grid": {name: []}}}}, []
    for name in DataSpec.model_fields:
        for value in VALUES:
            data = {**BASE["defaults"]["data"], name: value}
            yield f"data.{name}={value!r}", {**BASE, "defaults": {**BASE["defaults"], "data": data}}, value
    for value in NAMES:
        yield f"case name {value!r}", {**BASE, "cases": {value: {}}}, value
        yield f"suite name {value!r}", {**BASE, "name": value}, value
    for key in ("name", "description", "reference", "defaults", "grid", "cases"):
        for value in (None, 5, "x", [], {}, {"a": None}, {"a": 5}, {"seed": [1, 2]}):
            yield f"{key}={value!r}", {**BASE, key: value}, value
    for value in ({"a": {"grid": {}}}, {"a": {"grid": {"seed": [3]}}}, {"a": {"gird": {"lr": [1]}}}, {"a": None},
                  {"a": {"grid": {"lr": [0.1, 0.1]}}}, {"a": {"lr": 0.1, "grid": {"lr": [0.2]}}}):
        yield f"cases={value!r}", {**BASE, "cases": value}, value
    yield "grid and case grid on one key", {**BASE, "grid": {"seed": [1, 2]}, "cases": {"a": {"grid": {"seed": [3]}}}}, 3
    yield "unknown top-level key", {**BASE, "default": {}}, {}
    yield "a list", [BASE], [BASE]
    yield "empty", None, None


def loader_verdict(document, folder: Path) -> str | None:
    """The loader's one-line error for `document` written as a suite file, or None if it loads."""
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    try:
        suites.load_suite(str(path))
    except suites.SuiteError as error:
        assert "\n" not in str(error)
        return str(error)
    return None


@pytest.mark.timeout(300)
def test_the_loader_and_the_schema_refuse_the_same_documents(tmp_path):
    validator = jsonschema.Draft202012Validator(settings_module.suite_schema())
    counts = {"both refuse": 0, "both accept": 0, "loader only, by rule": 0, "schema only, by rule": 0}
    disagree = []
    for label, document, value in documents():
        loader = loader_verdict(document, tmp_path)
        schema = next(iter(validator.iter_errors(document)), None)
        if (loader is None) == (schema is None):
            counts["both accept" if loader is None else "both refuse"] += 1
        elif loader is not None and loader_only(loader, value):
            counts["loader only, by rule"] += 1
        elif schema is not None and schema_only(value):
            counts["schema only, by rule"] += 1
        else:
            disagree.append(f"{label}: loader {'accepts' if loader is None else 'refuses: ' + loader}; "
                            f"schema {'accepts' if schema is None else 'refuses: ' + schema.message[:120]}")
    assert not disagree, f"{len(disagree)} disagreements:\n" + "\n".join(disagree[:40])
    # the changes reach both sides of every field: many refusals, many acceptances
    assert counts["both refuse"] > 1000 and counts["both accept"] > 250, counts


@pytest.mark.timeout(60)
def test_a_refusal_is_one_line_naming_the_file_the_case_and_the_field(tmp_path):
    cases = {
        "case a.lr: must be > 0, got -1.0": {**BASE, "cases": {"a": {"lr": -1}}},
        "defaults.epoch: unknown setting (did you mean 'epochs'?)": {**BASE, "defaults": {"epoch": 3}},
        "grid.lr[1]: must be > 0, got -1.0": {**BASE, "grid": {"lr": [0.1, -1]}},
        "grid.epoch: unknown setting (did you mean 'epochs'?)": {**BASE, "grid": {"epoch": [1]}},
        "case a: grid.seed: expected a non-empty list of values": {**BASE, "cases": {"a": {"grid": {"seed": []}}}},
        "case a+b: a case name may hold letters, digits and _ . - only": {**BASE, "cases": {"a+b": {}}},
        "case aaaaaaaaaa": {**BASE, "cases": {"a" * 101: {}}},
        "(101 characters): a case name may be at most 100 characters, not 101": {**BASE, "cases": {"a" * 101: {}}},
        "case a.data.classes: repeated label": {**BASE, "cases": {"a": {"data": {"classes": [1, 1]}}}},
        "unknown top-level key 'default' (did you mean 'defaults'?); expected cases, defaults, description, grid, name, reference":
            {**BASE, "default": {}},
        "unknown top-level key 'case' (did you mean 'cases'?)": {k: v for k, v in {**BASE, "case": BASE["cases"]}.items() if k != "cases"},
        "'cases' must be a non-empty mapping of case name -> settings": {**BASE, "cases": {}},
        "case a.schedule: synthetic gradients need model dni_rnn": {**BASE, "cases": {"a": {"schedule": "synthetic"}}},
    }
    for expected, document in cases.items():
        verdict = loader_verdict(document, tmp_path)
        assert verdict.startswith(f"{tmp_path / 'suite.yaml'}: ") and expected in verdict, (expected, verdict)


@pytest.mark.timeout(30)
def test_checked_in_schema_is_the_generated_one():
    assert json.loads((ROOT / "docs" / "suite.schema.json").read_text()) == settings_module.suite_schema(), (
        "docs/suite.schema.json is stale: regenerate it with `bplab schema > docs/suite.schema.json`")


@pytest.mark.timeout(30)
def test_bplab_schema_prints_it(capsys):
    from jobs.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == settings_module.suite_schema()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", suites.builtin_names())
def test_every_builtin_suite_file_is_valid_for_both(name):
    document = yaml.safe_load((suites.SUITE_DIR / f"{name}.yaml").read_text())
    assert list(jsonschema.Draft202012Validator(settings_module.suite_schema()).iter_errors(document)) == []
    assert suites.load_suite(name).cases
