"""Comparison tables: pure functions, DataFrame in, DataFrame out.

Keys: a case is identified by `case_id`, or by (`run`, `case_id`) when frames from several
runs were loaded together. Output tables carry case_id (and run) as plain str.

Definitions (per case):
- final test accuracy: the test accuracy logged at the case's last epoch that has a test row.
- epoch numbering: every table here numbers epochs from 1 (epoch 1 is the first pass over
  the training set), as the live view and the figures do. The metrics rows keep the
  trainer's 0-based index (`epoch` 0 is the first pass); `display_epoch` is the one
  conversion.
- best test accuracy / best_epoch: the highest test accuracy and its epoch; the first such
  epoch on ties.
- final train accuracy: the mean train-batch accuracy over the steps of the last epoch that
  has train rows (as the source studies logged it).
- gap: final train accuracy - final test accuracy.
- epochs_to_target: the epoch at which test accuracy first reached target_accuracy; NaN if
  it never did.
- steps_per_sec: (train steps - 1) / (wall_time of the last train step - wall_time of the
  first). wall_time is when a step ended, so n steps span n-1 step intervals. Test
  evaluation in between is included: it is the case's training throughput, not the speed
  of one step. examples_per_sec is the same with examples (sum of `examples` over steps).
- wall_seconds: last minus first wall_time over all the case's rows.
- epochs: epochs with a test row; last_epoch: the highest epoch with any row; steps: train rows.
- flag (analysis.flags.flag_cases): "diverged" when the ledger says so (a non-finite loss); "collapsed"
  when the best test accuracy was at least chance + (1 - chance) / 2 and the final one is at
  most chance + 0.05 (chance = 1 / number of classes).
- state / complete: the ledger state; complete = state is "done". Cases that are not done
  keep their (partial) numbers here, and the summaries (analysis.stats: seed_summary,
  factor_table, against_baseline) leave them out by default.

The per-row work is one grouped pass over the metrics (analysis.groupby.aggregate), vectorised
with numpy; everything after that is on per-epoch tables a few thousand rows long.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from analysis.groupby import aggregate
from analysis.load import case_keys
from analysis.rundir import legacy

SUMMARY_COLUMNS = ("final_test_acc", "best_test_acc", "final_train_acc")

# 1 + the stored epoch index: what every table, figure and the live view show.
EPOCH_BASE = 1


def display_epoch(epoch):
    """The epoch number people see (1 = the first pass) for the 0-based index the metrics store."""
    return epoch + EPOCH_BASE


# ---- keys and case columns ------------------------------------------------------------------


def as_str_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """case_id (and run) as plain str, so small tables from different sources merge."""
    frame = frame.copy()
    for key in ("run", "case_id"):
        if key in frame:
            frame[key] = frame[key].astype(str)
    return frame


def _split_mask(metrics: pd.DataFrame, split: str) -> np.ndarray:
    return (metrics["split"] == split).to_numpy(dtype=bool, na_value=False)


# ---- epoch and case tables ----------------------------------------------------------------


def _epoch_table(metrics: pd.DataFrame, lean: bool = False) -> pd.DataFrame:
    """Per case x epoch aggregates of train and test rows (no case settings).

    lean: skip lr and the last train step (per_case needs neither; saves a pass over 10 M rows).
    """
    keys = case_keys(metrics)
    columns = [*keys, "epoch", "train_cost", "train_accuracy", "test_cost", "test_accuracy", "lr", "steps",
               "examples", "step", "wall_seconds", "elapsed", "_t_first", "_t_last", "_t_end"]
    if metrics.empty:
        return pd.DataFrame({c: pd.Series([], dtype=str if c in keys else float) for c in columns})

    specs = {
        "cost_mean": ("cost", "mean"), "accuracy_mean": ("accuracy", "mean"), "rows": ("", "size"),
        "t_first": ("wall_time", "min"), "t_last": ("wall_time", "max"),
    }
    if not lean and "step" in metrics:
        specs["step_max"] = ("step", "max")
    if "lr" in metrics and not lean:
        specs["lr"] = ("lr", "last")
    if "examples" in metrics:
        specs["examples"] = ("examples", "sum")
    train = aggregate(metrics, [*keys, "epoch"], specs, where=_split_mask(metrics, "train"))
    test_specs = {"test_cost": ("cost", "last"), "test_accuracy": ("accuracy", "last"),
                  "test_time": ("wall_time", "max")}
    if "step" in metrics:
        test_specs["test_step"] = ("step", "max")
    test = aggregate(metrics, [*keys, "epoch"], test_specs, where=_split_mask(metrics, "test"))
    train = train.rename(columns={
        "cost_mean": "train_cost", "accuracy_mean": "train_accuracy", "rows": "steps",
        "t_first": "_t_first", "t_last": "_t_last",
    })
    table = train.merge(test, on=[*keys, "epoch"], how="outer")
    table = as_str_keys(table).sort_values([*keys, "epoch"], kind="stable").reset_index(drop=True)
    table["steps"] = table["steps"].fillna(0).astype(np.int64)
    # Global step count at the end of the epoch: the test row's step, else last train step + 1.
    for name in ("test_step", "step_max"):
        if name not in table:
            table[name] = np.nan
    table["step"] = table["test_step"].where(table["test_step"].notna(), table["step_max"] + 1)
    table["_t_end"] = np.fmax(table["_t_last"].to_numpy(dtype=float), table["test_time"].to_numpy(dtype=float))
    previous_end = table.groupby(keys, sort=False)["_t_end"].shift(1)
    start = previous_end.where(previous_end.notna(), table["_t_first"])
    # First epoch: from the end of its first step (that step's own duration is not logged).
    table["wall_seconds"] = table["_t_end"] - start
    case_start = table.groupby(keys, sort=False)["_t_first"].transform("min")
    table["elapsed"] = table["_t_end"] - case_start
    for name in ("lr", "examples"):
        if name not in table:
            table[name] = np.nan
    table["epoch"] = display_epoch(table["epoch"])
    return table[columns]


def _with_cases(table: pd.DataFrame, cases: pd.DataFrame | None, keys: list[str], columns=None) -> pd.DataFrame:
    """Merge case columns (all, or `columns`) onto `table` by the case keys, case columns first."""
    if cases is None or "case_id" not in cases:
        return table
    cases = as_str_keys(cases)
    join = [k for k in keys if k in cases]
    if "case_id" not in join:
        return table
    wanted = [c for c in (columns if columns is not None else cases.columns) if c in cases and c not in table]
    if not wanted:
        return table
    merged = table.merge(cases[join + wanted].drop_duplicates(join), on=join, how="left")
    front = [*keys, *[c for c in ("name", "group", "seed") if c in merged]]
    return merged[front + [c for c in merged.columns if c not in front]]


def epoch_summary(metrics: pd.DataFrame, cases: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per case x epoch (numbered from 1): train_cost/train_accuracy (mean over the epoch's train steps),
    test_cost/test_accuracy, lr (last train step), steps, step (global step count at the
    epoch's end), examples, wall_seconds (end of this epoch - end of the previous one; for
    the first epoch, from the end of its first step) and elapsed (seconds since the end of
    the case's first step). With `cases`, the case's name, group, seed and settings are added.
    """
    keys = case_keys(metrics)
    table = _epoch_table(metrics).drop(columns=["_t_first", "_t_last", "_t_end"])
    return _with_cases(table, cases, keys)


