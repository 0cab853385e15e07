"""Read a run directory (or several) into tidy pandas frames.

What a run directory holds, and which of its rows are committed, is analysis.rundir's
business (its layout.py lists every file); this module turns the committed rows into frames.
`load` accepts a local path or a `pyarrow.fs` URI (file:///x, s3://bucket/run, ...).
No TensorFlow, no Ray; nothing runs at import time.

Every dataset registered in analysis.rundir.layout.DATASETS (metrics, layer_stats, weights,
boundary, alignment, ...) is read the same way: committed rows only, the case's `name` and
`group` right after case_id (categoricals, so a table per case name needs no join), the
columns in the types the layout documents (an empty read still has them).

case_id: pyarrow's and pandas' hive readers guess partition types, so an all-digit case_id
("000123") would come back as the integer 123. Here the partition key is always read as a
string. In the per-case frames (cases, ledger) it is a plain `str` column; in the per-row
frames it is a pandas categorical whose categories are those strings (ten million repeated
strings cost memory and make groupby slow), unless `categorical=False`. Low-cardinality
string columns (split, layer, quantity, ...) are read dictionary-encoded -> categorical.

List columns: metrics' updates (list<int64>) and layers (list<string>) become categoricals
whose categories are tuples, e.g. (1, 1, 2): hashable, so they group and compare, and a few
distinct lists over millions of rows cost one code per row. In `cases`, list settings
(hidden, quirks, data.classes) are tuples too. Older runs (lists as JSON strings, an untyped
cases table) are converted on read by analysis.rundir.legacy, so old and new runs load alike.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from analysis.rundir import DATASETS, RunDir, legacy
from analysis.rundir import local_path as _local_path, resolve as _resolve
from workers import settings as settings_module

# The columns each per-row table has, and their types (for empty frames and for columns that
# one Parquet part holds as all-null): the layout's.
METRICS_SCHEMA = DATASETS["metrics"].columns
WEIGHTS_SCHEMA = DATASETS["weights"].columns
LAYER_STATS_SCHEMA = DATASETS["layer_stats"].columns

# The metrics columns per_case needs: load(run, metrics_columns=PER_CASE_COLUMNS) reads about
# 40 % of the bytes of a full read. epoch_summary also wants step and lr: TABLE_COLUMNS.
PER_CASE_COLUMNS = ("split", "epoch", "cost", "accuracy", "examples", "wall_time")
TABLE_COLUMNS = (*PER_CASE_COLUMNS, "step", "lr")

LEDGER_COLUMNS = [
    "case_id", "name", "state", "reason_class", "reason", "diverged_step", "epoch", "step",
    "commit_seq", "attempts", "node", "gpu", "updated_at",
]
# The state a case gets when the cases table lists it but the ledger has no entry for it.
NO_LEDGER_STATE = "unknown"
# The datasets that are RunData fields of their own; every other registered one is in `more`.
_FIELDS = ("metrics", "weights", "layer_stats")
# Heavy per-case datasets (not in _FIELDS): `load` reads them on first access of the attribute,
# not up front. A decision-boundary grid is 14,400 rows a case: 400 cases' grids held most of
# a default load's memory (benchmarks/README.md), and only a few figures read them.
LAZY = ("boundary",)


@dataclass
class RunData:
    """Everything `load` read: tidy frames plus the manifest(s).

    With several runs every frame has a leading `run` column and (run, case_id) is the key.
    `cases` holds the ledger state merged in (`state`, `reason_class`, `reason`, `complete`),
    so a failed or pending case is still a row, flagged, never dropped. Every registered
    dataset is an attribute: `data.metrics`, `data.layer_stats`, `data.weights`,
    `data.boundary`, `data.alignment`, ...
    """

    metrics: pd.DataFrame
    cases: pd.DataFrame
    ledger: pd.DataFrame
    weights: pd.DataFrame
    layer_stats: pd.DataFrame
    manifests: dict[str, dict] = field(default_factory=dict)
    """run label -> manifest dict."""
    paths: dict[str, str] = field(default_factory=dict)
    """run label -> the path or URI it was read from."""
    more: dict[str, pd.DataFrame] = field(default_factory=dict)
    """The other registered datasets (boundary, alignment, ...), by name."""
    pending: dict[str, Callable[[], pd.DataFrame]] = field(default_factory=dict, repr=False)
    """Datasets not read yet (LAZY): name -> what reads them; read on first access, then in `more`."""

    def __getattr__(self, name: str) -> pd.DataFrame:
        more = self.__dict__.get("more") or {}
        if name in more:
            return more[name]
        pending = self.__dict__.get("pending") or {}
        if name in pending:
            more[name] = pending[name]()  # the rows committed when load ran (its ledger)
            del pending[name]
            return more[name]
        raise AttributeError(f"RunData has no {name!r} (datasets: {', '.join(DATASETS)})")

    def dataset(self, name: str) -> pd.DataFrame:
        """The frame of a registered dataset by name."""
        return getattr(self, name)

    @property
    def manifest(self) -> dict:
        """The manifest of the (first) run."""
        return next(iter(self.manifests.values()), {})

    @property
    def runs(self) -> list[str]:
        return list(self.manifests)

    @property
    def multi_run(self) -> bool:
        return "run" in self.cases.columns

    @property
    def not_done(self) -> pd.DataFrame:
        """The cases whose state is not 'done' (key, name, state, reason_class, reason)."""
        wanted = ("run", "case_id", "name", "group", "seed", "state", "reason_class", "reason")
        keep = [c for c in wanted if c in self.cases]
        return self.cases.loc[~self.cases["complete"], keep].reset_index(drop=True)


# ---- locations ----------------------------------------------------------------------------


def resolve(run: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow.fs URI."""
    return _resolve(run)


