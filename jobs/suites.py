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

import difflib
import fnmatch
import hashlib
import itertools
import math
import os
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from workers import settings as settings_module
from workers.errors import UserError, shorten
from workers.settings import CaseSettings, SettingsError

SUITE_DIR = Path(__file__).resolve().parent / "suites"
SUITE_KEYS = tuple(settings_module.SuiteFile.model_fields)
CASE_NAME = re.compile(settings_module.CASE_NAME_PATTERN)  # what a run directory accepts
NAME_CHARS = "letters, digits and _ . - only, starting with a letter or digit"
# Short labels of common grid keys: `bs16`, `act_tanh`, `s1`. seed, lr and width keep the
# labels cases had before, so runs started then still resume.
KEY_ALIASES = {"seed": "s", "lr": "lr", "width": "w", "batch_size": "bs", "activation": "act", "hidden": "h",
               "weight_decay": "wd", "epochs": "ep", "augment": "aug", "schedule": ""}
MAX_LABEL = 40  # a longer label is cut and ends with a hash of the exact value
MAX_GROUP = 100  # the same for a whole group name (a case id adds the seed and 11 characters)


class SuiteError(UserError):
    """A user-facing suite error (one line)."""


# Bounds on what a suite file may ask of the machine (each error says which one was hit).
MAX_SUITE_BYTES = 4_000_000  # the file's size
MAX_YAML_DEPTH = 64  # nesting of mappings and lists
MAX_YAML_NODES = 200_000  # values in the document, with every alias counted as a copy of its anchor
MAX_CASE_NAME = settings_module.CASE_NAME_LIMIT  # characters of a case name as written in the file
MAX_EXPANDED_NAME = 150  # characters of a case name after grid labels are added
DEFAULT_MAX_CASES = 10_000  # cases after grid expansion; BPLAB_MAX_CASES (or max_cases=) changes it
MAX_ERROR_CHARS = 300  # an error line never echoes more of a value than this


def _short(text, limit: int = MAX_ERROR_CHARS) -> str:
    return shorten(text, limit)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, nesting deeper than MAX_YAML_DEPTH and
    documents larger than MAX_YAML_NODES values once aliases are expanded (an alias bomb),
    before anything is built from them."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_short(repr(key), 80)}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """Values in the tree under `root` with aliases expanded, computed once per distinct node;
    ComposerError past MAX_YAML_NODES or for an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it", node.start_mark)
        busy.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        busy.discard(key)
        if total > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES} values once aliases are "
                                              "expanded (anchors and aliases that multiply)", node.start_mark)
        sizes[key] = total
        return total

    return size(root)


