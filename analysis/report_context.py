"""The report's shared state: what a section reads (ReportContext), what it returns (Section),
markdown_table, the options and the progress line. Sections and the list of them are in
analysis.report; figures in analysis.figures.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from analysis.flags import flag_cases
from analysis.labels import setting_labels, varying_settings
from analysis.load import RunData, case_keys
from analysis.rundir import ENDED, RunDir, StorageError
from analysis.rundir.liveness import Liveness, display_state, driver_liveness, interrupted_line
from analysis.stats import seed_summary
from analysis.tables import SUMMARY_COLUMNS, as_str_keys, epoch_summary, per_case, update_counts

WEIGHT_CASES_PER_FIGURE = 8  # rows (cases) of one weights figure; more cases: more figures
SAMPLE_CASES = 16  # many cases: per-case figures draw at most this many (two weights figures)
# Datasets the figures read for the cases they draw only (ReportContext.case_rows), not whole.
PER_CASE_DATASETS = ("weights", "layer_stats", "boundary")
# More cases than this (what one weights figure holds): the report reads groups.
MANY_CASES = WEIGHT_CASES_PER_FIGURE


# ---- markdown -----------------------------------------------------------------------------


def _cell(value, float_format: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        text = float_format.format(value)
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4f}", index: bool = False,
                   max_rows: int | None = None) -> str:
    """A GitHub-flavoured markdown table (what DataFrame.to_markdown gives, without tabulate).

    Numbers are right-aligned; NaN and None are empty cells; '|' in text is escaped.
    max_rows: show only the first rows and say how many were left out.
    """
    if index:
        frame = frame.reset_index()
    columns = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    shown = frame if max_rows is None else frame.head(max_rows)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    # Float columns holding only whole numbers (counts with NaN for "none") print as integers.
    whole = {
        i for i, c in enumerate(frame.columns)
        if pd.api.types.is_float_dtype(frame[c]) and frame[c].notna().any()
        and bool(np.all(np.mod(frame[c].dropna().to_numpy(dtype=float), 1) == 0))
    }
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |",
             "|" + "|".join("---:" if is_number else ":---" for is_number in numeric) + "|"]
    for row in shown.itertuples(index=False, name=None):
        cells = [_cell(v, "{:.0f}" if i in whole else float_format) for i, v in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if max_rows is not None and len(frame) > max_rows:
        lines.append(f"\n*{len(frame) - max_rows} more rows in the CSV.*")
    return "\n".join(lines)


class ReportError(ValueError):
    """A report that cannot be written as asked (e.g. a baseline no run has); one line."""


@dataclass
class ReportOptions:
    """What write_report was asked for (its keyword arguments)."""

    baseline: str | None = None
    target_accuracy: float | None = None
    reference: str | None = None
    max_figure_cases: int | None = 4
    figures: bool = True
    many_cases: int = MANY_CASES


@dataclass
class Section:
    """What a section adds to the report: `title` (a "## title" heading; None: none), markdown
    `lines`, `csvs` (name -> table, written as NAME.csv and listed under "Files") and
    `figures` ((caption, file name) of PNGs saved in out_dir, shown after the lines)."""

    title: str | None
    lines: list[str] = field(default_factory=list)
    csvs: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[tuple[str, str]] = field(default_factory=list)


class Progress:
    """Tells what the report is drawing: "[bplab] report: WHAT" on `stream`, once the report has
    taken more than `after` seconds (a short report prints nothing)."""

    def __init__(self, stream=None, after: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self.stream, self.after, self.clock = stream or sys.stderr, after, clock
        self.start = clock()

    def __call__(self, what: str) -> None:
        elapsed = self.clock() - self.start
        if elapsed >= self.after:
            print(f"[bplab] report: {what} ({elapsed:.0f} s so far)", file=self.stream, flush=True)


class ReportContext:
    """The loaded runs, the output folder, the options and the tables sections share (each
    computed on first use, then kept)."""

    def __init__(self, data: RunData, options: ReportOptions, out_dir: Path | None = None,
                 progress: Callable[[str], None] | None = None, per_case_files: bool = False):
        self.data, self.options, self.out_dir = data, options, out_dir
        # per_case_files: data holds no weights and layer statistics; case_rows reads those of
        # the cases a figure draws (at 4,000 cases, reading every case's weights was most of the
        # report's loading, for the 16 it draws)
        self.per_case_files = per_case_files
        self.progress = progress or (lambda what: None)
        self._runs: dict[str, RunDir] = {}  # run label -> its RunDir (case_rows, logged)
        self.baseline_name = self.baseline_run = None
        if options.baseline is not None:
            self.baseline_name, self.baseline_run = _parse_baseline(self.table, options.baseline)

    @property
    def cases(self) -> pd.DataFrame:
        return self.data.cases

    @cached_property
    def keys(self) -> list[str]:
        """["case_id"], or ["run", "case_id"] with several runs."""
        return case_keys(self.cases) if len(self.cases.columns) else case_keys(self.data.metrics)

    @cached_property
    def table(self) -> pd.DataFrame:
        """One row per case (analysis.tables.per_case); `state` as `bplab status` shows it: a
        case started and not finished in a run no driver holds is ``interrupted``."""
        table = per_case(self.data.metrics, self.cases, target_accuracy=self.options.target_accuracy)
        if len(table) and (~table["complete"]).any():
            table["state"] = self._shown_states(table)
        return table

    @cached_property
    def drivers(self) -> dict[str, Liveness]:
        """Run label -> whether a driver holds it, and when one was last seen (the lease and
        the ledger's times, analysis.rundir.liveness)."""
        ledger = self.data.ledger
        out = {}
        for label in self.data.paths:
            rows = ledger[ledger["run"].astype(str) == label] if "run" in ledger else ledger
            times = pd.to_numeric(rows.get("updated_at", pd.Series([], dtype=float)), errors="coerce").dropna()
            try:
                out[label] = driver_liveness(self._run(label), times.tolist())
            except (StorageError, OSError):  # not readable now: the ledger's states stand
                out[label] = Liveness(alive=True)
        return out

    def _shown_states(self, table: pd.DataFrame) -> np.ndarray:
        """The states of `table`'s rows as display_state gives them from the ledger entries."""
        ledger = as_str_keys(self.data.ledger)
        if not all(k in ledger for k in self.keys):
            return table["state"].to_numpy()
        entries = {tuple(row[k] for k in self.keys): row for row in ledger.to_dict("records")}
        only = next(iter(self.data.paths))
        shown = []
        for key, state in zip(table[self.keys].astype(str).itertuples(index=False, name=None), table["state"]):
            entry = entries.get(key)
            label = key[0] if len(key) == 2 else only
            shown.append(state if entry is None or state == "done" or label not in self.data.paths
                         else display_state(entry, self.drivers[label]))
        return np.array(shown, dtype=object)

    def interrupted_lines(self) -> list[str]:
        """Per run left unfinished with no driver alive: what happened and the command that
        continues it (analysis.rundir.liveness.interrupted_line)."""
        lines = []
        for label, location in self.data.paths.items():
            rows = self.table[self.table["run"].astype(str) == label] if "run" in self.table else self.table
            unfinished = int((~rows["state"].isin(ENDED)).sum())
            line = interrupted_line(location, self.drivers[label], unfinished) if unfinished else None
            if line:
                lines.append(line if len(self.data.paths) == 1 else f"{label}: {line}")
        return lines

    @cached_property
    def epochs(self) -> pd.DataFrame:
        """One row per case and epoch (analysis.tables.epoch_summary)."""
        return epoch_summary(self.data.metrics, self.cases)

    @cached_property
    def updates(self) -> pd.DataFrame:
        return update_counts(self.data.metrics, self.cases)

    @cached_property
    def settings(self) -> list[str]:
        """The settings that differ between cases (seed left out)."""
        return varying_settings(self.cases) if len(self.cases) else []

    @cached_property
    def group_settings(self) -> list[str]:
        """The settings that differ between groups."""
        return [c for c in self.settings if c != "seed"]

    @cached_property
    def case_settings(self) -> pd.DataFrame:
        """Case keys (str) and the varying settings, one row per case."""
        cases = as_str_keys(self.cases)
        return cases[[*self.keys, *self.settings]].drop_duplicates(self.keys)

    @cached_property
    def labels(self) -> pd.Series:
        """Per row of `table`: the case's name and the settings that tell it apart."""
        if not len(self.table):
            return pd.Series([], dtype=str)
        return setting_labels(self.table, self.cases, by="name", settings=self.settings)

    def group_labels(self, rows: pd.DataFrame, by: str = "group") -> pd.Series:
        """Per row of `rows` (one per group): the group and the settings that tell groups apart."""
        return setting_labels(rows, self.cases, by=by, settings=self.group_settings)

    @cached_property
    def flags(self) -> pd.DataFrame:
        if not len(self.table):
            return pd.DataFrame(columns=[*self.keys, "flag"])
        return flag_cases(self.table, self.cases)

    @cached_property
    def group_columns(self) -> list[str]:
        return [*(["run"] if "run" in self.table else []), "group"]

    @cached_property
    def several_seeds(self) -> bool:
        sizes = self.table.groupby(self.group_columns).size()
        return bool(len(sizes) and sizes.max() >= 2)

    @cached_property
    def many(self) -> bool:
        """More cases than options.many_cases: the report reads groups."""
        return len(self.table) > self.options.many_cases

    @cached_property
    def seeds(self) -> pd.DataFrame:
        """Per group: n and mean, sd, ci95 of the summary columns (analysis.stats.seed_summary)."""
        return seed_summary(self.table)

    @cached_property
    def groups(self) -> pd.DataFrame:
        """Per group: the settings that tell groups apart, cases (all), n (done), and per summary
        column mean, sd, ci95 (t half-width) and the interval low = mean - ci95, high = mean + ci95."""
        by = self.group_columns
        out = self.seeds.copy()
        for column in SUMMARY_COLUMNS:
            if f"{column}_mean" in out:
                at = out.columns.get_loc(f"{column}_ci95") + 1
                out.insert(at, f"{column}_low", out[f"{column}_mean"] - out[f"{column}_ci95"])
                out.insert(at + 1, f"{column}_high", out[f"{column}_mean"] + out[f"{column}_ci95"])
        sizes = self.table.groupby(by, sort=True, dropna=False).size().rename("cases").reset_index()
        out = out.merge(sizes, on=by, how="left")
        if self.group_settings:
            first = self.table[list(dict.fromkeys([*self.keys, *by]))].drop_duplicates(by).merge(
                self.case_settings[[*self.keys, *self.group_settings]], on=self.keys, how="left")
            out = out.merge(first.drop(columns=[k for k in self.keys if k not in by]), on=by, how="left")
        front = [*by, *self.group_settings, "cases", "n"]
        return out[front + [c for c in out.columns if c not in front]]

    def figure_cases(self, limit: int | None, mask: np.ndarray | None = None) -> list[tuple[tuple, str]]:
        """The cases to draw (all, or the first `limit`): one per group first (first seed), done
        cases first; each as (case key as str, its label)."""
        table = self.table.assign(_label=self.labels.to_numpy())
        if mask is not None:
            table = table[mask]
        if limit is None:  # every case, in table order (run, group, seed)
            chosen = table.sort_values([c for c in ("run", "group", "seed") if c in table], kind="stable")
        else:
            ordered = table.sort_values(["complete", "group", "seed"], ascending=[False, True, True], kind="stable")
            firsts = ordered.drop_duplicates(self.group_columns)
            chosen = pd.concat([firsts, ordered.drop(firsts.index)]).head(limit)
        return [(tuple(str(row[k]) for k in self.keys), str(row["_label"])) for _, row in chosen.iterrows()]

    def _run(self, label: str) -> RunDir:
        """The run `label` of data, opened once."""
        if label not in self._runs:
            self._runs[label] = RunDir.open(self.data.paths[label])
        return self._runs[label]

    def _loaded(self, kind: str) -> pd.DataFrame | None:
        """The rows of dataset `kind` in data, when they were read with it (else None)."""
        if self.per_case_files and kind in PER_CASE_DATASETS:
            return None
        try:
            return getattr(self.data, kind)
        except AttributeError:
            return None

    def logged(self, kind: str) -> set[tuple]:
        """The keys (as str) of the cases that have rows of dataset `kind` (weights, layer_stats,
        boundary)."""
        frame = self._loaded(kind)
        if frame is not None:
            return set(frame[self.keys].astype(str).drop_duplicates().itertuples(index=False, name=None))
        found = set()
        for label in self.data.paths:
            for case_id in self._run(label).cases_with(kind):
                found.add((label, case_id) if len(self.keys) == 2 else (case_id,))
        return found

    def case_rows(self, kind: str, keys: Iterable[tuple]) -> pd.DataFrame:
        """The rows of dataset `kind` (weights, layer_stats, boundary) of the cases `keys` (as str)
        only, case_id (and run) as str: taken from data, or read from those cases' own files."""
        keys = [tuple(map(str, key)) for key in keys]
        frame = self._loaded(kind)
        if frame is not None:
            text = frame[self.keys[0]].astype(str)
            for column in self.keys[1:]:
                text = text + "\x1f" + frame[column].astype(str)
            return as_str_keys(frame[text.isin({"\x1f".join(key) for key in keys}).to_numpy()])
        import pyarrow as pa

        tables = []
        for key in keys:
            label, case_id = key if len(key) == 2 else (next(iter(self.data.paths)), key[0])
            if label not in self.data.paths:
                continue
            table = self._run(label).read_case(kind, case_id)  # its committed (published) files only
            if table is None:
                continue
            table = table.append_column("case_id", pa.array([case_id] * table.num_rows, pa.string()))
            if len(key) == 2:
                table = table.append_column("run", pa.array([label] * table.num_rows, pa.string()))
            tables.append(table)
        if not tables:
            return pd.DataFrame(columns=self.keys)
        frame = pa.concat_tables(tables, promote_options="default").to_pandas()
        return frame[[*self.keys, *[c for c in frame.columns if c not in self.keys]]]

    @cached_property
    def sample(self) -> list[tuple[tuple, str]]:
        """With many cases, the cases per-case figures draw: the first seed of each group (a
        done case when the group has one), or that of SAMPLE_CASES groups evenly spaced in
        group order when there are more groups."""
        table = self.table.assign(_label=self.labels.to_numpy())
        firsts = table.sort_values(["complete", "seed"], ascending=[False, True], kind="stable") \
            .drop_duplicates(self.group_columns).sort_values(self.group_columns, kind="stable")
        if len(firsts) > SAMPLE_CASES:
            firsts = firsts.iloc[np.unique(np.linspace(0, len(firsts) - 1, SAMPLE_CASES).round().astype(int))]
        return [(tuple(str(row[k]) for k in self.keys), str(row["_label"])) for _, row in firsts.iterrows()]


def _parse_baseline(table: pd.DataFrame, baseline: str) -> tuple[str, str | None]:
    """(group or case name, run label or None) for --baseline CASE or RUN:CASE; ReportError
    (one line) when no run has it."""
    runs = [str(r) for r in dict.fromkeys(table["run"])] if "run" in table else []
    name, run = baseline, None
    if ":" in baseline:
        prefix, rest = baseline.rsplit(":", 1)
        if runs and prefix in runs:
            name, run = rest, prefix
        elif not runs:
            name = rest  # one run: RUN:CASE names it; the case must still be there
    rows = table if run is None else table[table["run"].astype(str) == run]
    if not (rows["group"].astype(str).eq(name).any() or rows["name"].astype(str).eq(name).any()):
        groups = sorted(set(rows["group"].dropna().astype(str)))
        where = f" in run {run}" if run else ""
        hint = f"; runs: {', '.join(runs)}" if runs and run is None and ":" in baseline else ""
        raise ReportError(f"--baseline {baseline}: no case or group {name!r}{where}; groups: "
                          f"{', '.join(groups) or 'none'}{hint}")
    return name, run
