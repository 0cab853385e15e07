"""Arrow schemas of a run: the run-wide schema of each dataset and the typed cases table.

Schema anchor: pyarrow takes a dataset's schema from the *first* file (in path order). If
that file had ``lr`` all None (a null column) or no ``lr`` at all, later files with real
``lr`` values fail to read or silently lose the column. So each dataset keeps a run-wide
schema (the union of every column seen, with one stable type each) in a zero-row file
``0-schema.parquet`` that sorts before every ``case_id=...`` folder, and every part is
written with exactly that schema. Column types: integers -> int64, floats -> float64,
strings -> string, bool -> bool, lists -> list<those> (``updates`` is list<int64>), anything
else as pyarrow infers it; a column that has only been None so far is float64 until a real
value arrives; int64 widens to float64 when a float arrives (older int64 parts are cast on
read); any other change of type is refused (legacy.py: the one exception, runs that stored
lists as JSON strings). cases.parquet takes the types of the settings' annotations instead
(``hidden`` list<int64>, ``data.path`` string even when None in every case).

The data of a commit may be given as row dicts, as a mapping column -> 1-D values (numpy
arrays or lists), or as a ``pyarrow.Table``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.rundir import legacy
from analysis.rundir.errors import StorageError
from analysis.rundir.files import Files, json_default
from analysis.rundir.layout import PARTITION_KEY, SCHEMA_ANCHOR
from analysis.rundir.ledger import check_name
from workers.errors import one_line

_PROVISIONAL_KEY = b"bplab.provisional"  # anchor metadata: columns typed float64 only because all None so far


class Schemas:
    """The run-wide schema of each dataset, kept in its anchor file and cached here."""

    def __init__(self, files: Files):
        self.files = files
        self._cache: dict[str, tuple[pa.Schema, set[str]]] = {}  # dataset -> (schema, provisional)

    def clear(self) -> None:
        self._cache.clear()

    def _anchor(self, dataset: str) -> str:
        return self.files.path(dataset, SCHEMA_ANCHOR)

    def current(self, dataset: str) -> tuple[pa.Schema, set[str]]:
        if dataset not in self._cache:
            try:
                schema = pq.read_schema(pa.BufferReader(self.files.read_bytes(self._anchor(dataset))))
                provisional = set(json.loads((schema.metadata or {}).get(_PROVISIONAL_KEY, b"[]")))
                schema = schema.remove_metadata()
            except FileNotFoundError:
                schema, provisional = pa.schema([]), set()
            self._cache[dataset] = (schema, provisional)
        schema, provisional = self._cache[dataset]
        return schema, set(provisional)

    def _write(self, dataset: str, schema: pa.Schema, provisional: set[str]) -> None:
        meta = {_PROVISIONAL_KEY: json.dumps(sorted(provisional)).encode()}
        self.files.write_table(self._anchor(dataset), schema.with_metadata(meta).empty_table())
        self._cache[dataset] = (schema, provisional)

    def conform(self, dataset: str, data: Any, case_id: str) -> pa.Table:
        """The table of ``data`` (rows, columns or a Table) in the dataset's run-wide schema,
        widening that schema (and rewriting the anchor) if needed."""
        table, null_cols = to_table(data, case_id, dataset)
        schema, provisional = self.current(dataset)
        fields = {f.name: f.type for f in schema}
        order = list(fields)
        changed = False
        for name in table.column_names:
            new_type = table.schema.field(name).type
            new_null = name in null_cols
            if name not in fields:
                fields[name], changed = new_type, True
                order.append(name)
                if new_null:
                    provisional.add(name)
                continue
            old_type = fields[name]
            if new_null:
                continue  # all None here: any registered type will do
            if name in provisional:
                fields[name], changed = new_type, True
                provisional.discard(name)
            elif old_type == new_type:
                continue
            elif old_type == pa.float64() and new_type == pa.int64():
                continue  # cast below
            elif old_type == pa.int64() and new_type == pa.float64():
                fields[name], changed = pa.float64(), True  # older int64 parts are cast on read
            elif legacy.stores_lists_as_json(old_type, new_type):
                table = table.set_column(table.schema.get_field_index(name), name,
                                         legacy.as_json_strings(table.column(name)))
            else:
                raise StorageError(
                    f"{dataset}: column {name!r} holds {new_type} values but earlier commits stored {old_type}"
                )
        schema = pa.schema([(name, fields[name]) for name in order])
        if changed:
            self._write(dataset, schema, provisional)
        columns = []
        for f in schema:
            if f.name in table.column_names and (
                f.name not in null_cols or pa.types.is_list(f.type) and pa.types.is_list(table.schema.field(f.name).type)
            ):  # (a column of empty lists keeps them)
                columns.append(table.column(f.name).cast(f.type))
            else:
                columns.append(pa.nulls(len(table), f.type))
        return pa.Table.from_arrays(columns, schema=schema)

    def anchor_problem(self, dataset: str) -> str | None:
        """What is wrong with the dataset's anchor file (None: intact or absent)."""
        path = self._anchor(dataset)
        if not self.files.exists(path):
            return None
        try:
            pq.read_schema(path, filesystem=self.files.fs)
        except (OSError, pa.ArrowException, ValueError) as exc:
            return f"{dataset}/{SCHEMA_ANCHOR} is damaged ({one_line(exc)[:100]})"
        return None

    def rebuild_anchor(self, dataset: str) -> str:
        """Write a damaged anchor again from the schemas of the dataset's readable parts."""
        schemas = []
        for info in self.files.list(self.files.path(dataset), recursive=True):
            name = info.base_name
            if info.is_file and name.endswith(".parquet") and name != SCHEMA_ANCHOR and not name.startswith("."):
                try:
                    schemas.append(pq.read_schema(info.path, filesystem=self.files.fs).remove_metadata())
                except (OSError, pa.ArrowException, ValueError):
                    continue
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        self._write(dataset, schema, set())
        return f"{dataset}/{SCHEMA_ANCHOR} was damaged; wrote it again from the schemas of its parts"