def safe_load(text: str):
    """yaml.safe_load with the bounds of _BoundedLoader."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def max_cases() -> int:
    """The largest number of cases a suite may expand to: BPLAB_MAX_CASES, default DEFAULT_MAX_CASES."""
    text = os.environ.get("BPLAB_MAX_CASES", "").strip()
    if not text:
        return DEFAULT_MAX_CASES
    if not text.isdigit() or int(text) < 1:
        raise SuiteError(f"BPLAB_MAX_CASES={_short(text, 40)}: expected a positive integer")
    return int(text)


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
    if len(text) > 10_000:
        raise SuiteError(f"--set {_short(text, 60)}: longer than 10000 characters")
    case = _case_of(key, cases) if cases and key.split(".", 1)[0] not in _setting_names() else None
    if case is None and cases and "." in key and key.split(".", 1)[0] not in _setting_names():
        head = key.split(".", 1)[0]
        names = ", ".join(str(c) for c in cases)
        raise SuiteError(f"--set {_short(text, 80)}: {_short(head, 40)!r} is neither a setting nor a case of the suite "
                         f"(cases: {_short(names, 200)})")
    if case is not None:  # else a setting, or a wrong name the settings check names
        if key == case:
            raise SuiteError(f"--set {text}: name a setting after the case, e.g. --set {key}.epochs=3")
        key = CaseKey(key, case)
    try:
        return key, safe_load(value) if value.strip() else ""
    except RecursionError:
        raise SuiteError(f"--set {_short(key, 60)}: value nested too deeply") from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or ""
        if "duplicate key" in problem or "nested deeper" in problem or "aliases" in problem or "alias refers" in problem:
            raise SuiteError(f"--set {_short(key, 60)}: {problem}") from None
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


def _blame_override(message: str, where: str, texts, parsed, case: str) -> str:
    """A settings error 'WHERE.field: problem' as '--set KEY=VALUE: problem' when the field's
    value came from that --set (the last one that set it), so the error names what was typed
    rather than the suite file the value never came from."""
    prefix = f"{where}."
    if not message.startswith(prefix) or ": " not in message[len(prefix):]:
        return message
    field, problem = message[len(prefix):].split(": ", 1)
    for text, (key, _) in reversed(list(zip(texts, parsed))):
        if isinstance(key, CaseKey) and key.case != case:
            continue
        setting = key.setting if isinstance(key, CaseKey) else str(key)
        if field == setting or field.startswith(f"{setting}.") or setting.startswith(f"{field}."):
            unknown = problem.startswith("unknown setting")  # the same for every case
            return f"--set {_short(text, 80)}: {problem}" + ("" if unknown else f" (case {case})")
    return message


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if key == "data" and isinstance(value, dict) and isinstance(out.get("data"), (dict, str)):
            inner = out["data"] if isinstance(out["data"], dict) else {"name": out["data"]}
            out["data"] = {**inner, **value}
        else:
            out[key] = value
    return out


def _grid_size(spec, where: str) -> int:
    """The number of points of a grid (the product of its list lengths), without expanding it."""
    if not spec:  # no grid, or an empty one: one point
        return 1
    if not isinstance(spec, dict):
        raise SuiteError(f"{where}: expected a mapping of setting -> list of values")
    for key in spec:
        if not isinstance(spec[key], list) or not spec[key]:
            raise SuiteError(f"{where}.{_short(key, 60)}: expected a non-empty list of values")
    return math.prod(len(values) for values in spec.values())


def _grid(spec, where: str) -> list[dict]:
    if not spec:
        return [{}]
    _grid_size(spec, where)
    keys = list(spec)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec[k] for k in keys))]


def _sanitise(text: str) -> str:
    """Every character outside [A-Za-z0-9_.-] becomes '_' (runs of them one '_')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _value_text(value) -> str:
    """A grid value as name characters: 0.001, 16, tanh, 8x8 for [8, 8], a.b for ['a', 'b'],
    digits_resize32 for {name: digits, resize: 32}."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return ("x" if numbers else ".").join(_value_text(v) for v in value) or "none"
    if isinstance(value, dict):
        parts = [_value_text(value["name"])] if "name" in value else []
        parts += [label(str(k), v) for k, v in value.items() if k != "name"]
        return "_".join(p for p in parts if p) or "none"
    if value is None:
        return "none"
    return _sanitise(str(value)) or "empty"


def label(key: str, value) -> str:
    """The part of a case name that says `key: value`, in [A-Za-z0-9_.-] only.

    `s1` (seed 1), `bs16`, `lr0.002`, `act_tanh`, `h8x8`, `augment`/`noaugment`, the value
    alone for schedule; any other key as `key_value`. A label longer than MAX_LABEL keeps its
    start and ends with a hash of the exact value.
    """
    if isinstance(value, bool) and key not in ("seed", "lr", "width"):
        text = _sanitise(key) if value else f"no{_sanitise(key)}"
    else:
        alias = KEY_ALIASES.get(key, _sanitise(key))
        text = _value_text(value)
        if alias and not (text[0].isdigit() or text[0] in "-."):  # act_tanh, but bs16 and lr1e-3
            text = f"{alias}_{text}"
        else:
            text = f"{alias}{text}"
    if len(text) > MAX_LABEL:
        text = f"{text[:MAX_LABEL - 7].rstrip('_.-')}-{_short_hash(value)}"
    return text


def case_names(points: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    """(name, group) of every (base name, grid point), unique, in linear time.

    The group is the base name and the labels of the point's keys other than `seed`; the
    name adds the seed's label. Two different points whose labels read alike (`a b` and
    `a_b`) get a short hash of the exact values appended.
    """
    def key_of(base, point):
        return json.dumps([base, point], sort_keys=True, default=str)

    groups = ["-".join([base] + [label(k, v) for k, v in point.items() if k != "seed"]) for base, point in points]
    groups = [g if len(g) <= MAX_GROUP else f"{g[:MAX_GROUP - 7].rstrip('_.-')}-{_short_hash(key_of(base, point))}"
              for g, (base, point) in zip(groups, points)]
    owners: dict[str, set] = {}
    for group, (base, point) in zip(groups, points):
        owners.setdefault(group, set()).add(key_of(base, {k: v for k, v in point.items() if k != "seed"}))
    groups = [g if len(owners[g]) == 1 else f"{g}-{_short_hash(key_of(base, {k: v for k, v in point.items() if k != 'seed'}))}"
              for g, (base, point) in zip(groups, points)]
    names = [g + (f"-{label('seed', point['seed'])}" if "seed" in point else "") for g, (_, point) in zip(groups, points)]
    points_named: dict[str, set] = {}
    for name, (base, point) in zip(names, points):
        points_named.setdefault(name, set()).add(key_of(base, point))
    names = [n if len(points_named[n]) == 1 else f"{n}-{_short_hash(key_of(base, point))}"
             for n, (base, point) in zip(names, points)]  # the same point twice keeps one name: load_suite refuses it
    return list(zip(names, groups))


def load_suite(name_or_path: str, overrides: list[str] = (), max_cases: int | None = None) -> Suite:
    """Read, expand and validate a suite; raise SuiteError naming file, case and field.

    The file is read with bounds (size, nesting, aliases, no duplicate keys) and may expand
    to at most `max_cases` cases (default: `max_cases()`, i.e. BPLAB_MAX_CASES or 10,000)."""
    try:
        return _load_suite(name_or_path, overrides, max_cases)
    except SuiteError as error:
        raise SuiteError(_short(" ".join(str(error).split()))) from None


def _load_suite(name_or_path: str, overrides, limit: int | None) -> Suite:
    path = resolve(name_or_path)
    where_file = path.name if path.parent == SUITE_DIR else str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SUITE_BYTES:
            raise SuiteError(f"{where_file}: {size} bytes; a suite file may hold at most {MAX_SUITE_BYTES}")
        text = path.read_text()
        document = safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SuiteError(f"{where_file}: malformed YAML{at}: {_short(problem, 200)}") from None
    except RecursionError:
        raise SuiteError(f"{where_file}: malformed YAML: nested too deeply") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SuiteError(f"{where_file}: cannot read: {error}") from None
    if isinstance(document, dict) and isinstance(document.get("cases"), dict):  # `1:` names case "1"
        document = {**document, "cases": {str(name): spec for name, spec in document["cases"].items()}}
    check_document(document, where_file)
    cases_spec = document["cases"]
    defaults = document.get("defaults") or {}
    parsed_overrides = [parse_override(o, list(cases_spec)) for o in overrides]
    # count the cases before expanding anything: the product of the grids' list lengths
    limit = max_cases() if limit is None else limit
    total = 0
    suite_size = _grid_size(document.get("grid"), f"{where_file}: grid")
    for base_name, spec in cases_spec.items():
        total += suite_size * _grid_size((spec or {}).get("grid"), f"{where_file}: case {_short(base_name, 40)}: grid")
    if total > limit:
        raise SuiteError(f"{where_file}: the grids expand to {total} cases, more than the limit of {limit} "
                         "(set BPLAB_MAX_CASES to allow more)")
    suite_grid = _grid(document.get("grid"), f"{where_file}: grid")

    entries: list[tuple[str, dict, CaseSettings]] = []
    for base_name, spec in cases_spec.items():
        where = f"{where_file}: case {base_name}"
        spec = dict(spec or {})  # checked above
        case_grid = _grid(spec.pop("grid", None), f"{where}: grid")
        for suite_point, case_point in itertools.product(suite_grid, case_grid):
            point = {**suite_point, **case_point}
            values = _merge(_merge(defaults, spec), point)
            for key, value in parsed_overrides:
                values = _apply_override(values, key, value, case=base_name)
            try:
                settings = settings_module.from_dict(values, where=where)
            except SettingsError as error:
                raise SuiteError(_blame_override(str(error), where, overrides, parsed_overrides, base_name)) from None
            entries.append((base_name, point, settings))
    named = case_names([(base, point) for base, point, _ in entries])
    counts = Counter(name for name, _ in named)
    duplicate = next((name for name, _ in named if counts[name] > 1), None)
    if duplicate is not None:  # the same grid point twice, e.g. seed: [1, 1]
        raise SuiteError(f"{where_file}: two cases are both named {_short(duplicate, 100)!r} (a grid lists a value twice?)")
    for name, _ in named:
        if len(name) > MAX_EXPANDED_NAME:
            raise SuiteError(f"{where_file}: the expanded case name is {len(name)} characters, more than "
                             f"{MAX_EXPANDED_NAME} ({_short(name, 60)})")
    cases = [Case(name=name, group=group, settings=settings) for (name, group), (_, _, settings) in zip(named, entries)]
    suite_name = str(document.get("name") or path.stem)
    if not CASE_NAME.match(suite_name):  # a file name the run directory would refuse
        raise SuiteError(f"{where_file}: name {suite_name!r}: a suite name may hold {NAME_CHARS}")
    return Suite(name=suite_name, description=document.get("description") or "",
                 reference=document.get("reference") or None, cases=tuple(cases), source=str(path), text=text)


def check_document(document, where_file: str) -> None:
    """SuiteError (one line naming the file, the case and the field) unless `document` (a
    suite file as YAML read it) is a valid `workers.settings.SuiteFile`: the model the JSON
    schema (docs/suite.schema.json) is generated from. Rules between settings are checked
    per expanded case, after defaults, grids and --set are merged."""
    from pydantic import ValidationError

    try:
        settings_module.SuiteFile.model_validate(document)
    except ValidationError as error:
        errors = error.errors(include_url=False)
        # an unknown top-level key first: `case:` typed for `cases:` is that, not a missing 'cases'
        typo = [e for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
        raise SuiteError(f"{where_file}: {_document_error((typo or errors)[0])}") from None


def _document_error(error: dict) -> str:
    """The first error of a suite document, in the words of the settings errors."""
    loc, kind, given = list(error["loc"]), error["type"], error.get("input")
    if not loc:
        return f"expected a mapping with 'cases', got {type(given).__name__}"
    top, rest = loc[0], loc[1:]
    if top == "cases" and rest:
        name = str(rest[0])
        where = f"case {_short(name, 40)}"
        if rest[1:] == ["[key]"]:
            if kind == "string_too_long":
                return f"{where}: a case name may be at most {MAX_CASE_NAME} characters, not {len(name)}"
            return f"{where}: a case name may hold {NAME_CHARS}"
        if len(rest) == 1:
            return f"{where}: expected a mapping of settings, got {_short(repr(given), 80)}"
        if rest[1] == "grid":
            return f"{where}: {_grid_error(rest[1:], error)}"
        return f"{where}.{settings_module.error_text({**error, 'loc': tuple(rest[1:])})}"
    if top == "cases":
        return "'cases' must be a non-empty mapping of case name -> settings"
    if top == "defaults" and rest:
        return f"defaults.{settings_module.error_text({**error, 'loc': tuple(rest)})}"
    if top == "defaults":
        return "'defaults' must be a mapping"
    if top == "grid":
        return _grid_error(loc, error)
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(top), sorted(SUITE_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown top-level key {_short(repr(top), 80)}{hint}; expected {', '.join(sorted(SUITE_KEYS))}"
    if top == "name" and kind == "string_pattern_mismatch":
        return f"name {_short(repr(given), 80)}: a suite name may hold {NAME_CHARS}"
    return f"{top}: {error['msg'][0].lower()}{error['msg'][1:]}, got {_short(repr(given), 80)}"


def _grid_error(loc: list, error: dict) -> str:
    """An error inside a grid (loc starts with 'grid')."""
    if len(loc) == 1:
        return "grid: expected a mapping of setting -> list of values"
    key = _short(str(loc[1]), 60)
    if error["type"] == "extra_forbidden":
        known = list(settings_module.CaseFields.model_fields)
        alias = settings_module.ALIASES.get(str(loc[1]))
        close = [alias] if alias in known else difflib.get_close_matches(str(loc[1]), known, n=1)
        return f"grid.{key}: unknown setting" + (f" (did you mean {close[0]!r}?)" if close else "")
    if len(loc) > 2:  # one of the values, checked as the setting it is a value of
        return f"grid.{settings_module.error_text({**error, 'loc': tuple(loc[1:])})}"
    return f"grid.{key}: expected a non-empty list of values"


def select(suite: Suite, only: list[str]) -> Suite:
    """Keep the cases --only picks: each pattern is a case name, a group or a glob
    (`fast-*`, `h?-act_relu`); a pattern that picks nothing is an error."""
    if not only:
        return suite
    keep: set[str] = set()
    for pattern in only:
        picked = {c.name for c in suite.cases
                  if c.name == pattern or c.group == pattern
                  or fnmatch.fnmatchcase(c.name, pattern) or fnmatch.fnmatchcase(c.group, pattern)}
        if not picked:
            names = [c.name for c in suite.cases]
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} cases)" if len(names) > 8 else "")
            raise SuiteError(f"--only {pattern}: matches no case name, group or glob in suite {suite.name} (cases: {shown})")
        keep |= picked
    kept = tuple(c for c in suite.cases if c.name in keep)
    return Suite(suite.name, suite.description, suite.reference, kept, suite.source, suite.text)
