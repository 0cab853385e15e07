"""Read a run directory (or several) into tidy pandas frames.

A run directory is written by the driver (see DESIGN.md):

    RUN/manifest.json, RUN/cases.parquet, RUN/ledger/<case_id>.json,
    RUN/metrics/case_id=<id>/part-*.parquet, RUN/weights/case_id=<id>/part-*.parquet,
    RUN/layer_stats/case_id=<id>/part-*.parquet, RUN/alignment/case_id=<id>/part-*.parquet

`load` accepts a local path or a `pyarrow.fs` URI (file:///x, s3://bucket/run, ...).
No TensorFlow, no Ray; nothing runs at import time.

case_id: pyarrow's and pandas' hive readers guess partition types, so an all-digit case_id
("000123") would come back as the integer 123. Here the partition key is always read as a
string. In the per-case frames (cases, ledger) it is a plain `str` column; in the big
per-row frames (metrics, weights, layer_stats) it is a pandas categorical whose categories
are those strings (ten million repeated strings cost memory and make groupby slow), unless
`categorical=False`. The low-cardinality column split is read the same way
(dictionary-encoded in Parquet -> categorical).

List columns: metrics' updates (list<int64>) and layers (list<string>) become categoricals
whose categories are tuples, e.g. (1, 1, 2): hashable, so they group and compare, and a few
distinct lists over millions of rows cost one code per row. In `cases`, list settings
(hidden, quirks, data.classes) are tuples too. Runs written before lists were stored as
lists hold them as JSON strings, and settings that were None in every case as all-null
float64; both are converted on read, so old and new runs load alike.

metrics and alignment carry the case's `name` and `group` right after case_id
(categoricals), so a table per case name needs no join.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The columns each per-row table has, and their types (used for empty frames and for
# columns that one Parquet part holds as all-null).
METRICS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("epoch", pa.int64()),
        ("step", pa.int64()),
        ("cost", pa.float64()),
        ("accuracy", pa.float64()),
        ("lr", pa.float64()),
        ("stages", pa.int64()),
        ("layer_updates", pa.int64()),
        ("forward_passes", pa.int64()),
        ("examples", pa.int64()),
        ("examples_per_sec", pa.float64()),
        ("wall_time", pa.float64()),
        ("updates", pa.list_(pa.int64())),
        ("layers", pa.list_(pa.string())),
    ]
)
WEIGHTS_SCHEMA = pa.schema(
    [
        ("phase", pa.string()),
        ("layer", pa.string()),
        ("param", pa.string()),
        ("bin", pa.int64()),
        ("left", pa.float64()),
        ("right", pa.float64()),
        ("count", pa.int64()),
    ]
)
LAYER_STATS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("layer", pa.string()),
        ("quantity", pa.string()),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("min", pa.float64()),
        ("max", pa.float64()),
        ("hist", pa.string()),
        ("edges", pa.string()),
    ]
)
# One row per measured step x unit x quantity (workers/alignment.py lists the quantities).
ALIGNMENT_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("layer", pa.string()),
        ("unit", pa.int64()),
        ("quantity", pa.string()),
        ("value", pa.float64()),
    ]
)
# String columns with few distinct values: read dictionary-encoded (-> pandas categorical).
_DICTIONARY_COLUMNS = {
    "metrics": ["split", "updates", "layers"],  # the last two: runs that stored them as JSON strings
    "weights": ["phase", "layer", "param"],
    "layer_stats": ["layer", "quantity"],
    "alignment": ["layer", "quantity"],
}
# List columns with few distinct values: categoricals whose categories are tuples (hashable,
# so they group and compare). Runs written before lists were stored as lists hold JSON strings.
_LIST_COLUMNS = {"metrics": ["updates", "layers"], "weights": [], "layer_stats": [], "alignment": []}
_SCHEMAS = {"metrics": METRICS_SCHEMA, "weights": WEIGHTS_SCHEMA, "layer_stats": LAYER_STATS_SCHEMA,
            "alignment": ALIGNMENT_SCHEMA}

# The metrics columns per_case needs: load(run, metrics_columns=PER_CASE_COLUMNS) reads about
# 40 % of the bytes of a full read. epoch_summary also wants step and lr: TABLE_COLUMNS.
PER_CASE_COLUMNS = ("split", "epoch", "cost", "accuracy", "examples", "wall_time")
TABLE_COLUMNS = (*PER_CASE_COLUMNS, "step", "lr")

LEDGER_COLUMNS = [
    "case_id", "name", "state", "reason_class", "reason", "diverged_step", "epoch", "step",
    "commit_seq", "attempts", "node", "gpu", "updated_at",
]
# The state a case gets when cases.parquet lists it but the ledger has no file for it.
NO_LEDGER_STATE = "unknown"


@dataclass
class RunData:
    """Everything `load` read: tidy frames plus the manifest(s).

    With several runs every frame has a leading `run` column and (run, case_id) is the key.
    `cases` holds the ledger state merged in (`state`, `reason_class`, `reason`, `complete`),
    so a failed or pending case is still a row, flagged, never dropped.
    """

    metrics: pd.DataFrame
    cases: pd.DataFrame
    ledger: pd.DataFrame
    weights: pd.DataFrame
    layer_stats: pd.DataFrame
    alignment: pd.DataFrame
    """One row per measured step x unit x quantity (alignment_every), with the case's name and group."""
    manifests: dict[str, dict] = field(default_factory=dict)
    """run label -> manifest dict."""
    paths: dict[str, str] = field(default_factory=dict)
    """run label -> the path or URI it was read from."""

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
    text = os.fspath(run)
    if "://" in text:
        filesystem, path = pafs.FileSystem.from_uri(text)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(text)


