"""Suite files: a named set of cases with shared defaults and grid expansion.

```yaml
name: quick
description: one line
reference: unfair          # optional: the source study its report is compared with
defaults: {model: allconv9, width: 0.25, data: {name: digits}}
grid: {seed: [1, 2]}       # optional: every case is expanded over these (cartesian)
cases:
  a: {schedule: standard}
  b: {schedule: standard, augment: true, grid: {lr: [1e-3, 1e-4]}}   # a case may add its own grid
```
Every error is a `SuiteError` naming the file, the case and the field.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from workers import settings as settings_module
from workers.settings import CaseSettings, SettingsError

SUITE_DIR = Path(__file__).resolve().parent / "suites"
SUITE_KEYS = {"name", "description", "reference", "defaults", "grid", "cases"}
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class SuiteError(ValueError):
    """A user-facing suite error (one line)."""


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # the name without its seed: cases differing only by seed share a group
    settings: CaseSettings

    def case_id(self, data_fingerprint: str) -> str:
        return f"{self.name}-{self.settings.digest(data_fingerprint)[:10]}"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    reference: str | None
    cases: tuple[Case, ...]
    source: str  # the file it came from
    text: str  # the file's text, kept in the manifest


def builtin_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """A built-in suite's name or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SuiteError(f"{name_or_path}: no such suite file")
        return path
    builtin = SUITE_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise SuiteError(f"unknown suite {name_or_path!r}; built-in suites: {', '.join(builtin_names())} (or give a .yaml path)")
    return builtin


def _setting_names() -> set[str]:
    import dataclasses

    fields = getattr(CaseSettings, "model_fields", None)
    return set(fields) if fields is not None else {f.name for f in dataclasses.fields(CaseSettings)}


def parse_override(text: str, cases=()) -> tuple[str, object]:
    """'epochs=3' -> ('epochs', 3); values are YAML ('1e-3', '[1, 2]', 'true').

    A key may start with a case name of the suite (`cases`) to set one case only:
    'adv-a.data.path=~/data/mnist' sets data.path of case adv-a (and every case its grid
    expands it into)."""
    if "=" not in text:
        raise SuiteError(f"--set {text}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SuiteError(f"--set {text}: empty key")
    case = _case_of(key, cases) if cases and key.split(".", 1)[0] not in _setting_names() else None
    if case is not None:  # else a setting, or a wrong name the settings check names
        if key == case:
            raise SuiteError(f"--set {text}: name a setting after the case, e.g. --set {key}.epochs=3")
        key = CaseKey(key, case)
    try:
        return key, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return key, value


def _case_of(key: str, cases) -> str | None:
    """The case name a per-case key starts with (the longest, as names may hold dots)."""
    matches = [str(c) for c in cases if key == str(c) or key.startswith(f"{c}.")]
    return max(matches, key=len) if matches else None


class CaseKey(str):
    """An override key that starts with a case name: 'adv.data.path' for case 'adv'."""

    def __new__(cls, key: str, case: str):
        self = super().__new__(cls, key)
        self.case, self.setting = case, key[len(case) + 1:]
        return self


def _apply_override(values: dict, key: str, value, case: str | None = None) -> dict:
    """`values` (the settings of case `case`) with setting `key` (dotted for data.*) set; a
    CaseKey applies to its own case only."""
    if isinstance(key, CaseKey):
        if key.case != case:
            return values  # another case's override
        key = key.setting
    values = dict(values)
    if "." in key:
        head, tail = key.split(".", 1)
        inner = values.get(head, {})
        if isinstance(inner, str):
            inner = {"name": inner}
        values[head] = _apply_override(inner if isinstance(inner, dict) else {}, tail, value)
    else:
        values[key] = value
    return values


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if key == "data" and isinstance(value, dict) and isinstance(out.get("data"), (dict, str)):
            inner = out["data"] if isinstance(out["data"], dict) else {"name": out["data"]}
            out["data"] = {**inner, **value}
        else:
            out[key] = value
    return out


def _grid(spec, where: str) -> list[dict]:
    if spec is None:
        return [{}]
    if not isinstance(spec, dict) or not spec:
        raise SuiteError(f"{where}: expected a mapping of setting -> list of values")
    keys = list(spec)
    for key in keys:
        if not isinstance(spec[key], list) or not spec[key]:
            raise SuiteError(f"{where}.{key}: expected a non-empty list of values")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec[k] for k in keys))]