def local_path(run: str | os.PathLike) -> Path | None:
    """The local folder of a run, or None when it lives on a remote filesystem."""
    path = _local_path(run)
    return Path(path) if path is not None else None


# ---- per-row tables -----------------------------------------------------------------------


def _empty_frame(kind: str, columns: Iterable[str] | None, categorical: bool) -> pd.DataFrame:
    """An empty frame with the table's columns and dtypes (case_id first), as a read gives."""
    fields = [f for f in DATASETS[kind].columns if columns is None or f.name in columns]
    frame = pa.Table.from_batches([], pa.schema([("case_id", pa.string()), *fields])).to_pandas()
    for name in ["case_id", *DATASETS[kind].dictionary] if categorical else []:
        if name in frame:
            frame[name] = frame[name].astype(object).astype("category")
    return frame


def _read_dataset(
    run: RunDir,
    kind: str,
    ledger: dict,
    columns: Iterable[str] | None = None,
    filter: ds.Expression | None = None,
    categorical: bool = True,
) -> pd.DataFrame:
    """Read the committed rows of one dataset (files from RunDir.committed_files, each list
    hive-partitioned under its base folder) into pandas."""
    spec = DATASETS[kind]
    schema_hint = spec.columns
    dictionary = list(spec.dictionary)
    columns = None if columns is None else [c for c in columns if c != "case_id"]
    # The partition key is a string (never a guessed int), dictionary-encoded so pandas
    # gets a categorical without materialising one string per row.
    partitioning = ds.partitioning(
        pa.schema([("case_id", pa.dictionary(pa.int32(), pa.string()))]), flavor="hive", dictionaries="infer"
    )
    file_format = ds.ParquetFileFormat(read_options={"dictionary_columns": dictionary})
    fragments, dataset = [], None
    for base, paths in run.committed_files(kind, ledger):
        if not paths:
            continue
        part = ds.dataset(paths, filesystem=run.filesystem, format=file_format, partitioning=partitioning,
                          partition_base_dir=base, exclude_invalid_files=False)
        dataset = dataset or part
        fragments.extend(part.get_fragments())
    if not fragments:
        return _empty_frame(kind, columns, categorical)
    dataset = ds.FileSystemDataset(
        fragments, _unified_schema(dataset, fragments, schema_hint, dictionary), file_format, run.filesystem
    )
    wanted = ["case_id", *[c for c in (columns if columns is not None else dataset.schema.names) if c != "case_id"]]
    wanted = [c for c in wanted if c in dataset.schema.names]
    table = dataset.to_table(columns=wanted, filter=filter)
    # Columns asked for that no file has: add as nulls of the documented type.
    for name in columns or []:
        if name not in table.column_names and name in schema_hint.names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema_hint.field(name).type))
    table, list_kinds = _encode_lists(table, list(spec.lists))
    # Single-threaded conversion: measured 3-4x faster than threaded on 2 cores (10 M rows).
    frame = table.to_pandas(split_blocks=True, self_destruct=True, use_threads=False)
    del table
    for name, element in list_kinds.items():
        frame[name] = _tuples_categorical(frame[name], element)
        if not categorical:
            frame[name] = frame[name].astype(object)
    if not categorical:
        frame["case_id"] = frame["case_id"].astype(str)
    elif not pd.api.types.is_string_dtype(frame["case_id"].cat.categories.dtype):
        frame["case_id"] = frame["case_id"].cat.rename_categories(str)  # categories as plain str
    return frame


