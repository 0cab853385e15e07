"""Every name in a run directory, the datasets it holds and the format version.

A run directory is a local path or a ``pyarrow.fs`` URI (``s3://bucket/run``,
``gs://bucket/run``, ``file:///abs/path``, ``hdfs://...``)::

    RUN/
      manifest.json                                    written once, last step of create(); holds format_version
      cases.parquet                                    one row per case: case_id, name, settings
      ledger/<case_id>.json                            the case's state (a LedgerEntry)
      ledger/.<case_id>.json.bak                       a second copy of it
      metrics/0-schema.parquet                         zero-row schema anchor (see schema.py)
      metrics/case_id=<id>/part-<seq:06d>.parquet      one file per commit
      layer_stats/case_id=<id>/part-<seq:06d>.parquet  optional, committed like metrics
      alignment/case_id=<id>/part-<seq:06d>.parquet    optional, committed like metrics
      weights/case_id=<id>/part-<phase>.parquet        weight histograms ('before', 'after')
      boundary/case_id=<id>/part-final.parquet         decision-boundary grid of a 2-D classifier
      metrics_compact/case_id=<id>/upto-<seq>.parquet  read cache: a finished case's metrics in one file
      checkpoints/<case_id>/ckpt-<seq:06d>.npz         the latest committed checkpoint and the one before it
      driver.lock                                      the live driver's lease (see lease.py)
      logs/<case name>.log                             each case's own output (outside the commit protocol)
      tensorboard/                                     `bplab tensorboard`'s event files
      report/                                          `bplab report`'s output

Every dataset is a hive-partitioned Parquet folder, read whole with
``pandas.read_parquet(RUN + "/metrics")`` (``case_id`` comes back categorical). A *committed*
dataset gets one part per commit (exactly once, see commit.py); a *per-case* dataset holds a
few named files per case, each written whole and replaced whole (``part-<name>.parquet``).

Adding a dataset is one entry in :data:`DATASETS`: the commit protocol, recovery,
verification and ``analysis.load`` all take the list from here.

Temporary files are named ``.<name>.tmp-<random>``; a part written but not yet published by
its commit is ``.staged-part-<seq>.parquet``: both are hidden, so pyarrow's dataset discovery
skips them even while a reader lists the folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

#: Written into manifest.json by RunDir.create. Runs written before it have none and are
#: read as version 1 (legacy.py holds everything that differs for them).
FORMAT_VERSION = 2

MANIFEST = "manifest.json"
CASES = "cases.parquet"
LEDGER = "ledger"
CHECKPOINTS = "checkpoints"
SCHEMA_ANCHOR = "0-schema.parquet"  # sorts before "case_id=..." and is not hidden
PARTITION_KEY = "case_id"
LOCK = "driver.lock"
TAKEOVER = ".driver.lock.takeover"  # held for a moment while a lease is taken over, renewed or released
COMPACT = "metrics_compact"  # read cache of the metrics dataset
LOGS = "logs"
TENSORBOARD = "tensorboard"
REPORT = "report"
TMP_MARK = ".tmp-"
STAGED_PREFIX = ".staged-"
BACKUP_SUFFIX = ".bak"


@dataclass(frozen=True)
class Dataset:
    """One Parquet dataset of a run.

    ``committed``: parts are written by RunDir.commit, one per commit, exactly once; else the
    dataset holds named files per case (``part-<name>.parquet``) written by RunDir.write_file.
    ``columns``: the columns a reader can count on and their types (an empty read gives them;
    a part that stores one as all-null gets this type). ``dictionary``: string columns with
    few distinct values (read as categoricals). ``lists``: list columns with few distinct
    values (read as categoricals of tuples).
    """

    name: str
    committed: bool
    columns: pa.Schema
    dictionary: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "metrics", True,
            pa.schema([
                ("split", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()), ("cost", pa.float64()),
                ("accuracy", pa.float64()), ("lr", pa.float64()), ("stages", pa.int64()),
                ("layer_updates", pa.int64()), ("forward_passes", pa.int64()), ("examples", pa.int64()),
                ("examples_per_sec", pa.float64()), ("wall_time", pa.float64()),
                ("updates", pa.list_(pa.int64())), ("layers", pa.list_(pa.string())),
            ]),
            dictionary=("split", "updates", "layers"),  # the last two: runs that stored them as JSON strings
            lists=("updates", "layers"),
        ),
        Dataset(
            "layer_stats", True,
            pa.schema([
                ("step", pa.int64()), ("epoch", pa.int64()), ("layer", pa.string()), ("quantity", pa.string()),
                ("mean", pa.float64()), ("std", pa.float64()), ("min", pa.float64()), ("max", pa.float64()),
                ("hist", pa.string()), ("edges", pa.string()),
            ]),
            dictionary=("layer", "quantity"),
        ),
        # one row per case x measured step x unit x quantity (alignment_every; the quantities:
        # workers/alignment.py): layer is the unit's name, unit its index from the bottom
        Dataset(
            "alignment", True,
            pa.schema([("step", pa.int64()), ("epoch", pa.int64()), ("layer", pa.string()), ("unit", pa.int64()),
                       ("quantity", pa.string()), ("value", pa.float64())]),
            dictionary=("layer", "quantity"),
        ),
        Dataset(
            "weights", False,
            pa.schema([
                ("phase", pa.string()), ("layer", pa.string()), ("param", pa.string()), ("bin", pa.int64()),
                ("left", pa.float64()), ("right", pa.float64()), ("count", pa.int64()),
            ]),
            dictionary=("phase", "layer", "param"),
        ),
        Dataset(
            "boundary", False,
            pa.schema([("x0", pa.float64()), ("x1", pa.float64()), ("p1", pa.float64()), ("label", pa.int64())]),
        ),
    )
}
COMMITTED = tuple(name for name, d in DATASETS.items() if d.committed)

#: Every top-level name a run may hold (anything else makes a folder foreign to bplab).
LAYOUT_NAMES = frozenset({MANIFEST, CASES, LEDGER, CHECKPOINTS, LOCK, TAKEOVER, COMPACT, LOGS, TENSORBOARD, REPORT,
                          *DATASETS})

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
STAGED_RE = re.compile(r"^\.staged-part-(\d+)\.parquet$")
CKPT_RE = re.compile(r"^ckpt-(\d+)\.npz$")
COMPACT_RE = re.compile(r"^upto-(\d+)\.parquet$")


def dataset(name: str) -> Dataset:
    """The registered dataset ``name`` (KeyError names the known ones)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})") from None


