"""The one place that knows the older run formats.

Format versions (``format_version`` in manifest.json):

1. Runs written before the manifest said (no ``format_version``). Within version 1 the
   format changed a few times, and the runs of each change are read here:

   - lists (metrics' ``updates``, ``layers``; cases' ``hidden``, ``quirks``) stored as JSON
     strings, and settings None in every case stored as all-null float64, in an untyped
     cases table; a resumed run of that kind keeps writing JSON strings; analysis.load
     converts them, and the tables take such text through :func:`as_list`;
   - ledger entries without ``parts`` (the commit record) or without ``checkpoints`` (the
     kept generations with their SHA-256): every published part counts as committed and a
     checkpoint is checked as a zip archive instead of by its digest;
   - parts published before their commit was written (drivers before the staged commit):
     ``verify`` reports them, ``recover`` deletes them;
   - ``created_at`` as an ISO date instead of seconds since the epoch.

2. ``format_version: 2``: the layout of layout.py, written by RunDir.create.

A run keeps the version it was created with (a resumed version-1 run stays version 1).
"""
from __future__ import annotations

import io
import json
import posixpath
import zipfile
from typing import Any

import pyarrow as pa

from analysis.rundir.errors import StorageError
from analysis.rundir.layout import CKPT_RE, FORMAT_VERSION
from workers.errors import one_line


def format_version(manifest: dict, location: str) -> int:
    """The run's format version: 1 when the manifest has none; StorageError for a version
    this bplab does not know (a run written by a newer one)."""
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StorageError(f"{location}: manifest.json has a bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StorageError(f"{location} was written by a newer bplab (run format {version}; this one reads "
                           f"up to {FORMAT_VERSION}): update bplab to read it")
    return version


def created_at(manifest: dict) -> float | None:
    """The run's creation time in seconds since the epoch (an ISO date in older manifests)."""
    created = manifest.get("created_at")
    if isinstance(created, str):
        from datetime import datetime, timezone

        try:
            moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(created, (int, float)) and not isinstance(created, bool):
        return float(created)
    return None


# ---------------------------------------------------------------------- lists as JSON strings
def stores_lists_as_json(stored: pa.DataType, new: pa.DataType) -> bool:
    """True when a run stores a column as JSON strings and new rows bring lists: they are
    written as JSON strings too, so the run stays readable as one dataset."""
    return stored == pa.string() and pa.types.is_list(new)


def as_json_strings(column: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())


def is_json_list_column(t: pa.DataType) -> bool:
    """A column a reader expects to hold lists that holds (JSON) strings instead."""
    return pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def parse_json_list(text: Any) -> tuple:
    """A list stored as a JSON string, as a tuple (None and '' -> ())."""
    if text is None or text == "":
        return ()
    return tuple(json.loads(text))


def as_list(value: Any) -> Any:
    """A list value as a list, however a frame holds it: a tuple (analysis.load), a numpy array
    (pyarrow), a list, or JSON text ("[64, 64]": a frame read straight from an older run's
    Parquet). Anything else comes back as it is."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 1:
        return value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def typed_cases(table: pa.Table, types: dict[str, pa.DataType]) -> pa.Table:
    """A cases table with its setting columns in the settings' types (``types``): tables
    written before the cases table was typed hold lists as JSON strings and settings that
    were None in every case as all-null float64."""
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
            continue  # not what the settings say: leave the column as stored
        table = table.set_column(index, name, array)
    return table


# ---------------------------------------------------------------------- the ledger's commit record
def every_published_part_committed(entry, version: int) -> bool:
    """True for a version-1 case whose ledger entry does not record its parts (written before
    the ledger kept the commit record, or made by hand): every published part of it counts
    as committed, as readers of that time took it."""
    return version < 2 and not entry.parts


def kept_generations(entry, generation) -> list:
    """The entry's kept checkpoints; an entry written before generations were kept gets its one
    checkpoint as a generation without a digest."""
    if entry.checkpoints or not entry.checkpoint:
        return list(entry.checkpoints)
    return [generation(entry, entry.commit_seq, entry.checkpoint, None)]


def checkpoint_seq(rel: str) -> int:
    """The commit number in a checkpoint's file name (entries without generations)."""
    m = CKPT_RE.match(posixpath.basename(rel))
    return int(m.group(1)) if m else 0


def undigested_checkpoint_problem(data: bytes) -> str | None:
    """A checkpoint written before digests were recorded: check the zip archive's CRCs."""
    if data[:2] != b"PK":
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if archive.testzip() is not None:
                return "is damaged (a member fails its CRC)"
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"is damaged ({one_line(exc)[:80]})"
    return None