_JOIN = "\x1f"  # joins a list's elements for dictionary encoding (unit separator: not in names)


def _encode_lists(table: pa.Table, names: list[str]) -> tuple[pa.Table, dict[str, str]]:
    """Dictionary-encode list columns as joined strings (ten million small lists as Python
    objects would cost gigabytes): name -> how to parse the categories back ("json" for the
    JSON strings of older runs, see analysis.rundir.legacy, else the element type)."""
    import pyarrow.compute as pc

    kinds = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        t = column.type
        if legacy.is_json_list_column(t):  # a run that stored lists as JSON strings
            kinds[name] = "json"
            continue
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            continue
        element = "int" if pa.types.is_integer(t.value_type) else "float" if pa.types.is_floating(t.value_type) else "str"
        joined = pc.binary_join(column.cast(pa.list_(pa.string())), _JOIN)
        table = table.set_column(table.schema.get_field_index(name), name, pc.dictionary_encode(joined))
        kinds[name] = element
    return table, kinds


def _tuples_categorical(series: pd.Series, kind: str) -> pd.Series:
    """A categorical of joined strings (or JSON strings) -> the same categorical of tuples."""
    series = series if isinstance(series.dtype, pd.CategoricalDtype) else series.astype("category")
    convert = {"int": int, "float": float, "str": str}.get(kind)

    def parse(text):
        if kind == "json":
            return legacy.parse_json_list(text)
        return tuple(convert(x) for x in text.split(_JOIN)) if text else ()

    values = [parse(c) for c in series.cat.categories]
    unique = list(dict.fromkeys(values))  # two spellings of one list ("[1,2]", "[1, 2]") merge
    where = {value: i for i, value in enumerate(unique)}
    remap = np.array([where[v] for v in values] + [-1], dtype=np.int64)  # code -1 (null) stays -1
    codes = remap[series.cat.codes.to_numpy()]
    categories = pd.Index(unique, tupleize_cols=False, dtype=object)
    return pd.Series(pd.Categorical.from_codes(codes, categories=categories), index=series.index, name=series.name)


def _unified_schema(
    dataset: ds.FileSystemDataset, fragments: list, schema_hint: pa.Schema, dictionary_columns: list[str]
) -> pa.Schema:
    """The dataset's schema, made safe against parts that disagree.

    pyarrow takes the schema of the first file it finds. A part that holds only test rows may
    store a train-only column as type null; a later part may add a column. Parquet footers
    are cheap to read, so read them all and unify (null columns take the documented type).
    """
    schemas = [fragment.physical_schema for fragment in fragments]
    if all(schema.equals(schemas[0]) for schema in schemas[1:]) and not any(
        pa.types.is_null(f.type) for f in schemas[0]
    ):
        unified = schemas[0]
    else:
        typed = []
        known = {}
        for schema in schemas:
            for f in schema:
                if not pa.types.is_null(f.type):
                    known.setdefault(f.name, f.type)
        for schema in schemas:
            fields = []
            for f in schema:
                if pa.types.is_null(f.type):
                    # the type other parts give it, else the documented one
                    kind = known.get(f.name, schema_hint.field(f.name).type if f.name in schema_hint.names else None)
                    if f.name in dictionary_columns and (kind is None or pa.types.is_string(kind)):
                        kind = pa.dictionary(pa.int32(), pa.string())  # as the reader gives them
                    if kind is not None:
                        f = f.with_type(kind)
                fields.append(f)
            typed.append(pa.schema(fields))
        unified = pa.unify_schemas(typed, promote_options="permissive")
    fields = [f for f in unified if f.name != "case_id"]
    fields.append(dataset.schema.field("case_id"))
    return pa.schema(fields)


