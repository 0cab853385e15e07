# Long module: every comparison table, with the group-by, statistics and labels they share.
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
- flag (flag_cases): "diverged" when the ledger says so (a non-finite loss); "collapsed"
  when the best test accuracy was at least chance + (1 - chance) / 2 and the final one is at
  most chance + 0.05 (chance = 1 / number of classes).
- state / complete: the ledger state; complete = state is "done". Cases that are not done
  keep their (partial) numbers here, and the summaries (seed_summary, factor_table,
  against_baseline) leave them out by default.

The per-row work is one grouped pass over the metrics (see `_aggregate`), vectorised with
numpy; everything after that is on per-epoch tables a few thousand rows long.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.load import case_keys
from analysis.reference import comparability, error_angles, reference_table

SUMMARY_COLUMNS = ("final_test_acc", "best_test_acc", "final_train_acc")

# 1 + the stored epoch index: what every table, figure and the live view show.
EPOCH_BASE = 1


def display_epoch(epoch):
    """The epoch number people see (1 = the first pass) for the 0-based index the metrics store."""
    return epoch + EPOCH_BASE


# ---- a grouped pass over many rows --------------------------------------------------------


def _key_codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """(codes, values, offset): per row, code + offset indexes `values`; code -1 + offset = missing.

    Categoricals give their codes (no copy); dense integer columns give the raw values with
    offset -min (no copy); anything else is factorised.
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.cat.codes.to_numpy(), np.asarray(series.cat.categories.astype(object)), 0
    if pd.api.types.is_integer_dtype(series.dtype) and not pd.api.types.is_extension_array_dtype(series.dtype):
        values = series.to_numpy()
        if len(values) == 0:
            return values, np.array([], dtype=np.int64), 0
        low, high = int(values.min()), int(values.max())
        if high - low < 4 * len(values) + 1024:  # dense range: the value itself is the code
            return values, np.arange(low, high + 1), -low
    codes, uniques = pd.factorize(series, sort=True)
    return codes, np.asarray(uniques, dtype=object), 0


def _numeric_values(series: pd.Series) -> np.ndarray:
    """The column as a numpy array without copying it when possible: float64 (NaN for
    nulls) or plain integers; anything else is converted to float64."""
    if series.dtype == np.float64 or (
        pd.api.types.is_integer_dtype(series.dtype) and not pd.api.types.is_extension_array_dtype(series.dtype)
    ):
        return series.to_numpy()
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


_CHUNK_ROWS = 1 << 20  # rows per pass: small temporaries that stay in cache and get reused


def _aggregate(
    frame: pd.DataFrame,
    keys: Sequence[str],
    specs: dict[str, tuple[str, str]],
    where: np.ndarray | None = None,
) -> pd.DataFrame:
    """Group `frame` by `keys` and aggregate: specs = {out: (column, how)}.

    how: sum, mean, count (non-null), size (rows), min, max, first, last (by row order,
    skipping nulls). Nulls are skipped like pandas does; rows with a null key are dropped.
    `where` (bool per row) restricts the rows.
    Equivalent to frame[where].groupby(keys, observed=True).agg(...), but built from numpy
    bincount / ufunc.at on one int64 group code per row, in chunks of rows: on 10 M rows
    several times faster than pandas' multi-key grouper, no sort, no copy of the rows (rows
    left out go to a dummy slot dropped at the end) and no 10 M-row temporaries.
    """
    if where is not None:
        where = np.asarray(where, dtype=bool)
        if where.sum() < len(frame) // 2:  # few rows: copying them is cheaper
            needed = list(dict.fromkeys([*keys, *[c for c, how in specs.values() if how != "size"]]))
            frame, where = frame.loc[where, needed], None
    n = len(frame)
    key_codes = [_key_codes(frame[key]) for key in keys]
    radices = [max(len(values), 1) for _, values, _ in key_codes]
    assert float(np.prod(radices, dtype=float)) < 2**62, "group key overflow"
    total = int(np.prod(radices, dtype=float))
    has_missing = any(len(codes) and codes.min() + offset < 0 for codes, _, offset in key_codes)
    columns = {column: _numeric_values(frame[column]) for column, how in specs.values() if how != "size"}
    # min() is NaN when any value is: a null check without a per-row temporary.
    has_nan = {
        column: v.dtype.kind == "f" and bool(len(v)) and bool(np.isnan(v.min())) for column, v in columns.items()
    }

    def codes_of(chunk: slice) -> np.ndarray:
        """The group code of each row in `chunk`; `total` for rows left out."""
        combined = np.zeros(chunk.stop - chunk.start, dtype=np.int64)
        invalid = None if where is None else ~where[chunk]
        for (codes, _, offset), size in zip(key_codes, radices):
            part = codes[chunk]
            if has_missing:
                missing = part + offset < 0
                invalid = missing if invalid is None else invalid | missing
            combined *= size
            combined += part
            if offset:
                combined += offset
        if invalid is not None:
            combined[invalid] = total
        return combined

    dense = total < max(n // 4, 1 << 16)
    if dense:  # the code is the slot; empty slots are dropped at the end
        slots = total + 1
        chunks = [slice(start, min(start + _CHUNK_ROWS, n)) for start in range(0, n, _CHUNK_ROWS)]
        ids_of = codes_of
    else:  # sparse codes: number the groups first (one pass over all rows)
        all_ids, uniques = pd.factorize(codes_of(slice(0, n)), sort=True)
        uniques = np.asarray(uniques, dtype=np.int64)
        slots = len(uniques) + (0 if len(uniques) and uniques[-1] == total else 1)
        chunks = [slice(0, n)]
        ids_of = lambda chunk: all_ids[chunk]  # noqa: E731
    dummy = slots - 1

    rows_counted = np.zeros(slots, dtype=np.int64)
    state: dict[str, dict[str, np.ndarray]] = {}
    for name, (column, how) in specs.items():
        if how in ("sum", "mean", "count"):
            state[name] = {"sum": np.zeros(slots), "count": np.zeros(slots, dtype=np.int64)}
        elif how in ("min", "max"):
            state[name] = {"value": np.full(slots, np.nan)}
        elif how in ("first", "last"):
            state[name] = {"pick": np.full(slots, -1 if how == "last" else n, dtype=np.int64)}
        elif how != "size":
            raise ValueError(f"_aggregate: unknown aggregation {how!r}")
    for chunk in chunks:
        ids = ids_of(chunk)
        rows_counted += np.bincount(ids, minlength=slots)
        rows = None
        for name, (column, how) in specs.items():
            if how == "size":
                continue
            values = columns[column][chunk].astype(np.float64, copy=False)  # ints: per chunk
            nan = np.isnan(values) if has_nan[column] else None
            ids_ok = ids if nan is None else np.where(nan, dummy, ids)
            if how in ("sum", "mean", "count"):
                state[name]["count"] += np.bincount(ids_ok, minlength=slots)
                if how != "count":
                    weights = values if nan is None else np.where(nan, 0.0, values)
                    state[name]["sum"] += np.bincount(ids_ok, weights=weights, minlength=slots)
            elif how in ("min", "max"):
                (np.fmin if how == "min" else np.fmax).at(state[name]["value"], ids_ok, values)
            else:
                rows = np.arange(chunk.start, chunk.stop) if rows is None else rows
                (np.maximum if how == "last" else np.minimum).at(state[name]["pick"], ids_ok, rows)

    if dense:
        group_codes = np.flatnonzero(rows_counted[:total])
        select = group_codes
    else:
        group_codes = uniques[uniques < total]
        select = np.arange(len(group_codes))
    out = {}
    remaining = group_codes.copy()
    for key_name, size, (_, values, _) in zip(reversed(keys), reversed(radices), reversed(key_codes)):
        code = remaining % size
        remaining //= size
        out[key_name] = values[code] if len(values) else np.array([], dtype=object)
    out = {k: out[k] for k in keys}
    for name, (column, how) in specs.items():
        if how == "size":
            out[name] = rows_counted[select]
        elif how == "count":
            out[name] = state[name]["count"][select]
        elif how == "sum":
            out[name] = state[name]["sum"][select]
        elif how == "mean":
            count, total_sum = state[name]["count"][select], state[name]["sum"][select]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = np.where(count > 0, total_sum / np.maximum(count, 1), np.nan)
        elif how in ("min", "max"):
            out[name] = state[name]["value"][select]
        else:
            pick = state[name]["pick"][select]
            found = (pick >= 0) & (pick < n)
            result = np.full(len(pick), np.nan)
            result[found] = columns[column][pick[found]]
            out[name] = result
    return pd.DataFrame(out)


def _as_str_keys(frame: pd.DataFrame) -> pd.DataFrame:
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
    train = _aggregate(metrics, [*keys, "epoch"], specs, where=_split_mask(metrics, "train"))
    test_specs = {"test_cost": ("cost", "last"), "test_accuracy": ("accuracy", "last"),
                  "test_time": ("wall_time", "max")}
    if "step" in metrics:
        test_specs["test_step"] = ("step", "max")
    test = _aggregate(metrics, [*keys, "epoch"], test_specs, where=_split_mask(metrics, "test"))
    train = train.rename(columns={
        "cost_mean": "train_cost", "accuracy_mean": "train_accuracy", "rows": "steps",
        "t_first": "_t_first", "t_last": "_t_last",
    })
    table = train.merge(test, on=[*keys, "epoch"], how="outer")
    table = _as_str_keys(table).sort_values([*keys, "epoch"], kind="stable").reset_index(drop=True)
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
    cases = _as_str_keys(cases)
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
        cases_str = _as_str_keys(cases)
        join = [k for k in keys if k in cases_str]
        table = cases_str[join].drop_duplicates().merge(table, on=join, how="outer")
    if ledger is not None and "case_id" in ledger and len(ledger):
        ledger_str = _as_str_keys(ledger)
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


# ---- what tells cases apart ----------------------------------------------------------------

# Columns of the cases table that are not settings (ids, resources, ledger state).
NOT_SETTINGS = frozenset({
    "run", "case_id", "name", "group", "seed", "num_cpus", "num_gpus", "steps_total", "settings_json",
    "state", "reason_class", "reason", "complete",
})


def _setting_text(value) -> str:
    """A setting as people write it: 0.002, True, [50, 50], None."""
    if isinstance(value, (float, np.floating)):
        return "None" if np.isnan(value) else f"{value:g}"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None or value is pd.NA:
        return "None"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting_text(v) for v in value) + "]"
    return str(value)


def varying_settings(cases: pd.DataFrame, include_seed: bool = False) -> list[str]:
    """The settings (columns of the cases table) whose value differs between cases, in table
    order; seed only with include_seed. Several runs: differences across runs count too."""
    columns = [c for c in cases.columns if c not in NOT_SETTINGS or (include_seed and c == "seed")]
    return [c for c in columns if cases[c].map(_setting_text).nunique() > 1]


def setting_labels(table: pd.DataFrame, cases: pd.DataFrame | None = None, by: str = "group",
                   settings: Sequence[str] | None = None) -> pd.Series:
    """Per row of `table`: its `by` value followed by the settings that differ between cases,
    e.g. "mid: lr=0.002" or "b: schedule=unfair-back augment=True"; with a run column
    (several runs), "RUN/b: ...". settings: default varying_settings(cases)."""
    settings = list(varying_settings(table if cases is None else cases) if settings is None else settings)
    if settings and cases is not None:  # the values from cases (a table may hold a same-named result)
        keys = case_keys(table)
        values = _as_str_keys(cases)[[*keys, *settings]].drop_duplicates(keys)
        table = _as_str_keys(table[[*keys, by]]).merge(values, on=keys, how="left")
    label = table[by].astype(str)
    if "run" in table:
        label = table["run"].astype(str) + "/" + label
    if settings:
        parts = [c + "=" + table[c].map(_setting_text) for c in settings]
        text = parts[0]
        for part in parts[1:]:
            text = text + " " + part
        label = label + ": " + text
    return label.rename("label")


# ---- cases that went wrong ----------------------------------------------------------------

# Classes of the built-in data sets (when the case keeps all of them).
DATA_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "moons": 2}
COLLAPSE_MARGIN = 0.05  # final accuracy within this of chance counts as back at chance


def chance_accuracy(cases: pd.DataFrame) -> pd.Series:
    """1 / number of classes per row of the cases table (NaN when unknown): data.classes if
    set, else the data set's own classes."""
    def classes(row) -> float:
        kept = row.get("data.classes")
        if isinstance(kept, str) and kept.strip() not in ("", "None", "null"):
            kept = json.loads(kept)
        if isinstance(kept, np.ndarray):
            kept = kept.tolist()
        if isinstance(kept, (list, tuple)) and len(kept):
            return float(len(kept))
        return float(DATA_CLASSES.get(str(row.get("data.name")), np.nan))

    if len(cases) == 0:
        return pd.Series([], dtype=float, name="chance")
    return (1.0 / cases.apply(classes, axis=1).astype(float)).rename("chance")