def per_case(
    metrics: pd.DataFrame,
    cases: pd.DataFrame | None = None,
    ledger: pd.DataFrame | None = None,
    target_accuracy: float | None = None,
) -> pd.DataFrame:
    """One row per case: final/best test accuracy, final train accuracy, gap, speed, state.

    Every case of `cases` (and of the ledger) is a row, also with no metrics yet (NaN).
    state/complete come from `ledger` if given, else from `cases` (load() merges them);
    definitions are in the module docstring.
    """
    keys = case_keys(metrics) if "run" in metrics or cases is None else case_keys(cases)
    epochs = _epoch_table(metrics, lean=True)
    by_case = epochs.groupby(keys, sort=False)

    has_test = epochs[epochs["test_accuracy"].notna()]
    final_test = has_test.groupby(keys, sort=False).tail(1).set_index(keys)
    best_index = has_test.groupby(keys, sort=False)["test_accuracy"].idxmax()
    best = has_test.loc[best_index].set_index(keys)
    has_train = epochs[epochs["steps"] > 0]
    final_train = has_train.groupby(keys, sort=False).tail(1).set_index(keys)
    train_span = has_train.groupby(keys, sort=False).agg(
        steps=("steps", "sum"), examples=("examples", "sum"), t_first=("_t_first", "min"), t_last=("_t_last", "max")
    )

    table = pd.DataFrame(index=by_case.size().index)
    table["epochs"] = has_test.groupby(keys, sort=False).size()
    table["epochs"] = table["epochs"].fillna(0).astype(np.int64)
    table["final_test_acc"] = final_test["test_accuracy"]
    table["best_test_acc"] = best["test_accuracy"]
    table["best_epoch"] = best["epoch"].astype("Int64")
    table["final_train_acc"] = final_train["train_accuracy"]
    table["gap"] = table["final_train_acc"] - table["final_test_acc"]
    if target_accuracy is not None:
        reached = has_test[has_test["test_accuracy"] >= target_accuracy]
        table["epochs_to_target"] = reached.groupby(keys, sort=False)["epoch"].min().astype(float)
    table["final_test_cost"] = final_test["test_cost"]
    table["final_train_cost"] = final_train["train_cost"]
    table["last_epoch"] = by_case["epoch"].max()
    table["steps"] = train_span["steps"]
    table["steps"] = table["steps"].fillna(0).astype(np.int64)
    span = train_span["t_last"] - train_span["t_first"]
    with np.errstate(invalid="ignore", divide="ignore"):
        table["steps_per_sec"] = ((train_span["steps"] - 1) / span).where(span > 0)
        examples_per_step = train_span["examples"] / train_span["steps"]
        table["examples_per_sec"] = table["steps_per_sec"] * examples_per_step
    ends = by_case.agg(first=("_t_first", "min"), end=("_t_end", "max"))
    table["wall_seconds"] = ends["end"] - ends["first"]
    table = table.reset_index()

    # Every known case is a row, with or without metrics.
    if cases is not None and "case_id" in cases:
        cases_str = as_str_keys(cases)
        join = [k for k in keys if k in cases_str]
        table = cases_str[join].drop_duplicates().merge(table, on=join, how="outer")
    if ledger is not None and "case_id" in ledger and len(ledger):
        ledger_str = as_str_keys(ledger)
        join = [k for k in keys if k in ledger_str]
        table = table.merge(ledger_str[join].drop_duplicates(), on=join, how="outer")
        state = ledger_str[join + [c for c in ("name", "state", "reason_class", "reason") if c in ledger_str]]
        table = table.merge(state.drop_duplicates(join).rename(columns={"name": "_ledger_name"}), on=join, how="left")
    table = _with_cases(table, cases, keys, columns=["name", "group", "seed", "state", "reason_class", "reason",
                                                     "data.name", "data_official", "data_digest"])
    if "_ledger_name" in table:
        if "name" in table:
            table["name"] = table["name"].where(table["name"].notna(), table["_ledger_name"])
        else:
            table["name"] = table["_ledger_name"]
        table = table.drop(columns="_ledger_name")
    for column in ("name", "group", "seed", "state", "reason_class", "reason"):
        if column not in table:
            table[column] = None
    table["group"] = table["group"].where(table["group"].notna(), table["name"])
    table["state"] = table["state"].where(table["state"].notna(), "unknown").astype(str)
    table["complete"] = table["state"].eq("done")
    table["epochs"] = table["epochs"].fillna(0).astype(np.int64)
    table["steps"] = table["steps"].fillna(0).astype(np.int64)

    order = [*keys, "name", "group", "seed", "state", "complete", "epochs", "final_test_acc", "best_test_acc",
             "best_epoch", "final_train_acc", "gap"]
    order += ["epochs_to_target"] if target_accuracy is not None else []
    order += ["final_test_cost", "final_train_cost", "last_epoch", "steps", "steps_per_sec", "examples_per_sec",
              "wall_seconds", "reason_class", "reason"]
    order += [c for c in ("data.name", "data_official", "data_digest") if c in table]  # which data it trained on
    return table[order].sort_values(keys, kind="stable").reset_index(drop=True)