# ---- per-case tables ----------------------------------------------------------------------


def _read_cases(run: RunDir) -> pd.DataFrame:
    cases = run.cases_table().to_pandas()
    cases["case_id"] = cases["case_id"].astype(str)
    for name in cases.columns:  # lists as tuples: hashable, so cases group and compare by them
        if cases[name].dtype == object and cases[name].map(lambda v: isinstance(v, (list, np.ndarray))).any():
            cases[name] = cases[name].map(lambda v: tuple(v.tolist() if isinstance(v, np.ndarray) else v)
                                          if isinstance(v, (list, np.ndarray)) else v)
    return _split_unlike(cases)


def _configuration(text) -> tuple[dict, dict] | None:
    """(the settings a case's id hashes: those that differ from their defaults, seed left out;
    every setting) of a cases-table row's settings_json, flat (data.name, ...) as
    CaseSettings.flat() gives them; None if the stored settings do not read any more. A
    setting added after the row was written counts as unset, as it does for ids."""
    try:
        settings = settings_module.from_json(json.loads(text))
    except (TypeError, ValueError, settings_module.SettingsError):
        return None
    every, changed = settings.flat(), settings.changed()
    keys = [f"data.{inner}" for inner in changed.pop("data", {})] + [key for key in changed if key != "seed"]
    return {key: every[key] for key in keys}, every


def _split_unlike(cases: pd.DataFrame) -> pd.DataFrame:
    """A group holds cases that differ by seed alone, and a name one case. A run resumed with
    other settings (`--resume RUN --set ...`) holds cases of one name under two configurations
    (each with its own id): the first configuration added keeps the name and group, each later
    one is named after them and what sets it apart, `slow-s1 [epochs=1]` in group
    `slow [epochs=1]`, so no table or interval averages unlike cases as seeds of one."""
    if "settings_json" not in cases or "group" not in cases or cases.empty:
        return cases
    read = cases["settings_json"].map(_configuration)
    config = read.map(lambda r: None if r is None else json.dumps(r[0], sort_keys=True, default=str))
    groups = cases["group"].astype(str)
    mixed = [g for g, configs in config.groupby(groups) if configs.notna().all() and configs.nunique() > 1]
    if not mixed:
        return cases
    cases = cases.copy()
    for group in mixed:
        rows = cases.index[groups == group]
        first_changed, first_every = read[rows[0]]
        for key in dict.fromkeys(config[rows]):  # each configuration, in the order added
            members = [r for r in rows if config[r] == key]
            if members[0] == rows[0]:
                continue
            changed, every = read[members[0]]
            differ = sorted(k for k in {*first_changed, *changed} if first_every.get(k) != every.get(k))
            tag = ", ".join(f"{k}={every.get(k)}" for k in differ)
            tag = tag if len(tag) <= 60 else tag[:57] + "..."
            cases.loc[members, "group"] = f"{group} [{tag}]"
            cases.loc[members, "name"] = cases.loc[members, "name"].astype(str) + f" [{tag}]"
    return cases


def _attach_case_columns(frame: pd.DataFrame, cases: pd.DataFrame, names=("name", "group")) -> pd.DataFrame:
    """Add the cases' `names` columns to a per-row frame right after case_id, by case_id, as
    categoricals built from case_id's codes (no per-row string work)."""
    present = [n for n in names if n in cases and n not in frame]
    if not present or "case_id" not in frame:
        return frame
    ids = frame["case_id"]
    categorical = isinstance(ids.dtype, pd.CategoricalDtype)
    codes = ids.cat.codes.to_numpy() if categorical else None
    position = frame.columns.get_loc("case_id") + 1
    for offset, name in enumerate(present):
        lookup = dict(zip(cases["case_id"].astype(str), cases[name]))
        if categorical:
            values = [lookup.get(str(c)) for c in ids.cat.categories]
            labels = pd.Index(pd.unique(pd.Series([v for v in values if v is not None and v == v], dtype=object)))
            where = {v: i for i, v in enumerate(labels)}
            remap = np.array([where.get(v, -1) if v is not None and v == v else -1 for v in values] + [-1], dtype=np.int64)
            column = pd.Categorical.from_codes(remap[codes], categories=labels)
        else:
            column = ids.astype(str).map(lookup)
        frame.insert(position + offset, name, column)
    return frame


