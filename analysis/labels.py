"""What tells cases apart: the settings that vary between cases and the labels built from them.

A label is the case's (or group's) name followed by the settings that differ, e.g.
"mid: lr=0.002" or "b: schedule=unfair-back augment=True"; with several runs, "RUN/b: ...".
The report uses one label per line in every legend and names the same settings in its tables.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.load import case_keys
from analysis.rundir import legacy
from analysis.tables import as_str_keys

# Columns of the cases table that are not settings (ids, resources, ledger state).
NOT_SETTINGS = frozenset({
    "run", "case_id", "name", "group", "seed", "num_cpus", "num_gpus", "steps_total", "settings_json",
    "state", "reason_class", "reason", "complete",
})


def setting_text(value) -> str:
    """A setting as people write it: 0.002, True, [50, 50], None."""
    if isinstance(value, (float, np.floating)):
        return "None" if np.isnan(value) else f"{value:g}"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None or value is pd.NA:
        return "None"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(setting_text(v) for v in value) + "]"
    return str(value)


def varying_settings(cases: pd.DataFrame, include_seed: bool = False) -> list[str]:
    """The settings (columns of the cases table) whose value differs between cases, in table
    order; seed only with include_seed. Several runs: differences across runs count too."""
    columns = [c for c in cases.columns if c not in NOT_SETTINGS or (include_seed and c == "seed")]
    return [c for c in columns if cases[c].map(setting_text).nunique() > 1]


def setting_labels(table: pd.DataFrame, cases: pd.DataFrame | None = None, by: str = "group",
                   settings: Sequence[str] | None = None) -> pd.Series:
    """Per row of `table`: its `by` value followed by the settings that differ between cases,
    e.g. "mid: lr=0.002" or "b: schedule=unfair-back augment=True"; with a run column
    (several runs), "RUN/b: ...". settings: default varying_settings(cases)."""
    settings = list(varying_settings(table if cases is None else cases) if settings is None else settings)
    if settings and cases is not None:  # the values from cases (a table may hold a same-named result)
        keys = case_keys(table)
        values = as_str_keys(cases)[[*keys, *settings]].drop_duplicates(keys)
        table = as_str_keys(table[[*keys, by]]).merge(values, on=keys, how="left")
    label = table[by].astype(str)
    if "run" in table:
        label = table["run"].astype(str) + "/" + label
    if settings:
        parts = [c + "=" + table[c].map(setting_text) for c in settings]
        text = parts[0]
        for part in parts[1:]:
            text = text + " " + part
        label = label + ": " + text
    return label.rename("label")


def is_number(value) -> bool:
    """A number that is not a bool and not NaN."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and not (isinstance(value, (float, np.floating)) and np.isnan(value))


def as_sequence(value):
    """A list setting as a list (numpy arrays, tuples, and older runs' JSON text "[64, 64]",
    see analysis.rundir.legacy); anything else as it is."""
    return legacy.as_list(value)


def numeric_settings(cases: pd.DataFrame, settings: Sequence[str]) -> list[str]:
    """The settings (of `settings`) whose every value is a number (lr, width, weight decay) or
    a list of numbers (hidden sizes): the ones a sweep figure can put on an axis."""
    numeric = []
    for column in settings:
        values = [as_sequence(v) for v in cases[column].dropna()]
        if values and all(is_number(v) or (isinstance(v, list) and len(v) and all(is_number(x) for x in v))
                          for v in values):
            numeric.append(column)
    return numeric