def partition(case_id: str) -> str:
    """The folder of one case inside a dataset: ``case_id=<id>``."""
    return f"{PARTITION_KEY}={case_id}"


def partition_case(folder: str) -> str | None:
    """The case id of a ``case_id=<id>`` folder name, else None."""
    prefix = PARTITION_KEY + "="
    return folder[len(prefix):] if folder.startswith(prefix) else None


def part_name(seq: int) -> str:
    return f"part-{seq:06d}.parquet"


def staged_name(seq: int) -> str:
    return f"{STAGED_PREFIX}part-{seq:06d}.parquet"


def file_name(name: str) -> str:
    """A per-case dataset's named file (``part-before.parquet``)."""
    return f"part-{name}.parquet"


def checkpoint_rel(case_id: str, seq: int) -> str:
    return f"{CHECKPOINTS}/{case_id}/ckpt-{seq:06d}.npz"


def compact_rel(case_id: str, seq: int) -> str:
    return f"{COMPACT}/{partition(case_id)}/upto-{seq:06d}.parquet"


def entry_rel(case_id: str) -> str:
    return f"{LEDGER}/{case_id}.json"


def backup_rel(case_id: str) -> str:
    return f"{LEDGER}/.{case_id}.json{BACKUP_SUFFIX}"


def entry_case(file_name: str) -> str | None:
    """The case id of a ledger file name (``<id>.json``), None for anything else there."""
    if file_name.startswith((".", "_")) or not file_name.endswith(".json"):
        return None
    return file_name[: -len(".json")]


def log_rel(name: str) -> str:
    return f"{LOGS}/{name}.log"


def is_tmp(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def is_hidden(name: str) -> bool:
    """Files a Parquet reader skips: temporary, staged, backup copies."""
    return name.startswith((".", "_"))