def attach(table: pd.DataFrame, cases: pd.DataFrame | None, needed: Iterable[str]) -> pd.DataFrame:
    """table plus the `needed` columns it lacks, taken from cases by case key."""
    missing = [c for c in needed if c not in table]
    if not missing:
        return table
    if cases is None:
        raise ValueError(f"columns {missing} are not in the table; pass cases")
    absent = [c for c in missing if c not in cases]
    if absent:
        raise ValueError(f"columns {absent} are in neither the table nor cases")
    return _with_cases(as_str_keys(table), cases, case_keys(table), columns=missing)


# ---- per-step curves ----------------------------------------------------------------------


def step_curves(metrics: pd.DataFrame, cases: pd.DataFrame | None = None, metric: str = "train_cost",
                by: str = "group", max_points: int = 400, smoothing: int | None = None) -> pd.DataFrame:
    """Train `metric` (train_cost or train_accuracy) per step, averaged over the cases of each
    `by` value (seeds) and smoothed: columns [run,] by, step, epoch (epochs completed, with
    fractions: step k of n in epoch e is at e - 1 + (k + 1) / n, so the end of epoch e is at
    e, where the per-epoch curves put it), value (the mean) and smoothed.

    smoothed: exponential moving average over steps with span `smoothing` (default: a 30th
    of the steps, at least 5; debiased at the start, as TensorBoard does). At most
    max_points evenly spaced points per curve are kept (after smoothing).
    """
    column = {"train_cost": "cost", "train_accuracy": "accuracy"}[metric]
    keys = case_keys(metrics)
    group_columns = (["run"] if "run" in metrics else []) + [by]
    empty = pd.DataFrame(columns=[*group_columns, "step", "epoch", "value", "smoothed"])
    if metrics.empty:
        return empty
    rows = metrics.loc[_split_mask(metrics, "train"), [*keys, "epoch", "step", column]]
    rows = as_str_keys(rows.dropna(subset=[column]))
    if rows.empty:
        return empty
    if by not in rows:
        rows = _with_cases(rows, cases, keys, columns=[by])
        if by not in rows:
            raise ValueError(f"step_curves: no {by!r} column; pass cases")
    rows = rows.sort_values([*keys, "step"], kind="stable")
    within = rows.groupby([*keys, "epoch"], sort=False)["step"]
    position = within.cumcount().to_numpy() + 1
    rows["x"] = rows["epoch"].to_numpy(dtype=float) + position / within.transform("size").to_numpy()
    curves = rows.groupby(group_columns + ["step"], sort=True, observed=True).agg(
        epoch=("x", "mean"), value=(column, "mean")).reset_index()
    parts = []
    for _, curve in curves.groupby(group_columns, sort=True, observed=True):
        span = smoothing or max(5, len(curve) // 30)
        curve = curve.assign(smoothed=curve["value"].ewm(span=span, adjust=True).mean())
        if len(curve) > max_points:
            curve = curve.iloc[np.unique(np.linspace(0, len(curve) - 1, max_points).round().astype(int))]
        parts.append(curve)
    return pd.concat(parts, ignore_index=True)[[*group_columns, "step", "epoch", "value", "smoothed"]]

# ---- schedules --------------------------------------------------------------------------


def _as_list(value) -> list:
    """A list column's value as a list (older runs' JSON text too: analysis.rundir.legacy)."""
    return list(legacy.as_list(value))


def update_counts(metrics: pd.DataFrame, cases: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per case x layer: mean number of updates per train step (from `updates` / `layers`).

    layer_index is the position in the lists (0 = bottom layer). Each distinct
    (updates, layers) pair is parsed once, so this is cheap on millions of rows.
    With `cases`, name/group/seed/schedule are added.
    """
    keys = case_keys(metrics)
    columns = [*keys, "layer", "layer_index", "mean_updates", "steps"]
    empty = pd.DataFrame({c: pd.Series([], dtype=str if c in (*keys, "layer") else float) for c in columns})
    if metrics.empty or "updates" not in metrics:
        return _with_cases(empty, cases, keys, columns=["name", "group", "seed", "schedule"])
    if "layers" not in metrics:
        metrics = metrics.assign(layers="")
    where = _split_mask(metrics, "train") & metrics["updates"].notna().to_numpy()
    # layers may be null: give it a placeholder so the row keeps a key.
    layers = metrics["layers"]
    if layers.isna().any():
        layers = layers.astype(object).where(layers.notna(), "")
        metrics = metrics.assign(layers=layers)
    combos = aggregate(metrics, [*keys, "updates", "layers"], {"steps": ("", "size")}, where=where)
    records = []
    parsed: dict[tuple[str, str], tuple[list, list]] = {}
    for row in combos.itertuples(index=False):  # one per distinct (case, updates, layers)
        pair = (row.updates, row.layers)
        if pair not in parsed:
            counts = _as_list(row.updates)
            names = _as_list(row.layers) if isinstance(row.layers, (str, tuple, list)) and len(row.layers) else []
            if len(names) != len(counts):
                names = [f"l{i + 1}" for i in range(len(counts))]
            parsed[pair] = (counts, names)
        counts, names = parsed[pair]
        for index, (name, count) in enumerate(zip(names, counts)):
            records.append((*[getattr(row, k) for k in keys], name, index, float(count) * row.steps, row.steps))
    if not records:
        return _with_cases(empty, cases, keys, columns=["name", "group", "seed", "schedule"])
    long = pd.DataFrame.from_records(records, columns=[*keys, "layer", "layer_index", "total", "steps"])
    out = long.groupby([*keys, "layer", "layer_index"], sort=False, as_index=False).agg(
        total=("total", "sum"), steps=("steps", "sum")
    )
    out["mean_updates"] = out["total"] / out["steps"]
    out = as_str_keys(out[columns]).sort_values([*keys, "layer_index"], kind="stable").reset_index(drop=True)
    return _with_cases(out, cases, keys, columns=["name", "group", "seed", "schedule"])
