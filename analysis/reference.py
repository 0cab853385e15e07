"""The source studies' logged figures (docs/experiments.md), the reference a run is compared to.

Keyed by reference table name, then by case name. A value of None means the source did not
log that figure. `source_*` are fractions (accuracy), as in docs/experiments.md; the learning
rules' table (`feedback`, docs/learning-rules.md) also has error-signal angles in degrees
(SOURCE_ERROR_ANGLES).

SOURCE_SETTINGS holds, per source case, the settings the source fixed (flat names, as in the
cases table). A run's case is compared with the source only when it trained on the official
data and every one of these settings is unchanged (`comparability`); `reference_comparison`
puts a run's per-case table next to the source's figures on those terms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from analysis.tables import as_str_keys, attach

_FIELDS = ("source_final_test", "source_best_test", "source_train", "note")


def _table(rows: list[tuple]) -> dict[str, dict]:
    """{case: {source_final_test, source_best_test, source_train, note}} from (case, *fields) rows."""
    return {case: dict(zip(_FIELDS, fields)) for case, *fields in rows}


# docs/experiments.md section 1: unfair back propagation, allconv9 on CIFAR-10 (10 epochs; a: 50).
UNFAIR = _table([
    # case, final test, best test, final train, note
    ("a", 0.8333, 0.8388, 0.9831, "standard, no aug, 50 epochs"),
    ("b", 0.7952, None, 0.4925, "standard, aug"),
    ("c", 0.8298, None, 0.8971, "unfair-back, no aug"),
    ("d", 0.8131, None, 0.4997, "unfair-back, aug"),
    ("e", 0.7934, 0.8305, 0.8948, "unfair-front, no aug"),
    ("f", 0.7877, 0.8009, 0.4882, "unfair-front, aug"),
])

# docs/experiments.md section 2: adversarial gradient and dilated back propagation, celu7.
ADVERSARIAL = _table([
    ("adv-a", 0.9933, 0.9941, None, "MNIST, 51 epochs"),
    ("adv-b", 0.7234, 0.7351, None, "CIFAR-10, 101 epochs"),
    ("adv-c", 0.7180, 0.7419, None, "CIFAR-10, dilated, 101 epochs"),
])

# docs/experiments.md section 4: the MNIST "DCN" (5,500 steps of batch 50).
DCN = _table([
    ("dcn", 0.9869, None, None, "MNIST DCN, 5,500 steps"),
])

# docs/learning-rules.md: Akrout et al.'s repository (makrout/Deep-Learning-without-Weight-Transport),
# MNIST 784-500-10, experiments/mnist/{bp,fa,kp}-V0/results.json, one seed (1111), epoch 400 of 400.
FEEDBACK = _table([
    ("bp", 0.985, None, None, "back propagation, SGD lr 0.2, batch 128, 400 epochs"),
    ("fa", 0.978, None, None, "feedback alignment, lr 0.2; final hidden delta angle 34.9 degrees"),
    ("kp", 0.9845, None, None, "Kolen-Pollack, lr 0.3, no weight decay; final hidden delta angle 3.1 degrees"),
])

REFERENCES: dict[str, dict[str, dict]] = {"unfair": UNFAIR, "adversarial": ADVERSARIAL, "dcn": DCN, "feedback": FEEDBACK}

# The source's final error-signal angle in degrees at the hidden units (Akrout et al.'s "delta
# angle" between the rule's hidden error and back propagation's, on one training example after
# the last epoch: results.json's delta_angles at epoch 400), where the source measured one.
SOURCE_ERROR_ANGLES: dict[str, dict[str, float]] = {"feedback": {"fa": 34.91, "kp": 3.15}}

# The settings each source case fixed (jobs/suites/unfair.yaml, adversarial.yaml, dcn.yaml
# hold the same values). Seeds, engines and quirks are not part of it: a case computed
# correctly is compared with the source on purpose.
_WHOLE_SET = {"data.classes": None, "data.train_size": None, "data.test_size": None, "steps_per_epoch": None,
              "weight_decay": 0.0, "lr_schedule": "constant", "init": "default"}
_UNFAIR_FIXED = {**_WHOLE_SET, "model": "allconv9", "width": 1.0, "data.name": "cifar10", "data.resize": None,
                 "data.standardize": "none", "optimizer": "adam", "lr": 1e-4, "beta1": 0.9, "beta2": 0.9,
                 "epsilon": 1e-8, "batch_size": 10, "epochs": 10}
_ADVERSARIAL_FIXED = {**_WHOLE_SET, "model": "celu7", "optimizer": "amsgrad", "beta1": 0.9, "beta2": 0.9,
                      "epsilon": 1e-8, "dilation_rate": 0.5, "dilation_decay": 0.05}
_CIFAR_ADV = {"width": 2.0, "data.name": "cifar10", "data.resize": None, "data.standardize": "per_pixel",
              "batch_size": 100, "lr": 7e-4, "adversarial_epsilon": 0.09, "epochs": 101}
_FEEDBACK_FIXED = {**_WHOLE_SET, "model": "mlp", "hidden": [500], "width": 1.0, "activation": "sigmoid",
                   "init": "normal_fan_sum", "data.name": "mnist", "data.resize": None, "data.standardize": "none",
                   "optimizer": "sgd", "batch_size": 128, "epochs": 400}
SOURCE_SETTINGS: dict[str, dict[str, dict]] = {
    "unfair": {
        "a": {**_UNFAIR_FIXED, "schedule": "standard", "augment": False, "epochs": 50},
        "b": {**_UNFAIR_FIXED, "schedule": "standard", "augment": True},
        "c": {**_UNFAIR_FIXED, "schedule": "unfair-back", "augment": False},
        "d": {**_UNFAIR_FIXED, "schedule": "unfair-back", "augment": True},
        "e": {**_UNFAIR_FIXED, "schedule": "unfair-front", "augment": False},
        "f": {**_UNFAIR_FIXED, "schedule": "unfair-front", "augment": True},
    },
    "adversarial": {
        "adv-a": {**_ADVERSARIAL_FIXED, "schedule": "adversarial", "width": 1.0, "data.name": "mnist",
                  "data.resize": 32, "data.standardize": "none", "batch_size": 50, "lr": 7e-5,
                  "adversarial_epsilon": 0.5, "epochs": 51},
        "adv-b": {**_ADVERSARIAL_FIXED, **_CIFAR_ADV, "schedule": "adversarial"},
        "adv-c": {**_ADVERSARIAL_FIXED, **_CIFAR_ADV, "schedule": "adversarial+dilated"},
    },
    "dcn": {
        "dcn": {**_WHOLE_SET, "model": "dcn", "width": 1.0, "activation": "default", "dropout": 0.5,
                "data.name": "mnist", "data.resize": None, "data.standardize": "none", "optimizer": "adam",
                "lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "batch_size": 50, "epochs": 5,
                "steps_per_epoch": 1100},
    },
    "feedback": {
        "bp": {**_FEEDBACK_FIXED, "schedule": "standard", "lr": 0.2},
        "fa": {**_FEEDBACK_FIXED, "schedule": "feedback-alignment", "lr": 0.2, "feedback_init": "normal_fan_sum"},
        "kp": {**_FEEDBACK_FIXED, "schedule": "kolen-pollack", "lr": 0.3, "feedback_init": "normal_fan_sum"},
    },
}

# Other names a suite's manifest may use for the same table.
ALIASES = {
    "unfair-backprop": "unfair",
    "unfair_backprop": "unfair",
    "adv": "adversarial",
    "adversarial-dilated": "adversarial",
    "dilated": "adversarial",
    "mnist-dcn": "dcn",
    "simple": "dcn",
    "akrout": "feedback",
    "weight-transport": "feedback",
}


def reference_table(name: str) -> dict[str, dict]:
    """The reference cases of table `name` (or one of its aliases); KeyError names the known ones."""
    key = ALIASES.get(name, name)
    if key not in REFERENCES:
        raise KeyError(f"unknown reference table {name!r}; known: {', '.join(sorted(REFERENCES))}")
    return REFERENCES[key]


def error_angles(name: str) -> dict[str, float]:
    """{case: the source's final hidden error-signal angle in degrees} of table `name` ({} if none)."""
    return SOURCE_ERROR_ANGLES.get(ALIASES.get(name, name), {})


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(value, expected) -> bool:
    if _missing(expected) or _missing(value):
        return _missing(expected) and _missing(value)
    if isinstance(expected, bool) or isinstance(value, bool):
        return value in (True, False) and bool(value) == expected
    if isinstance(expected, (int, float)):
        try:
            return math.isclose(float(value), float(expected), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return str(value) == str(expected)


def case_settings(row: dict) -> dict:
    """Flat settings of a cases-table row: from settings_json when stored, else the row itself."""
    stored = row.get("settings_json")
    if isinstance(stored, str) and stored:
        flat = {}
        for key, value in json.loads(stored).items():
            if isinstance(value, dict):
                flat.update({f"data.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat
    return dict(row)


def comparability(row: dict, reference: str, case: str, overrides=()) -> list[str]:
    """Why a run's case (a cases-table row) cannot be compared with source case `case`; [] if it can.

    Comparable means: the data is the official set (data_official recorded True) and every
    setting the source fixed has its source value. overrides (the run's --set list) are named
    in the reason when they changed a setting."""
    reasons = []
    official = row.get("data_official")
    if _missing(official):
        reasons.append("data differs: which data the case trained on is not recorded")
    elif not bool(official):
        why = row.get("data_reason") or "not the official files"
        reasons.append(f"data differs: {row.get('data.name', '?')} digest {row.get('data_digest', '?')} ({why})")
    fixed = SOURCE_SETTINGS.get(ALIASES.get(reference, reference), {}).get(case, {})
    settings = case_settings(row)
    changed = []
    for key, expected in fixed.items():
        if key not in settings:
            changed.append(f"{key} not recorded")
        elif not _same(settings[key], expected):
            set_by = [o for o in overrides or () if str(o).split("=", 1)[0].strip() == key]
            how = f" by --set {set_by[-1]}" if set_by else ""
            changed.append(f"{key}={settings[key]!s} (source {expected!s}){how}")
    if changed:
        reasons.append("settings differ: " + ", ".join(changed))
    return reasons


def final_hidden_error_angle(alignment: pd.DataFrame | None) -> pd.Series:
    """Per case_id: the mean error_angle (degrees) over the hidden units (every unit but the
    top one) at the case's last measured epoch; empty without alignment rows."""
    if alignment is None or not len(alignment) or "quantity" not in alignment:
        return pd.Series(dtype=float)
    rows = alignment.assign(case_id=alignment["case_id"].astype(str), quantity=alignment["quantity"].astype(str))
    top = rows.groupby("case_id")["unit"].transform("max")
    rows = rows[(rows["quantity"] == "error_angle") & (rows["unit"] < top)]
    if not len(rows):
        return pd.Series(dtype=float)
    rows = rows[rows["epoch"] == rows.groupby("case_id")["epoch"].transform("max")]
    return rows.groupby("case_id")["value"].mean()


def reference_comparison(
    per_case_table: pd.DataFrame, reference: str, cases: pd.DataFrame | None = None, overrides=(),
    alignment: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """This run next to the source study's figures (analysis.reference), one row per source case.

    A source case matches the run's cases of that group (else that name); several seeds are
    averaged. Source cases the run lacks are kept with NaN. Columns: case, source_final_test,
    run_final_test, diff (run - source), source_best_test, run_best_test, source_train,
    run_train, n (matched cases), state (their states), note; with `cases` also comparable
    and why_not. With `cases`, like is compared with like only: a case is comparable when it
    trained on the official data and kept every setting the source fixed
    (analysis.reference.comparability); otherwise its diff is left empty and why_not gives the
    reasons (overrides, the run's --set list, are named there). Where the source measured an
    error-signal angle (analysis.reference.error_angles), source_error_angle and
    run_error_angle (the cases' final hidden error angle from `alignment`, the run's
    alignment rows; NaN without them) are added.
    """
    source = reference_table(reference)
    angles = error_angles(reference)
    run_angles = final_hidden_error_angle(alignment) if angles else pd.Series(dtype=float)
    table = attach(per_case_table, cases, ["name", "group"])
    checked = cases is not None and "case_id" in cases
    by_id = as_str_keys(cases).drop_duplicates("case_id").set_index("case_id") if checked else None
    runs = list(dict.fromkeys(table["run"])) if "run" in table else [None]
    rows = []
    for run in runs:
        in_run = table if run is None else table[table["run"] == run]
        for case, figures in source.items():
            matched = in_run[in_run["group"] == case]
            if matched.empty:
                matched = in_run[in_run["name"] == case]
            row = {} if run is None else {"run": run}
            row.update({
                "case": case,
                "source_final_test": figures["source_final_test"],
                "run_final_test": matched["final_test_acc"].mean() if len(matched) else np.nan,
                "source_best_test": figures["source_best_test"],
                "run_best_test": matched["best_test_acc"].mean() if len(matched) else np.nan,
                "source_train": figures["source_train"],
                "run_train": matched["final_train_acc"].mean() if len(matched) else np.nan,
                "n": len(matched),
                "state": ",".join(sorted(set(matched["state"].astype(str)))) if "state" in matched else "",
                "note": figures.get("note", ""),
            })
            if angles:
                ids = matched["case_id"].astype(str) if "case_id" in matched else pd.Series(dtype=str)
                measured = run_angles.reindex(ids).dropna()
                row["source_error_angle"] = angles.get(case, np.nan)
                row["run_error_angle"] = measured.mean() if len(measured) else np.nan
            if checked:
                reasons = []
                for case_id in matched["case_id"].astype(str) if "case_id" in matched else []:
                    if case_id in by_id.index:
                        for reason in comparability(by_id.loc[case_id].to_dict(), reference, case, overrides):
                            if reason not in reasons:
                                reasons.append(reason)
                row["comparable"] = bool(len(matched)) and not reasons
                row["why_not"] = "; ".join(reasons) if reasons else ("" if len(matched) else "not in this run")
            rows.append(row)
    out = pd.DataFrame(rows)
    for column in ("source_final_test", "source_best_test", "source_train"):
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    diff = out["run_final_test"] - out["source_final_test"]
    if checked:
        diff = diff.where(out["comparable"].astype(bool))  # never a diff between two different experiments
    out.insert(out.columns.get_loc("run_final_test") + 1, "diff", diff)
    return out