def _label(key: str, value) -> str:
    short = {"seed": "s", "schedule": "", "augment": "aug", "lr": "lr", "width": "w"}.get(key, key + "=")
    if isinstance(value, bool):
        return key if value else f"no{key}"
    text = str(value).replace("/", "_").replace(" ", "")
    return f"{short}{text}"


def load_suite(name_or_path: str, overrides: list[str] = ()) -> Suite:
    """Read, expand and validate a suite; raise SuiteError naming file, case and field."""
    path = resolve(name_or_path)
    where_file = path.name if path.parent == SUITE_DIR else str(path)
    try:
        text = path.read_text()
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SuiteError(f"{where_file}: malformed YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SuiteError(f"{where_file}: cannot read: {error}") from None
    if not isinstance(document, dict):
        raise SuiteError(f"{where_file}: expected a mapping with 'cases', got {type(document).__name__}")
    unknown = set(document) - SUITE_KEYS
    if unknown:
        raise SuiteError(f"{where_file}: unknown top-level key {sorted(unknown)[0]!r}; expected {', '.join(sorted(SUITE_KEYS))}")
    cases_spec = document.get("cases")
    if not isinstance(cases_spec, dict) or not cases_spec:
        raise SuiteError(f"{where_file}: 'cases' must be a non-empty mapping of case name -> settings")
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SuiteError(f"{where_file}: 'defaults' must be a mapping")
    parsed_overrides = [parse_override(o, list(cases_spec)) for o in overrides]
    suite_grid = _grid(document.get("grid"), f"{where_file}: grid")

    cases: list[Case] = []
    for base_name, spec in cases_spec.items():
        base_name = str(base_name)
        where = f"{where_file}: case {base_name}"
        if not CASE_NAME.match(base_name):
            raise SuiteError(f"{where}: a case name may hold letters, digits and _ . + - only")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise SuiteError(f"{where}: expected a mapping of settings, got {spec!r}")
        spec = dict(spec)
        case_grid = _grid(spec.pop("grid", None), f"{where}: grid")
        for suite_point, case_point in itertools.product(suite_grid, case_grid):
            point = {**suite_point, **case_point}
            values = _merge(_merge(defaults, spec), point)
            for key, value in parsed_overrides:
                values = _apply_override(values, key, value, case=base_name)
            group = "-".join([base_name] + [_label(k, v) for k, v in point.items() if k != "seed"])
            name = group + (f"-{_label('seed', point['seed'])}" if "seed" in point else "")
            try:
                settings = settings_module.from_dict(values, where=where)
            except SettingsError as error:
                raise SuiteError(str(error)) from None
            cases.append(Case(name=name, group=group, settings=settings))
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SuiteError(f"{where_file}: two cases are both named {sorted(duplicates)[0]!r}")
    suite_name = str(document.get("name") or path.stem)
    if not CASE_NAME.match(suite_name):
        raise SuiteError(f"{where_file}: name {suite_name!r}: a suite name may hold letters, digits and _ . + - only")
    reference = document.get("reference")
    return Suite(name=suite_name, description=str(document.get("description") or ""),
                 reference=str(reference) if reference else None, cases=tuple(cases), source=str(path), text=text)


def select(suite: Suite, only: list[str]) -> Suite:
    """Keep the cases named in --only (a case name or a group name)."""
    if not only:
        return suite
    known = {c.name for c in suite.cases} | {c.group for c in suite.cases}
    for name in only:
        if name not in known:
            raise SuiteError(f"--only {name}: no such case in suite {suite.name} (cases: {', '.join(c.name for c in suite.cases)})")
    kept = tuple(c for c in suite.cases if c.name in only or c.group in only)
    return Suite(suite.name, suite.description, suite.reference, kept, suite.source, suite.text)