def flag_cases(per_case_table: pd.DataFrame, cases: pd.DataFrame | None = None,
               chance: float | pd.Series | None = None) -> pd.DataFrame:
    """The cases that diverged or collapsed (definitions in the module docstring), one row
    each: keys, name, state, flag, chance, best_test_acc, best_epoch, final_test_acc, reason.

    chance: one number for every case, or per row of per_case_table; default from
    cases' data settings (chance_accuracy)."""
    table = _attach(per_case_table, cases, ["name", "state"]) if cases is not None else per_case_table
    if chance is None:
        if cases is None:
            raise ValueError("flag_cases: pass cases (for the number of classes) or chance")
        known = _as_str_keys(cases)
        known = known.assign(chance=chance_accuracy(known).to_numpy())
        join = case_keys(table)
        table = _as_str_keys(table).drop(columns=["chance"], errors="ignore").merge(
            known[join + ["chance"]].drop_duplicates(join), on=join, how="left")
    else:
        table = table.assign(chance=chance.to_numpy() if isinstance(chance, pd.Series) else float(chance))
    best, final, chance_values = table["best_test_acc"], table["final_test_acc"], table["chance"]
    collapsed = (best >= chance_values + (1 - chance_values) / 2) & (final <= chance_values + COLLAPSE_MARGIN)
    diverged = table["state"].astype(str).eq("diverged") if "state" in table else pd.Series(False, index=table.index)
    table = table.assign(flag=np.where(diverged, "diverged", np.where(collapsed.fillna(False), "collapsed", "")))
    columns = [*case_keys(table), "name", "state", "flag", "chance", "best_test_acc", "best_epoch",
               "final_test_acc", "reason"]
    out = table[table["flag"] != ""]
    return out[[c for c in columns if c in out]].reset_index(drop=True)


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
    rows = _as_str_keys(rows.dropna(subset=[column]))
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


