"""Statistics across seeds and factors: pure functions, per-case table in, summary out.

A group is the cases that differ only by seed. Summaries leave out the cases whose state is
known and not done (their numbers are partial) unless complete_only=False. Intervals are
two-sided t intervals of a mean: mean ± t(1 - (1 - level) / 2, n - 1) · sd / √n, sd the
sample standard deviation (ddof 1); NaN for n < 2.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.load import case_keys
from analysis.tables import SUMMARY_COLUMNS, attach


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
    table = _complete_rows(attach(per_case_table, cases, rows_list + columns_list), complete_only)
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
    table = attach(per_case_table, cases, ["name", "group", "seed"])
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