def local_path(run: str | os.PathLike) -> Path | None:
    """The local folder of a run, or None when it lives on a remote filesystem."""
    filesystem, path = resolve(run)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    return None


def _exists(filesystem: pafs.FileSystem, path: str) -> pafs.FileType:
    return filesystem.get_file_info(path).type


def _read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


# ---- per-row tables -----------------------------------------------------------------------


def _empty_frame(kind: str, columns: Iterable[str] | None, categorical: bool) -> pd.DataFrame:
    """An empty frame with the table's columns and dtypes (case_id first), as a read gives."""
    fields = [f for f in _SCHEMAS[kind] if columns is None or f.name in columns]
    frame = pa.Table.from_batches([], pa.schema([("case_id", pa.string()), *fields])).to_pandas()
    for name in ["case_id", *_DICTIONARY_COLUMNS[kind]] if categorical else []:
        if name in frame:
            frame[name] = frame[name].astype(object).astype("category")
    return frame


def _read_partitioned(
    filesystem: pafs.FileSystem,
    root: str,
    kind: str,
    columns: Iterable[str] | None = None,
    filter: ds.Expression | None = None,
    categorical: bool = True,
    sources: list[tuple[str, list[str]]] | None = None,
) -> pd.DataFrame:
    """Read a hive-partitioned Parquet folder (case_id=<id>/part-*.parquet) into pandas.

    sources: instead of discovering `root`, read these files, each list under its base folder."""
    schema_hint = _SCHEMAS[kind]
    columns = None if columns is None else [c for c in columns if c != "case_id"]
    if _exists(filesystem, root) != pafs.FileType.Directory:
        return _empty_frame(kind, columns, categorical)
    # The partition key is a string (never a guessed int), dictionary-encoded so pandas
    # gets a categorical without materialising one string per row.
    partitioning = ds.partitioning(
        pa.schema([("case_id", pa.dictionary(pa.int32(), pa.string()))]), flavor="hive", dictionaries="infer"
    )
    file_format = ds.ParquetFileFormat(read_options={"dictionary_columns": _DICTIONARY_COLUMNS[kind]})
    if sources is None:
        dataset = ds.dataset(
            root,
            filesystem=filesystem,
            format=file_format,
            partitioning=partitioning,
            exclude_invalid_files=False,
            ignore_prefixes=[".", "_"],  # temporary files of an atomic commit in progress
        )
        # Only finished parts: a commit in progress may leave part-N.parquet.tmp (or similar).
        fragments = [f for f in dataset.get_fragments() if f.path.endswith(".parquet")]
    else:  # explicit files under several base folders (the compacted cache plus the rest)
        fragments, dataset = [], None
        for base, paths in sources:
            if not paths:
                continue
            part = ds.dataset(paths, filesystem=filesystem, format=file_format, partitioning=partitioning,
                              partition_base_dir=base, exclude_invalid_files=False)
            dataset = dataset or part
            fragments.extend(part.get_fragments())
    if not fragments:
        return _empty_frame(kind, columns, categorical)
    dataset = ds.FileSystemDataset(
        fragments, _unified_schema(dataset, fragments, schema_hint, _DICTIONARY_COLUMNS[kind]), file_format, filesystem
    )
    wanted = ["case_id", *[c for c in (columns if columns is not None else dataset.schema.names) if c != "case_id"]]
    wanted = [c for c in wanted if c in dataset.schema.names]
    table = dataset.to_table(columns=wanted, filter=filter)
    # Columns asked for that no file has: add as nulls of the documented type.
    for name in columns or []:
        if name not in table.column_names and name in schema_hint.names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema_hint.field(name).type))
    table, list_kinds = _encode_lists(table, _LIST_COLUMNS[kind])
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
    JSON strings of older runs, else the element type)."""
    import pyarrow.compute as pc

    kinds = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        t = column.type
        if pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
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
            return tuple(json.loads(text))
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


def _read_cases(filesystem: pafs.FileSystem, root: str) -> pd.DataFrame:
    path = posixpath.join(root, "cases.parquet")
    if _exists(filesystem, path) != pafs.FileType.File:
        return pd.DataFrame({"case_id": pd.Series([], dtype=str)})
    cases = _typed_cases(pq.read_table(path, filesystem=filesystem)).to_pandas()
    cases["case_id"] = cases["case_id"].astype(str)
    for name in cases.columns:  # lists as tuples: hashable, so cases group and compare by them
        if cases[name].dtype == object and cases[name].map(lambda v: isinstance(v, (list, np.ndarray))).any():
            cases[name] = cases[name].map(lambda v: tuple(v.tolist() if isinstance(v, np.ndarray) else v)
                                          if isinstance(v, (list, np.ndarray)) else v)
    return cases


def _typed_cases(table: pa.Table) -> pa.Table:
    """Setting columns in the types of the settings' annotations. Runs written before the
    cases table was typed hold lists as JSON strings and settings that were None in every
    case as all-null float64: both are converted here."""
    try:
        from jobs.storage import settings_column_types

        types = settings_column_types()
    except ImportError:
        return table
    for index, name in enumerate(table.column_names):
        kind, column = types.get(name), table.column(name)
        if kind is None or column.type == kind:
            continue
        try:
            if column.null_count == len(column):
                array = pa.nulls(len(column), kind)
            elif pa.types.is_list(kind) and pa.types.is_string(column.type):
                array = pa.array([None if v is None else json.loads(v) for v in column.to_pylist()], kind)
            else:
                array = column.cast(kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError, TypeError):
            continue  # not what the settings say (an older bplab?): leave the column as stored
        table = table.set_column(index, name, array)
    return table


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


def _read_ledger(filesystem: pafs.FileSystem, root: str) -> pd.DataFrame:
    folder = posixpath.join(root, "ledger")
    records = []
    if _exists(filesystem, folder) == pafs.FileType.Directory:
        infos = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False))
        for info in sorted(infos, key=lambda i: i.path):
            base = info.base_name
            if info.type != pafs.FileType.File or not base.endswith(".json") or base.startswith((".", "_")):
                continue
            record = _read_ledger_entry(filesystem, folder, base)
            record.setdefault("case_id", base[: -len(".json")])
            records.append(record)
    if not records:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in LEDGER_COLUMNS}).astype({"case_id": str})
    # latest: {...} becomes latest.<key> columns.
    ledger = pd.json_normalize(records, max_level=1)
    for column in LEDGER_COLUMNS:
        if column not in ledger:
            ledger[column] = None
    ledger["case_id"] = ledger["case_id"].astype(str)
    first = [c for c in LEDGER_COLUMNS if c in ledger]
    return ledger[first + [c for c in ledger.columns if c not in first]]


def _read_ledger_entry(filesystem: pafs.FileSystem, folder: str, base: str) -> dict:
    """A ledger entry; a damaged one is read from its backup copy (ledger/.<id>.json.bak, which
    the driver writes after each entry); ValueError (one line, naming the file) if both are."""
    try:
        record = _read_json(filesystem, posixpath.join(folder, base))
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    try:
        record = _read_json(filesystem, posixpath.join(folder, f".{base}.bak"))
        if isinstance(record, dict):
            return record
    except (ValueError, FileNotFoundError, OSError):
        pass
    raise ValueError(f"{posixpath.join(folder, base)} is damaged and has no intact backup copy; "
                     "`bplab status` on the run names what to do")


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
    run: str | os.PathLike,
    metrics_columns: Iterable[str] | None,
    splits: Iterable[str] | None,
    what: set[str],
    categorical: bool,
) -> dict[str, Any]:
    filesystem, root = resolve(run)
    if _exists(filesystem, root) != pafs.FileType.Directory:
        raise FileNotFoundError(f"no run directory at {os.fspath(run)}")
    manifest_path = posixpath.join(root, "manifest.json")
    manifest = _read_json(filesystem, manifest_path) if _exists(filesystem, manifest_path) == pafs.FileType.File else {}
    cases = _read_cases(filesystem, root)
    ledger = _read_ledger(filesystem, root)
    split_filter = None if splits is None else ds.field("split").isin(list(splits))
    frames = {"manifest": manifest, "cases": _merge_state(cases, ledger), "ledger": ledger}
    names = frames["cases"]
    for kind in ("metrics", "weights", "layer_stats", "alignment"):
        columns = metrics_columns if kind == "metrics" else None
        if kind in what:
            frames[kind] = _read_partitioned(
                filesystem, posixpath.join(root, kind), kind, columns,
                split_filter if kind == "metrics" else None, categorical,
                sources=_metrics_sources(filesystem, root, ledger) if kind == "metrics" else None,
            )
        else:
            frames[kind] = _empty_frame(kind, columns, categorical)
    frames["metrics"] = _attach_case_columns(frames["metrics"], names)
    frames["alignment"] = _attach_case_columns(frames["alignment"], names)
    return frames


_COMPACT_NAME = re.compile(r"^upto-(\d+)\.parquet$")


def _metrics_sources(filesystem: pafs.FileSystem, root: str, ledger: pd.DataFrame):
    """The files to read for metrics: each finished case's compacted file (the driver writes
    metrics_compact/case_id=<id>/upto-<seq>.parquet) while <seq> is the ledger's commit_seq,
    and the commit parts of every other case. None: no usable cache, read metrics/ whole.
    One file per case instead of one per commit: loading a large study is ~4x faster."""
    compact_root = posixpath.join(root, "metrics_compact")
    metrics_root = posixpath.join(root, "metrics")
    if len(ledger) == 0 or _exists(filesystem, compact_root) != pafs.FileType.Directory:
        return None
    committed = dict(zip(ledger["case_id"].astype(str), ledger["commit_seq"]))
    cached = {}
    for info in filesystem.get_file_info(pafs.FileSelector(compact_root, recursive=True)):
        match = _COMPACT_NAME.match(info.base_name)
        folder = posixpath.basename(posixpath.dirname(info.path))
        if info.type == pafs.FileType.File and match and folder.startswith("case_id="):
            case_id = folder[len("case_id="):]
            if case_id in committed and int(match.group(1)) == int(committed[case_id]):
                cached[case_id] = info.path
    if not cached:
        return None
    rest = []
    if _exists(filesystem, metrics_root) == pafs.FileType.Directory:
        for info in filesystem.get_file_info(pafs.FileSelector(metrics_root)):
            name = info.base_name
            # (the top-level schema anchor is left out: footers are unified below, and a
            # partition-less file alone would not fit the case_id partitioning)
            if info.type == pafs.FileType.Directory and name.startswith("case_id=") and name[8:] not in cached:
                rest.extend(f.path for f in filesystem.get_file_info(pafs.FileSelector(info.path))
                            if f.base_name.endswith(".parquet") and not f.base_name.startswith((".", "_")))
    return [(compact_root, sorted(cached.values())), (metrics_root, sorted(rest))]


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
    alignment: bool = True,
) -> RunData:
    """Read one run (path or URI) or several (list, or {label: path}) into a RunData.

    metrics_columns: read only these metrics columns (case_id always comes); e.g.
        analysis.PER_CASE_COLUMNS (per_case) or analysis.TABLE_COLUMNS (every table but
        update_counts, which needs updates and layers) to read less.
    splits: read only these splits, e.g. ["test"].
    weights, layer_stats, alignment: False skips reading those folders (empty frames instead).
    categorical: keep case_id (and split/updates/layers, phase, layer, ...) as categoricals
        in the per-row frames; False gives plain str case_id.
    Several runs: every frame gets a leading `run` column (the folder name, or the dict key)
    and (run, case_id) is the key. A run without metrics yet gives empty frames with the
    documented columns.
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
    what = {"metrics"} | ({"weights"} if weights else set()) | ({"layer_stats"} if layer_stats else set())
    what |= {"alignment"} if alignment else set()
    read = [_read_one(run, metrics_columns, splits, what, categorical) for run in runs]
    manifests = {label: r["manifest"] for label, r in zip(labels, read)}
    paths = {label: os.fspath(run) for label, run in zip(labels, runs)}
    names = ("metrics", "cases", "ledger", "weights", "layer_stats", "alignment")
    if not multi:
        return RunData(**{n: read[0][n] for n in names}, manifests=manifests, paths=paths)
    return RunData(
        **{n: _concat_with_run([r[n] for r in read], labels) for n in names}, manifests=manifests, paths=paths
    )


def case_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that identify a case in `frame`: ["run", "case_id"] or ["case_id"]."""
    return ["run", "case_id"] if "run" in frame.columns else ["case_id"]


__all__ = [
    "RunData", "load", "resolve", "local_path", "case_keys", "PER_CASE_COLUMNS", "TABLE_COLUMNS",
    "METRICS_SCHEMA", "WEIGHTS_SCHEMA", "LAYER_STATS_SCHEMA", "ALIGNMENT_SCHEMA", "NO_LEDGER_STATE",
]