# ---- across seeds and factors -------------------------------------------------------------


def ci_half_width(sd: float | np.ndarray, n: int | np.ndarray, level: float = 0.95):
    """Half-width of the t confidence interval of a mean: t(1-(1-level)/2, n-1) * sd / sqrt(n); NaN for n < 2."""
    # stdtrit(df, p) is scipy.stats.t.ppf(p, df); scipy.special imports ~10x faster than scipy.stats.
    from scipy.special import stdtrit

    n = np.asarray(n, dtype=float)
    sd = np.asarray(sd, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stdtrit(np.where(n >= 2, n - 1, np.nan), 1 - (1 - level) / 2)
        result = np.where(n >= 2, t * sd / np.sqrt(n), np.nan)
    return result if result.ndim else float(result)


def _by_list(table: pd.DataFrame, by: str | Sequence[str]) -> list[str]:
    by = [by] if isinstance(by, str) else list(by)
    if "run" in table and "run" not in by:
        by = ["run", *by]  # several runs: summarise each run's groups separately
    return by


def _complete_rows(table: pd.DataFrame, complete_only: bool) -> pd.DataFrame:
    """Leave out the cases whose state is known and not done (pending, running, failed,
    diverged): their numbers are partial. 'unknown' (no ledger entry, or a table built
    without one) stays in, so per_case(pd.read_parquet(...), ...) still summarises."""
    if complete_only and "state" in table:
        return table[table["state"].isin(["done", "unknown"]) | table["state"].isna()]
    return table


def seed_summary(
    per_case_table: pd.DataFrame,
    by: str | Sequence[str] = "group",
    columns: Iterable[str] = SUMMARY_COLUMNS,
    complete_only: bool = True,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per group (cases differing only by seed): n and, per column, mean, sd and ci95.

    ci95 is the half-width t(0.975, n-1) * sd / sqrt(n) with sd the sample standard
    deviation (ddof 1) and n the column's non-null count; NaN when n < 2. With
    complete_only, cases whose state is not done are left out (their numbers are partial).
    With several runs, groups are summarised per run.
    """
    by = _by_list(per_case_table, by)
    columns = [c for c in columns if c in per_case_table]
    table = _complete_rows(per_case_table, complete_only)
    grouped = table.groupby(by, sort=True, dropna=False)
    # Groups with no complete case stay, with n = 0 (never silently dropped).
    every_group = per_case_table.groupby(by, sort=True, dropna=False).size().index
    out = grouped.size().rename("n").reindex(every_group, fill_value=0).to_frame()
    for column in columns:
        values = grouped[column]
        count = values.count().reindex(every_group, fill_value=0)
        out[f"{column}_mean"] = values.mean()
        out[f"{column}_sd"] = values.std(ddof=1)
        out[f"{column}_ci95"] = ci_half_width(out[f"{column}_sd"].to_numpy(), count.to_numpy(), level)
    return out.reset_index()


def _attach(table: pd.DataFrame, cases: pd.DataFrame | None, needed: Iterable[str]) -> pd.DataFrame:
    """table plus the `needed` columns it lacks, taken from cases by case key."""
    missing = [c for c in needed if c not in table]
    if not missing:
        return table
    if cases is None:
        raise ValueError(f"columns {missing} are not in the table; pass cases")
    absent = [c for c in missing if c not in cases]
    if absent:
        raise ValueError(f"columns {absent} are in neither the table nor cases")
    return _with_cases(_as_str_keys(table), cases, case_keys(table), columns=missing)


def factor_table(
    per_case_table: pd.DataFrame,
    cases: pd.DataFrame | None = None,
    rows: str | Sequence[str] = "schedule",
    columns: str | Sequence[str] = "augment",
    value: str = "final_test_acc",
    complete_only: bool = True,
) -> pd.DataFrame:
    """Mean of `value` for each combination of `rows` x `columns` settings (a pivot)."""
    rows_list = [rows] if isinstance(rows, str) else list(rows)
    columns_list = [columns] if isinstance(columns, str) else list(columns)
    table = _complete_rows(_attach(per_case_table, cases, rows_list + columns_list), complete_only)
    return table.pivot_table(index=rows_list, columns=columns_list, values=value, aggfunc="mean", observed=True)


def against_baseline(
    per_case_table: pd.DataFrame,
    cases: pd.DataFrame | None,
    baseline: str,
    value: str = "final_test_acc",
    complete_only: bool = True,
    detail: bool = False,
    level: float = 0.95,
    baseline_run: str | None = None,
) -> pd.DataFrame:
    """Each group's difference to the baseline, paired by seed.

    baseline: a group name, else a case name. For every other case, diff = its value minus
    the baseline's value at the same seed (and run); a case whose seed the baseline lacks
    gets NaN. Per group: n_pairs, mean value and baseline over the pairs, diff_mean, diff_sd
    and diff_ci95 (t half-width, NaN for fewer than 2 pairs). detail=True returns the
    per-case pairs instead.
    Several runs: with baseline_run, or when only one run has the baseline, every case of
    every run is paired (by seed) with that run's baseline; when several runs have it, each
    run is compared with its own.
    """
    table = _attach(per_case_table, cases, ["name", "group", "seed"])
    every_group = table.groupby(_by_list(table, "group"), sort=True, dropna=False).size().index
    table = _complete_rows(table, complete_only)
    is_base = table["group"] == baseline
    if not is_base.any():
        is_base = table["name"] == baseline
    if not is_base.any():
        known = sorted(set(table["group"].dropna().astype(str)))
        raise ValueError(f"baseline {baseline!r} is neither a group nor a case name; groups: {', '.join(known)}")
    across_runs = False
    if "run" in table:
        if baseline_run is None and table.loc[is_base, "run"].nunique() == 1 and table["run"].nunique() > 1:
            baseline_run = str(table.loc[is_base, "run"].iloc[0])
        if baseline_run is not None:
            is_base &= table["run"].astype(str) == str(baseline_run)
            if not is_base.any():
                raise ValueError(f"baseline {baseline!r} is not in run {baseline_run!r}")
            across_runs = True
    pair_on = (["run"] if "run" in table and not across_runs else []) + ["seed"]
    base = table[is_base].groupby(pair_on, dropna=False)[value].mean().rename("baseline_value").reset_index()
    others = table[~is_base].merge(base, on=pair_on, how="left")
    others["value"] = others[value]
    others["diff"] = others["value"] - others["baseline_value"]
    keys = case_keys(table)
    if detail:
        front = [*keys, "name", "group", "seed", "value", "baseline_value", "diff"]
        return others[front].reset_index(drop=True)
    by = _by_list(others, "group")
    paired = others.assign(
        value=others["value"].where(others["diff"].notna()),
        baseline_value=others["baseline_value"].where(others["diff"].notna()),
    )
    grouped = paired.groupby(by, sort=True, dropna=False)
    out = pd.DataFrame({
        "n_pairs": grouped["diff"].count(),
        "value_mean": grouped["value"].mean(),
        "baseline_mean": grouped["baseline_value"].mean(),
        "diff_mean": grouped["diff"].mean(),
        "diff_sd": grouped["diff"].std(ddof=1),
    })
    # Every group but the baseline's is a row, also with no complete case (n_pairs 0, NaN).
    base_keys = set(table.loc[is_base, _by_list(table, "group")].itertuples(index=False, name=None))
    other_keys = set(others[by].itertuples(index=False, name=None))
    keep = [g for g in every_group if (g if isinstance(g, tuple) else (g,)) not in base_keys
            or (g if isinstance(g, tuple) else (g,)) in other_keys]
    out = out.reindex(pd.Index(keep, name=out.index.name) if out.index.nlevels == 1
                      else pd.MultiIndex.from_tuples(keep, names=out.index.names))
    out["n_pairs"] = out["n_pairs"].fillna(0).astype(np.int64)
    out["diff_ci95"] = ci_half_width(out["diff_sd"].to_numpy(), out["n_pairs"].to_numpy(), level)
    out.insert(0, "baseline", baseline)
    return out.reset_index()


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
    table = _attach(per_case_table, cases, ["name", "group"])
    checked = cases is not None and "case_id" in cases
    by_id = _as_str_keys(cases).drop_duplicates("case_id").set_index("case_id") if checked else None
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


# ---- schedules --------------------------------------------------------------------------


def _as_list(value) -> list:
    """A list column's value: a tuple as analysis.load gives it, or a JSON string (a frame
    read directly from an older run's Parquet)."""
    return json.loads(value) if isinstance(value, str) else list(value)


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
    combos = _aggregate(metrics, [*keys, "updates", "layers"], {"steps": ("", "size")}, where=where)
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
    out = _as_str_keys(out[columns]).sort_values([*keys, "layer_index"], kind="stable").reset_index(drop=True)
    return _with_cases(out, cases, keys, columns=["name", "group", "seed", "schedule"])