# ---------------------------------------------------------------------- tables from data
def to_table(data: Any, case_id: str, what: str) -> tuple[pa.Table, set[str]]:
    """(a table in stable types, the names of its columns that are None in every row) from row
    dicts, a mapping column -> 1-D values, or a pyarrow Table. A ``case_id`` column is dropped
    (it is the folder name), and refused if it names another case."""
    if isinstance(data, pa.Table):
        return _from_arrow(data, case_id, what)
    if isinstance(data, Mapping):
        table = _columns_to_table(data, case_id, what)
        return table, {n for n in table.column_names if table.column(n).null_count == len(table)}
    return build_table(_strip_key(data, case_id, what), what)


def _from_arrow(table: pa.Table, case_id: str, what: str) -> tuple[pa.Table, set[str]]:
    if PARTITION_KEY in table.column_names:
        if any(v != case_id for v in table.column(PARTITION_KEY).unique().to_pylist()):
            raise StorageError(f"{what}: a row of another case was committed for case {case_id}")
        table = table.drop_columns([PARTITION_KEY])
    arrays, null_cols = [], set()
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        if pa.types.is_null(array.type) or _only_empty_lists(array):
            null_cols.add(name)
        arrays.append(_normalise(array))
    return pa.Table.from_arrays(arrays, names=table.column_names), null_cols


def _strip_key(rows: Iterable, case_id: str, what: str) -> list[dict]:
    """Drop the partition key from rows (it is the folder name), refusing rows of another case."""
    out = []
    for row in rows or []:
        if not isinstance(row, Mapping):
            raise StorageError(f"{what}: rows must be dicts, not {type(row).__name__}")
        if PARTITION_KEY in row:
            if row[PARTITION_KEY] != case_id:
                raise StorageError(f"{what}: a row of case {row[PARTITION_KEY]} was committed for case {case_id}")
            row = {k: v for k, v in row.items() if k != PARTITION_KEY}
        out.append(row)
    return out


def _columns_to_table(columns: Mapping, case_id: str, what: str) -> pa.Table:
    """A table in stable types from column name -> 1-D values (numpy arrays or lists)."""
    arrays, names, length = [], [], None
    for name, values in columns.items():
        if not isinstance(name, str):
            raise StorageError(f"{what}: column names must be strings, not {name!r}")
        if name == PARTITION_KEY:
            if any(v != case_id for v in set(np.asarray(values).tolist())):
                raise StorageError(f"{what}: a row of another case was committed for case {case_id}")
            continue
        try:
            array = pa.array(np.asarray(values)) if not isinstance(values, list) else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise StorageError(f"{what}: column {name!r}: {exc}") from None
        if length is not None and len(array) != length:
            raise StorageError(f"{what}: column {name!r} has {len(array)} values, the others {length}")
        length = len(array)
        arrays.append(_normalise(array))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def stable_type(t: pa.DataType) -> pa.DataType:
    """The stored type of a column inferred as ``t`` (see the module doc); lists of those."""
    if pa.types.is_null(t) or pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or getattr(pa.types, "is_list_view", lambda _: False)(t):
        return pa.list_(stable_type(t.value_type))
    return t