def _ledger_frame(entries: dict) -> pd.DataFrame:
    """One row per ledger entry; `latest: {...}` becomes latest.<key> columns."""
    records = [entry.to_dict() for _, entry in sorted(entries.items())]
    if not records:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in LEDGER_COLUMNS}).astype({"case_id": str})
    ledger = pd.json_normalize(records, max_level=1)
    for column in LEDGER_COLUMNS:
        if column not in ledger:
            ledger[column] = None
    ledger["case_id"] = ledger["case_id"].astype(str)
    first = [c for c in LEDGER_COLUMNS if c in ledger]
    return ledger[first + [c for c in ledger.columns if c not in first]]


def _merge_state(cases: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """cases + state/reason_class/reason/complete from the ledger; ledger-only cases kept too."""
    state = ledger[["case_id", "name", "state", "reason_class", "reason"]].rename(columns={"name": "_ledger_name"})
    merged = cases.drop(columns=[c for c in ("state", "reason_class", "reason", "complete") if c in cases]).merge(
        state, on="case_id", how="outer", sort=False
    )
    if "name" not in merged:
        merged["name"] = merged["_ledger_name"]
    else:
        merged["name"] = merged["name"].where(merged["name"].notna(), merged["_ledger_name"])
    merged = merged.drop(columns="_ledger_name")
    if "group" not in merged:
        merged["group"] = merged["name"]
    else:
        merged["group"] = merged["group"].where(merged["group"].notna(), merged["name"])
    merged["state"] = merged["state"].where(merged["state"].notna(), NO_LEDGER_STATE).astype(str)
    merged["complete"] = merged["state"].eq("done")
    return merged


# ---- the entry point ----------------------------------------------------------------------


def _read_one(
    location: str | os.PathLike,
    metrics_columns: Iterable[str] | None,
    splits: Iterable[str] | None,
    what: set[str],
    categorical: bool,
) -> dict[str, Any]:
    run = RunDir.open(location)
    entries = run.ledger()
    ledger = _ledger_frame(entries)
    frames = {"manifest": run.manifest(), "cases": _merge_state(_read_cases(run), ledger), "ledger": ledger}
    split_filter = None if splits is None else ds.field("split").isin(list(splits))
    frames["lazy"] = {}
    for kind in DATASETS:
        columns = metrics_columns if kind == "metrics" else None
        if kind in what and kind in LAZY:
            def read(kind=kind, cases=frames["cases"]):
                return _attach_case_columns(_read_dataset(run, kind, entries, None, None, categorical), cases)

            frames["lazy"][kind] = read
        elif kind in what:
            frame = _read_dataset(run, kind, entries, columns, split_filter if kind == "metrics" else None, categorical)
            frames[kind] = _attach_case_columns(frame, frames["cases"])
        else:
            frames[kind] = _empty_frame(kind, columns, categorical)
    return frames


def _run_labels(runs: list[str | os.PathLike]) -> list[str]:
    """Short unique labels: the folder name, made unique with #2, #3 when names repeat."""
    labels, seen = [], {}
    for run in runs:
        base = posixpath.basename(os.fspath(run).rstrip("/").rstrip(os.sep)) or os.fspath(run)
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def _concat_with_run(frames: list[pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """Stack per-run frames with a leading categorical `run` column (categoricals unified)."""
    parts = []
    for frame, label in zip(frames, labels):  # frames are load's own: changed in place
        frame.insert(0, "run", label)
        parts.append(frame)
    categorical_columns = {
        c for frame in parts for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)
    }
    for column in categorical_columns:
        # One set of categories for all runs, or concat falls back to object (slow, big).
        values = set()
        for frame in parts:
            if column in frame:
                series = frame[column]
                values |= set(series.cat.categories if isinstance(series.dtype, pd.CategoricalDtype)
                              else series.dropna().unique())
        categories = pd.Index(sorted(values, key=str), tupleize_cols=False)  # tuples stay values
        for frame in parts:
            if column not in frame:
                continue
            if isinstance(frame[column].dtype, pd.CategoricalDtype):
                frame[column] = frame[column].cat.set_categories(categories)
            else:
                frame[column] = pd.Categorical(frame[column], categories=categories)
    out = pd.concat(parts, ignore_index=True)
    out["run"] = pd.Categorical(out["run"], categories=labels)
    return out


def load(
    run_or_runs: str | os.PathLike | Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike],
    metrics_columns: Iterable[str] | None = None,
    splits: Iterable[str] | None = None,
    weights: bool = True,
    layer_stats: bool = True,
    categorical: bool = True,
    datasets: Iterable[str] | None = None,
) -> RunData:
    """Read one run (path or URI) or several (list, or {label: path}) into a RunData.

    metrics_columns: read only these metrics columns (case_id always comes); e.g.
        analysis.PER_CASE_COLUMNS (per_case) or analysis.TABLE_COLUMNS (every table but
        update_counts, which needs updates and layers) to read less.
    splits: read only these splits, e.g. ["test"].
    weights, layer_stats: False skips reading those folders (empty frames instead).
    datasets: read only these datasets besides metrics (default: every registered one but
        those switched off above); the others are empty frames with the documented columns.
        The heavy per-case ones (LAZY: boundary) are read on first access of the attribute
        (`data.boundary`), with the ledger as it was when load ran.
    categorical: keep case_id (and split/updates/layers, phase, layer, ...) as categoricals
        in the per-row frames; False gives plain str case_id.
    Several runs: every frame gets a leading `run` column (the folder name, or the dict key)
    and (run, case_id) is the key. A run without metrics yet gives empty frames with the
    documented columns. analysis.rundir.StorageError (one line) if a location is not a run.
    """
    if isinstance(run_or_runs, (str, os.PathLike)):
        runs, labels, multi = [run_or_runs], None, False
    elif isinstance(run_or_runs, Mapping):
        labels, runs, multi = [str(k) for k in run_or_runs], list(run_or_runs.values()), True
    else:
        runs, labels, multi = list(run_or_runs), None, True
    if not runs:
        raise ValueError("load: no run given")
    labels = labels or _run_labels(runs)
    what = set(DATASETS) if datasets is None else {"metrics", *datasets}
    what -= ({"weights"} if not weights else set()) | ({"layer_stats"} if not layer_stats else set())
    unknown = what - set(DATASETS)
    if unknown:
        raise ValueError(f"load: unknown dataset(s) {', '.join(sorted(unknown))} (known: {', '.join(DATASETS)})")
    read = [_read_one(run, metrics_columns, splits, what, categorical) for run in runs]
    manifests = {label: r["manifest"] for label, r in zip(labels, read)}
    paths = {label: os.fspath(run) for label, run in zip(labels, runs)}
    lazy = [n for n in DATASETS if n in read[0]["lazy"]]  # read on first access (LAZY)
    names = ("cases", "ledger", *(n for n in DATASETS if n not in lazy))
    if multi:
        merged = {n: _concat_with_run([r[n] for r in read], labels) for n in names}
    else:
        merged = {n: read[0][n] for n in names}

    lazies = [r.pop("lazy") for r in read]  # (the closures hold these, not the frames read)

    def reader(name: str) -> Callable[[], pd.DataFrame]:
        if multi:
            return lambda: _concat_with_run([one[name]() for one in lazies], labels)
        return lazies[0][name]

    return RunData(**{n: merged[n] for n in ("cases", "ledger", *_FIELDS)}, manifests=manifests, paths=paths,
                   more={n: merged[n] for n in DATASETS if n not in _FIELDS and n not in lazy},
                   pending={n: reader(n) for n in lazy})


def case_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that identify a case in `frame`: ["run", "case_id"] or ["case_id"]."""
    return ["run", "case_id"] if "run" in frame.columns else ["case_id"]


__all__ = [
    "RunData", "load", "resolve", "local_path", "case_keys", "PER_CASE_COLUMNS", "TABLE_COLUMNS",
    "METRICS_SCHEMA", "WEIGHTS_SCHEMA", "LAYER_STATS_SCHEMA", "NO_LEDGER_STATE",
]