def _normalise(array: pa.Array) -> pa.Array:
    target = stable_type(array.type)
    return array if target == array.type else array.cast(target)


def _only_empty_lists(array: pa.Array) -> bool:
    """A list column whose element type is unknown yet (every value None or [])."""
    return pa.types.is_list(array.type) and pa.types.is_null(array.type.value_type)


def build_table(rows: list[Mapping], what: str, json_fallback: bool = False) -> tuple[pa.Table, set[str]]:
    """A table from dicts (union of keys, missing -> null, stable types) and the names of the
    columns that were None in every row.

    Those columns are float64 in the table (a column of only empty lists counts as None: its
    element type is not known yet). Lists are stored as Parquet lists of the stable element
    type (``[1, 2]`` -> list<int64>). With ``json_fallback`` a column of mixed value types is
    stored as strings (JSON for non-strings) instead of raising StorageError.
    """
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            if not isinstance(key, str):
                raise StorageError(f"{what}: column names must be strings, not {key!r}")
            names.setdefault(key, None)
    arrays, null_cols = [], set()
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            if not json_fallback:
                kinds = sorted({type(v).__name__ for v in values if v is not None})
                raise StorageError(f"{what}: column {name!r} mixes value types ({', '.join(kinds)})") from exc
            array = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, default=json_default, sort_keys=True)
                 for v in values],
                pa.string(),
            )
        if pa.types.is_null(array.type) or _only_empty_lists(array):
            null_cols.add(name)  # a later real type wins (see Schemas.conform)
        arrays.append(_normalise(array))
    return pa.Table.from_arrays(arrays, names=list(names)), null_cols


# ---------------------------------------------------------------------- the cases table
def check_cases(cases: Iterable[Mapping]) -> list[dict]:
    """The cases as plain dicts; StorageError for a case without id or name, a bad or repeated id."""
    rows, seen = [], set()
    for case in cases:
        if not isinstance(case, Mapping) or "case_id" not in case or "name" not in case:
            raise StorageError("every case needs at least a case_id and a name")
        check_name(case["case_id"], "case id")
        if case["case_id"] in seen:
            raise StorageError(f"case id {case['case_id']} appears twice")
        seen.add(case["case_id"])
        rows.append(dict(case))
    return rows


def settings_column_types() -> dict[str, pa.DataType]:
    """Cases-table column -> Parquet type, from the annotations of the case settings
    (``hidden`` -> list<int64>, ``data.path`` -> string, ``data.train_size`` -> int64, ...),
    so a setting that is None in every case is a null of the right type, not float64."""
    import types
    import typing

    from workers import settings as settings_module

    def arrow(annotation) -> pa.DataType | None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Literal:  # a name from the registry
            return arrow(type(args[0])) if args else None
        if origin in (typing.Union, getattr(types, "UnionType", None)):
            inner = [a for a in args if a is not type(None)]
            return arrow(inner[0]) if len(inner) == 1 else None
        if origin is tuple:
            element = arrow(args[0]) if args else None
            return pa.list_(element) if element is not None else None
        return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}.get(annotation)

    out = {}
    for cls, prefix in ((settings_module.CaseSettings, ""), (settings_module.DataSpec, "data.")):
        for name, annotation in typing.get_type_hints(cls).items():
            if (kind := arrow(annotation)) is not None:
                out[prefix + name] = kind
    return out


def cases_to_table(rows: list[Mapping]) -> pa.Table:
    """The cases table: setting columns typed by their annotations (lists as lists, None as a
    typed null; a list given as a JSON string, as CaseSettings.flat() gives it, is decoded),
    every other column as build_table infers it."""
    types = settings_column_types()
    table, _ = build_table(rows, "cases", json_fallback=True)
    for index, name in enumerate(table.column_names):
        kind = types.get(name)
        if kind is None or table.schema.field(name).type == kind:
            continue
        values = [row.get(name) for row in rows]
        if pa.types.is_list(kind):
            values = [json.loads(v) if isinstance(v, str) else v for v in values]
        try:
            array = pa.array(values, kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            continue  # not what the annotation says: keep the inferred column
        table = table.set_column(index, name, array)
    return table
