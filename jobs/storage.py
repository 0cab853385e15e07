"""The run directory: ledger, Parquet logs and checkpoints, written only by the driver.

Actors never touch storage (DESIGN.md, decision 1). They send progress reports to the
driver, which calls :meth:`RunDir.commit`; every file is written under a temporary name and
renamed into place, and the case's ledger entry is written last, so the ledger entry is the
commit record: whatever a crashed driver wrote after its last ledger write is removed by
:meth:`RunDir.recover` and reported again by the resumed case, so every step is logged
exactly once.

A run directory is a local path or a ``pyarrow.fs`` URI (``s3://bucket/run``,
``gs://bucket/run``, ``file:///abs/path``, ``hdfs://...``)::

    RUN/
      manifest.json                                    written once, last step of create()
      cases.parquet                                    one row per case: case_id, name, settings
      ledger/<case_id>.json                            the case's state (a LedgerEntry)
      metrics/0-schema.parquet                         zero-row schema anchor (see below)
      metrics/case_id=<id>/part-<seq:06d>.parquet      one file per commit
      layer_stats/0-schema.parquet
      layer_stats/case_id=<id>/part-<seq:06d>.parquet  optional, committed like metrics
      alignment/0-schema.parquet
      alignment/case_id=<id>/part-<seq:06d>.parquet    optional (alignment_every), committed like metrics
      weights/0-schema.parquet
      weights/case_id=<id>/part-<phase>.parquet        weight histograms ('before', 'after')
      boundary/case_id=<id>/part-final.parquet         decision-boundary grid of a 2-D classifier
      checkpoints/<case_id>/ckpt-<seq:06d>.npz         the latest committed checkpoint and the one before it
      driver.lock                                      the live driver's lease (see take_lease)

``metrics/``, ``layer_stats/``, ``alignment/`` and ``weights/`` are hive-partitioned Parquet datasets, read
whole with ``pandas.read_parquet(RUN + "/metrics")`` (``case_id`` comes back categorical).

Schema anchor: pyarrow takes a dataset's schema from the *first* file (in path order). If
that file had ``lr`` all None (a null column) or no ``lr`` at all, later files with real
``lr`` values fail to read or silently lose the column. So each dataset keeps a run-wide
schema (the union of every column seen, with one stable type each) in a zero-row file
``0-schema.parquet`` that sorts before every ``case_id=...`` folder, and every part is
written with exactly that schema. Column types: integers -> int64, floats -> float64,
strings -> string, bool -> bool, lists -> list<those> (``updates`` is list<int64>),
anything else as pyarrow infers it; a column that has only
been None so far is float64 until a real value arrives; int64 widens to float64 when a
float arrives (older int64 parts are cast on read); a run that stored a column as JSON
strings (bplab before lists were lists) keeps getting JSON strings in it; any other change
of type is refused. cases.parquet takes the types of the settings' annotations instead
(``hidden`` list<int64>, ``data.path`` string even when None in every case).

Commits (see :meth:`RunDir.commit`): a part is written as ``.staged-part-<seq>.parquet``,
recorded (row count) in the case's ledger entry, which is the commit, and only then renamed
into place, so a plain ``pandas.read_parquet(RUN/metrics)`` never reads an uncommitted row.
Each ledger entry also keeps the SHA-256 of the two kept checkpoints, and a second copy of
itself in ``ledger/.<case_id>.json.bak``. :meth:`RunDir.verify` checks a run against its
ledger; :meth:`RunDir.recover` publishes committed parts, deletes uncommitted ones and rolls
a case with a damaged part or checkpoint back to its last intact commit.

Temporary files are named ``.<name>.tmp-<random>`` (hidden, so pyarrow's dataset discovery
skips them even while a reader lists the folder). On object stores (s3, gcs) a single object
write is already atomic, so files are written in place instead.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import dataclasses
import json
import os
import platform
import posixpath
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePath
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas
import pyarrow as pa
import pyarrow.fs as pafs

from workers.errors import one_line as _one_line
import pyarrow.parquet as pq

__all__ = [
    "CASE_STATES",
    "FAILURE_CLASSES",
    "DATASETS",
    "LeaseLost",
    "LedgerEntry",
    "RunDir",
    "StorageError",
]

CASE_STATES = ("pending", "running", "done", "failed", "diverged")
FAILURE_CLASSES = ("oom", "node_lost", "worker_died", "diverged", "bad_settings", "bug", "interrupted", "storage")

#: The Parquet datasets of a run (each hive-partitioned by ``case_id``).
DATASETS = ("metrics", "layer_stats", "alignment", "weights", "boundary")
#: The datasets written by commits (one part per commit, exactly once across kills and resumes).
COMMITTED = ("metrics", "layer_stats", "alignment")

MANIFEST = "manifest.json"
CASES = "cases.parquet"
LEDGER = "ledger"
CHECKPOINTS = "checkpoints"
SCHEMA_ANCHOR = "0-schema.parquet"  # sorts before "case_id=..." and is not hidden
PARTITION_KEY = "case_id"

LOCK = "driver.lock"
LEASE_STALE_SECONDS = 60.0  # a lease on another host is dead after this long without a heartbeat
_TAKEOVER = ".driver.lock.takeover"  # held for a moment while a lease is taken over, renewed or released
_TAKEOVER_STALE_SECONDS = 30.0
COMPACT = "metrics_compact"  # read cache: a finished case's metrics parts merged into one file
_COMPACT_RE = re.compile(r"^upto-(\d+)\.parquet$")
_LAYOUT_NAMES = {MANIFEST, CASES, LEDGER, CHECKPOINTS, LOCK, _TAKEOVER, COMPACT, *DATASETS}
_TMP_MARK = ".tmp-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.npz$")
_STAGED_PREFIX = ".staged-"  # a part written but not yet published by its commit (hidden from readers)
_STAGED_RE = re.compile(r"^\.staged-part-(\d+)\.parquet$")
_BACKUP_SUFFIX = ".bak"  # ledger/.<case_id>.json.bak: a second copy of each ledger entry
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two+ letters: not a Windows drive
_PROVISIONAL_KEY = b"bplab.provisional"
_IN_PLACE_HINTS = ("s3", "gcs", "gs")  # object stores: single writes are atomic, no rename


class StorageError(ValueError):
    """A run-directory problem, with a one-line message fit to show to the user."""


class LeaseLost(StorageError):
    """The driver's lease was taken by another driver: this one must stop writing."""


@dataclass
class LedgerEntry:
    """The state of one case, stored as ``ledger/<case_id>.json``.

    ``commit_seq`` counts the commits made (0 = nothing committed); metrics and layer-stats
    parts and checkpoints with a higher sequence number than it are not committed.
    ``checkpoint`` is the run-relative path of the latest committed checkpoint.
    """

    case_id: str
    name: str
    state: str = "pending"
    attempts: int = 0  # how many actors were started for it
    commit_seq: int = 0  # number of commits made (0 = nothing committed)
    checkpoint: str | None = None  # run-relative path of the latest checkpoint
    epoch: int = 0  # position at the last commit
    step: int = 0
    reason_class: str | None = None
    reason: str | None = None
    diverged_step: int | None = None
    node: str | None = None
    gpu: str | None = None
    info: dict = field(default_factory=dict)  # versions, gpu name, ... reported by the actor
    latest: dict = field(default_factory=dict)  # latest test accuracy etc., for status
    updated_at: float = 0.0
    # the commit record: {dataset: {str(seq): rows}} of every committed metrics / layer-stats part
    parts: dict = field(default_factory=dict)
    # the kept checkpoints, newest first (at most two): {commit_seq, path, sha256, epoch, step, latest}
    checkpoints: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LedgerEntry":
        """Build an entry from a dict; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> None:
        """Raise StorageError if a field holds a value the ledger does not allow."""
        _check_name(self.case_id, "case id")
        if self.state not in CASE_STATES:
            raise StorageError(f"case {self.case_id}: unknown state {self.state!r} (one of {', '.join(CASE_STATES)})")
        if self.reason_class is not None and self.reason_class not in FAILURE_CLASSES:
            raise StorageError(
                f"case {self.case_id}: unknown failure class {self.reason_class!r} (one of {', '.join(FAILURE_CLASSES)})"
            )
        for name in ("attempts", "commit_seq", "epoch", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StorageError(f"case {self.case_id}: {name} must be a non-negative integer, not {value!r}")
        if not isinstance(self.info, dict) or not isinstance(self.latest, dict):
            raise StorageError(f"case {self.case_id}: info and latest must be dicts")
        if not isinstance(self.parts, dict) or not isinstance(self.checkpoints, list):
            raise StorageError(f"case {self.case_id}: parts must be a dict and checkpoints a list")


class RunDir:
    """A bplab run directory on a local path or a ``pyarrow.fs`` filesystem.

    The driver is the only writer; a RunDir object is safe to share between the driver's
    threads (writes are serialised by a lock). Readers such as ``bplab status`` may open the
    same directory at any time.
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        filesystem: pafs.FileSystem | None = None,
        atomic_rename: bool | None = None,
    ):
        """Point at ``location`` (a path or a URI); nothing is created or read.

        ``filesystem``: use this filesystem, with ``location`` a path inside it (for custom
        credentials or tests). ``atomic_rename``: write-then-rename (True) or write in place
        (False); by default in place on object stores (s3, gcs), rename everywhere else.
        """
        self.location = os.fspath(location)
        if filesystem is not None:
            fs, root = filesystem, self.location
        elif _URI_RE.match(self.location):
            try:
                fs, root = pafs.FileSystem.from_uri(self.location)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise StorageError(f"cannot open {self.location}: {_one_line(exc)}") from None
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(self.location))
        if fs.type_name == "local":
            root = root.replace(os.sep, "/")
        root = root.rstrip("/") or "/"
        self._fs = fs
        self._root = root
        if atomic_rename is None:
            atomic_rename = not any(hint in fs.type_name for hint in _IN_PLACE_HINTS)
        self._rename = bool(atomic_rename)
        self._durable = fs.type_name == "local"  # fsync files and folders before trusting a rename
        self._lock = threading.RLock()
        self._made_dirs: set[str] = set()
        self._schemas: dict[str, tuple[pa.Schema, set[str]]] = {}  # dataset -> (schema, provisional)
        self._entries: dict[str, LedgerEntry] = {}  # last ledger entry known to be on disk
        self._case_ids: set[str] | None = None
        self._restored: set[str] = set()  # cases whose ledger entry was read from its backup copy

    # ------------------------------------------------------------------ basics
    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs.FileSystem`` holding the run."""
        return self._fs

    @property
    def root(self) -> str:
        """The run's path inside :attr:`filesystem` (no URI scheme)."""
        return self._root

    def path(self, *parts: str) -> str:
        """The path of ``RUN/parts...`` inside :attr:`filesystem`.

        Read a dataset with ``pandas.read_parquet(run.path("metrics"), filesystem=run.filesystem)``.
        """
        return posixpath.join(self._root, *parts) if parts else self._root

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    def is_run(self) -> bool:
        """True if the location holds a bplab run (its manifest.json exists)."""
        return self._exists(self.path(MANIFEST))

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        location: str | os.PathLike,
        manifest: dict,
        cases: list[dict],
        *,
        filesystem: pafs.FileSystem | None = None,
        atomic_rename: bool | None = None,
    ) -> "RunDir":
        """Start a new run: write cases.parquet, a pending ledger entry per case, then manifest.json.

        ``cases`` are flat dicts with at least ``case_id`` and ``name``. The manifest is
        written last, so a create that dies half-way leaves no run and can be repeated.
        Refuses (StorageError) if the location already holds a run, or holds files that are
        not part of a bplab run.
        """
        run = cls(location, filesystem=filesystem, atomic_rename=atomic_rename)
        if not isinstance(manifest, dict):
            raise StorageError("the run manifest must be a dict")
        manifest_bytes = _json_bytes(manifest, f"{run.location}: manifest")
        rows = _check_cases(cases)
        with run._lock:
            run.check_new()
            run._write_table(run.path(CASES), _cases_to_table(rows))
            ids = {row["case_id"] for row in rows}
            for info in run._list(run.path(LEDGER)):  # leftovers of a create that died half-way
                if info.base_name.endswith(".json") and info.base_name[:-5] not in ids:
                    run._delete(info.path)
            for row in rows:
                run._put_entry(LedgerEntry(case_id=row["case_id"], name=str(row["name"])))
            run._case_ids = ids
            run._write_bytes(run.path(MANIFEST), manifest_bytes)
        return run

    def check_new(self) -> None:
        """StorageError (one line) unless a new run can be created here: the location is not a
        file, holds no run and no files foreign to a run. Reads only."""
        try:
            kind = self._fs.get_file_info(self.root).type
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"cannot use {self.location}: {_one_line(exc)}") from None
        if kind == pafs.FileType.File:
            raise StorageError(f"{self.location} is a file, not a folder for a bplab run")
        if self.is_run():
            raise StorageError(f"{self.location} already holds a run: resume it with --resume {self.location}")
        foreign = sorted(
            info.base_name
            for info in self._list(self.root)
            if info.base_name not in _LAYOUT_NAMES and not _is_tmp(info.base_name)
        )
        if foreign:
            raise StorageError(
                f"{self.location} is not empty and is not a bplab run directory (it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''})"
            )

    @classmethod
    def open(
        cls,
        location: str | os.PathLike,
        *,
        filesystem: pafs.FileSystem | None = None,
        atomic_rename: bool | None = None,
    ) -> "RunDir":
        """Open an existing run; StorageError if ``location`` is not a run directory."""
        run = cls(location, filesystem=filesystem, atomic_rename=atomic_rename)
        if not run.is_run():
            from jobs.liveness import not_a_run_message  # a driver that died before creating the run

            raise StorageError(not_a_run_message(run))
        return run

    def manifest(self) -> dict:
        """The manifest dict given to :meth:`create`."""
        try:
            return json.loads(self._read_bytes(self.path(MANIFEST)))
        except FileNotFoundError:
            raise StorageError(f"{self.location} is not a bplab run directory (no manifest.json)") from None
        except ValueError as exc:
            raise StorageError(f"{self.location}: manifest.json is damaged ({_one_line(exc)})") from None

    # ------------------------------------------------------------------ cases
    def cases(self) -> pandas.DataFrame:
        """The cases table: one row per case with case_id, name and every setting."""
        return self._cases_table().to_pandas()

    def case_ids(self) -> list[str]:
        """The ids of all cases, in the order of the cases table."""
        return [str(x) for x in self._cases_table().column("case_id").to_pylist()]

    def add_cases(self, cases: list[dict]) -> list[str]:
        """Add cases to an existing run and return the ids that were new.

        Cases whose id is already in the run are skipped (their row and ledger entry are
        untouched); cases.parquet is rewritten atomically with the new rows appended, then a
        pending ledger entry is written for each new case.
        """
        rows = _check_cases(cases)
        with self._lock:
            self._require_run()
            old_rows = self._cases_table().to_pylist()
            known = {row["case_id"] for row in old_rows}
            new_rows = [row for row in rows if row["case_id"] not in known]
            if new_rows:
                table = _cases_to_table(old_rows + new_rows)
                self._write_table(self.path(CASES), table)
                self._case_ids = known | {row["case_id"] for row in new_rows}
            for row in new_rows:
                if not self._exists(self._entry_path(row["case_id"])):
                    self._put_entry(LedgerEntry(case_id=row["case_id"], name=str(row["name"])))
            return [row["case_id"] for row in new_rows]

    # ------------------------------------------------------------------ ledger
    def ledger(self) -> dict[str, LedgerEntry]:
        """Every ledger entry, by case id (read from storage; works with no driver alive)."""
        out: dict[str, LedgerEntry] = {}
        for info in sorted(self._list(self.path(LEDGER)), key=lambda i: i.base_name):
            name = info.base_name
            if info.type != pafs.FileType.File or _is_tmp(name) or not name.endswith(".json"):
                continue
            entry = self._read_entry(name[: -len(".json")])
            if entry is not None:
                out[entry.case_id] = entry
        return out

    def entry(self, case_id: str) -> LedgerEntry:
        """The ledger entry of one case (StorageError if the case has none)."""
        _check_name(case_id, "case id")
        entry = self._read_entry(case_id)
        if entry is None:
            raise StorageError(f"{self.location}: no case {case_id} in the ledger")
        return entry

    def write_entry(self, entry: LedgerEntry) -> LedgerEntry:
        """Write a case's ledger entry atomically (state changes between commits).

        The commit fields (``commit_seq``, ``checkpoint``) must match the ledger: only
        :meth:`commit` moves them. ``updated_at`` is stamped. Returns the entry as written.
        """
        entry.validate()
        with self._lock:
            current = self._committed(entry.case_id)
            if current is None:
                if entry.case_id not in self._known_case_ids():
                    raise StorageError(f"{self.location}: no case {entry.case_id} in the run")
                base_seq, base_ckpt = 0, None
            else:
                base_seq, base_ckpt = current.commit_seq, current.checkpoint
            if (entry.commit_seq, entry.checkpoint) != (base_seq, base_ckpt):
                raise StorageError(
                    f"case {entry.case_id}: entry is at commit {entry.commit_seq} ({entry.checkpoint}) but the "
                    f"ledger is at commit {base_seq} ({base_ckpt}); only commit() may change them"
                )
            if current is not None:  # the commit record moves only with commit()
                entry = dataclasses.replace(entry, parts=copy.deepcopy(current.parts),
                                            checkpoints=copy.deepcopy(current.checkpoints))
            return self._put_entry(entry)

    # ------------------------------------------------------------------ commits
    def commit(
        self,
        case_id: str,
        rows: list[dict],
        checkpoint: bytes | None,
        entry: LedgerEntry,
        layer_stats: list[dict] | None = None,
        alignment: list[dict] | None = None,
    ) -> LedgerEntry:
        """Commit one progress report of a case, exactly once; return the new ledger entry.

        ``seq = entry.commit_seq + 1``. In order:

        1. the metrics part (if ``rows``), the layer-stats part (if ``layer_stats``) and the
           alignment part (if ``alignment``) are
           written under hidden names (``.staged-part-<seq>.parquet``, which every Parquet
           reader skips) and the checkpoint (if given) as ``ckpt-<seq>.npz``;
        2. the ledger entry is written: ``entry`` with ``commit_seq = seq``, the parts' row
           counts in ``parts``, the checkpoint's path and SHA-256 in ``checkpoints`` (this
           one and the one before it: two generations). This write is the commit;
        3. the parts are published (renamed to ``part-<seq>.parquet``) and checkpoints older
           than the two kept generations are deleted.

        So ``pandas.read_parquet(RUN/metrics)`` never sees a row that is not committed. A
        driver that dies before step 2 leaves hidden files that :meth:`recover` deletes; one
        that dies between 2 and 3 leaves committed parts that :meth:`recover` publishes.

        ``entry.commit_seq`` must equal the ledger's: committing the same report twice, or
        from a stale entry, raises StorageError and changes nothing. If commit raises before
        step 2, nothing is committed and it may be called again with the same arguments.
        """
        _check_name(case_id, "case id")
        if entry.case_id != case_id:
            raise StorageError(f"commit for case {case_id} was given the ledger entry of case {entry.case_id}")
        entry.validate()
        if checkpoint is not None and not isinstance(checkpoint, (bytes, bytearray, memoryview)):
            raise StorageError(f"case {case_id}: a checkpoint must be bytes, not {type(checkpoint).__name__}")
        with self._lock:
            current = self._committed(case_id)
            if current is None:
                raise StorageError(f"{self.location}: no case {case_id} in the ledger")
            if entry.commit_seq != current.commit_seq:
                raise StorageError(
                    f"case {case_id}: commit from an entry at commit {entry.commit_seq}, but the ledger is at "
                    f"commit {current.commit_seq} (duplicate or stale report)"
                )
            self._publish_all(current)  # a publish that failed after an earlier commit
            seq = current.commit_seq + 1
            tables = []
            if rows:
                tables.append(("metrics", self._conform("metrics", _strip_key(rows, case_id, "metrics"))))
            if layer_stats:
                tables.append(("layer_stats", self._conform("layer_stats", _strip_key(layer_stats, case_id, "layer_stats"))))
            if alignment:
                tables.append(("alignment", self._conform("alignment", _strip_key(alignment, case_id, "alignment"))))
            parts = copy.deepcopy(current.parts)
            for dataset, table in tables:  # 1. staged under hidden names
                self._write_table(self._staged_path(dataset, case_id, seq), table)
                parts.setdefault(dataset, {})[str(seq)] = table.num_rows
            ckpt_rel, generations = current.checkpoint, copy.deepcopy(current.checkpoints)
            if checkpoint is not None:
                data = bytes(checkpoint)
                ckpt_rel = f"{CHECKPOINTS}/{case_id}/ckpt-{seq:06d}.npz"
                self._write_bytes(self.path(ckpt_rel), data)
                if not generations and current.checkpoint:  # a run written before generations were kept
                    generations = [_generation(current, current.commit_seq, current.checkpoint, None)]
                generations = [_generation(entry, seq, ckpt_rel, hashlib.sha256(data).hexdigest())] + generations[:1]
            new = dataclasses.replace(copy.deepcopy(entry), commit_seq=seq, checkpoint=ckpt_rel, parts=parts,
                                      checkpoints=generations)
            new = self._put_entry(new)  # 2. the commit record
            self._publish_all(new, quiet=True)  # 3. visible to readers
            if checkpoint is not None:
                keep = {g["path"] for g in generations}
                for info in self._list(self.path(CHECKPOINTS, case_id)):
                    if _CKPT_RE.match(info.base_name) and self._rel(info.path) not in keep:
                        self._delete(info.path)
            return new

    def _staged_path(self, dataset: str, case_id: str, seq: int) -> str:
        return self.path(dataset, f"{PARTITION_KEY}={case_id}", f"{_STAGED_PREFIX}part-{seq:06d}.parquet")

    def _publish_all(self, entry: LedgerEntry, quiet: bool = False) -> list[str]:
        """Rename the committed parts of ``entry`` still under their staged names into place."""
        done = []
        for dataset, seqs in entry.parts.items():
            for seq in seqs:
                staged = self._staged_path(dataset, entry.case_id, int(seq))
                if not self._exists(staged):
                    continue
                final = self._part_path(dataset, entry.case_id, f"{int(seq):06d}")
                try:
                    self._publish(staged, final)
                except (OSError, pa.ArrowException):
                    if quiet:  # committed all the same: the next commit or recover() publishes it
                        continue
                    raise
                done.append(self._rel(final))
        return done

    def _publish(self, staged: str, final: str) -> None:
        self._fs.move(staged, final)
        self._sync(posixpath.dirname(final))

    # ------------------------------------------------------------------ verification
    def verify(self, case_ids: Iterable[str] | None = None, *, checkpoints: bool = True,
               ledger: bool = True) -> list[tuple[str, int, str]]:
        """Check the committed files of each case against its ledger entry, changing nothing.

        Returns ``(case_id, first damaged commit, what)`` for every case whose committed
        metrics or layer-stats part is missing, unreadable or holds another number of rows
        than its commit recorded, or (unfinished cases, with ``checkpoints``) whose latest
        checkpoint is missing or does not match its SHA-256, and (with ``ledger``) whose ledger
        entry is damaged but has an intact backup copy. :meth:`recover` repairs them.
        """
        damage = []
        self._restored.clear()
        entries = self.ledger()
        for dataset in DATASETS:
            problem = self._anchor_problem(dataset)
            if problem is not None:
                damage.append(("", 0, problem))
        for case_id, entry in sorted(entries.items()):
            if case_ids is not None and case_id not in case_ids:
                continue
            found = self._first_damage(entry, checkpoints=checkpoints)
            if found is None:
                found = self._uncommitted_visible(entry)
            if found is not None:
                damage.append((case_id, *found))
            elif ledger and case_id in self._restored:
                damage.append((case_id, entry.commit_seq + 1, f"ledger/{case_id}.json is damaged (its backup copy is intact)"))
        return damage

    def _first_damage(self, entry: LedgerEntry, checkpoints: bool = True) -> tuple[int, str] | None:
        worst: tuple[int, str] | None = None
        for dataset, seqs in sorted(entry.parts.items()):
            for seq_text, rows in sorted(seqs.items(), key=lambda kv: int(kv[0])):
                seq = int(seq_text)
                if seq > entry.commit_seq or (worst is not None and seq >= worst[0]):
                    continue
                final = self._part_path(dataset, entry.case_id, f"{seq:06d}")
                path = final if self._exists(final) else self._staged_path(dataset, entry.case_id, seq)
                problem = self._part_problem(path, rows)
                if problem is not None:
                    worst = (seq, f"{self._rel(final)} {problem}")
                    break
        if checkpoints and entry.state not in ("done", "diverged") and entry.checkpoint is not None:
            gen = entry.checkpoints[0] if entry.checkpoints else None
            seq = int(gen["commit_seq"]) if gen else _ckpt_seq(entry.checkpoint)
            problem = self._checkpoint_problem(entry.checkpoint, gen["sha256"] if gen else None)
            if problem is not None and (worst is None or seq < worst[0]):
                worst = (seq, f"{entry.checkpoint} {problem}")
        return worst

    def _uncommitted_visible(self, entry: LedgerEntry) -> tuple[int, str] | None:
        """A published part newer than the ledger's commit (left by a driver of an older bplab)."""
        for dataset in COMMITTED:
            for info in self._list(self.path(dataset, f"{PARTITION_KEY}={entry.case_id}")):
                m = _PART_RE.match(info.base_name)
                if m and int(m.group(1)) > entry.commit_seq:
                    return entry.commit_seq + 1, f"{self._rel(info.path)} is not committed but visible to readers"
        return None

    def _anchor_problem(self, dataset: str) -> str | None:
        path = self.path(dataset, SCHEMA_ANCHOR)
        if not self._exists(path):
            return None
        try:
            pq.read_schema(path, filesystem=self._fs)
        except (OSError, pa.ArrowException, ValueError) as exc:
            return f"{dataset}/{SCHEMA_ANCHOR} is damaged ({_one_line(exc)[:100]})"
        return None

    def _rebuild_anchor(self, dataset: str) -> str:
        """Write a damaged schema anchor again from the schemas of the dataset's readable parts."""
        schemas = []
        for info in self._list(self.path(dataset), recursive=True):
            if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") and info.base_name != SCHEMA_ANCHOR \
                    and not info.base_name.startswith("."):
                try:
                    schemas.append(pq.read_schema(info.path, filesystem=self._fs).remove_metadata())
                except (OSError, pa.ArrowException, ValueError):
                    continue
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        meta = {_PROVISIONAL_KEY: json.dumps([]).encode()}
        self._write_table(self.path(dataset, SCHEMA_ANCHOR), schema.with_metadata(meta).empty_table())
        self._schemas.pop(dataset, None)
        return f"{dataset}/{SCHEMA_ANCHOR} was damaged; wrote it again from the schemas of its parts"

    def _part_problem(self, path: str, rows: int) -> str | None:
        if not self._exists(path):
            return "is missing"
        try:
            found = pq.read_metadata(path, filesystem=self._fs).num_rows
        except (OSError, pa.ArrowException, ValueError) as exc:
            return f"is damaged ({_one_line(exc)[:120]})"
        if found != int(rows):
            return f"holds {found} rows where its commit wrote {rows}"
        return None

    def _checkpoint_problem(self, rel: str, sha256: str | None) -> str | None:
        try:
            data = self._read_bytes(self.path(rel))
        except FileNotFoundError:
            return "is missing"
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            return "is damaged (its SHA-256 differs from the one its commit recorded)"
        if sha256 is None and data[:2] == b"PK":  # written before digests were recorded: check the archive
            import io
            import zipfile

            try:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    if archive.testzip() is not None:
                        return "is damaged (a member fails its CRC)"
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                return f"is damaged ({_one_line(exc)[:80]})"
        return None

    def _rollback(self, entry: LedgerEntry, damaged_seq: int, what: str) -> tuple[LedgerEntry, str]:
        """Move a case back to its newest commit before ``damaged_seq`` that has an intact checkpoint
        (or to the start); delete everything it committed after that."""
        target = None
        for gen in entry.checkpoints:
            if int(gen["commit_seq"]) < damaged_seq and self._checkpoint_problem(gen["path"], gen.get("sha256")) is None:
                target = gen
                break
        seq = int(target["commit_seq"]) if target else 0
        for dataset in COMMITTED:
            folder = self.path(dataset, f"{PARTITION_KEY}={entry.case_id}")
            for info in self._list(folder):
                m = _PART_RE.match(info.base_name) or _STAGED_RE.match(info.base_name)
                if m and int(m.group(1)) > seq:
                    self._delete(info.path)
        kept = [g for g in entry.checkpoints if int(g["commit_seq"]) <= seq]
        keep = {g["path"] for g in kept}
        for info in self._list(self.path(CHECKPOINTS, entry.case_id)):
            if self._rel(info.path) not in keep:
                self._delete(info.path)
        for info in self._list(self.path(COMPACT, f"{PARTITION_KEY}={entry.case_id}")):
            self._delete(info.path)
        parts = {d: {k: v for k, v in seqs.items() if int(k) <= seq} for d, seqs in entry.parts.items()}
        new = dataclasses.replace(
            entry, state="pending", reason_class=None, reason=None, diverged_step=None, commit_seq=seq,
            checkpoint=target["path"] if target else None, epoch=int(target["epoch"]) if target else 0,
            step=int(target["step"]) if target else 0, latest=dict(target.get("latest") or {}) if target else {},
            parts={d: v for d, v in parts.items() if v}, checkpoints=kept,
        )
        new = self._put_entry(new)
        where = f"commit {seq} (step {new.step})" if seq else "its start"
        return new, f"case {entry.case_id}: {what}; rolled back to {where}, the steps after it run again on resume"

    def write_histograms(self, case_id: str, phase: str, rows: list[dict]) -> None:
        """Write (or replace) the weight histograms of a case for ``phase`` ('before', 'after'), atomically."""
        _check_name(case_id, "case id")
        _check_name(phase, "histogram phase")
        with self._lock:
            table = self._conform("weights", _strip_key(rows, case_id, "weights"))
            self._write_table(self._part_path("weights", case_id, phase), table)

    def write_boundary(self, case_id: str, rows: list[dict] | Mapping) -> None:
        """Write (or replace) a case's decision-boundary grid (2-D data only), atomically.

        ``rows``: row dicts, or a mapping of column name -> equal-length 1-D arrays (what the
        trainer sends: a grid has thousands of points)."""
        _check_name(case_id, "case id")
        with self._lock:
            if isinstance(rows, Mapping):
                table = self._conform("boundary", None, table=_columns_to_table(rows, case_id, "boundary"))
            else:
                table = self._conform("boundary", _strip_key(rows, case_id, "boundary"))
            self._write_table(self._part_path("boundary", case_id, "final"), table)

    # ------------------------------------------------------------------ the read cache
    def compact_metrics(self, case_id: str) -> str | None:
        """Merge a finished case's committed metrics parts into one file, a read cache.

        Written to ``metrics_compact/case_id=<id>/upto-<commit_seq>.parquet`` (atomically);
        ``metrics/`` stays complete and authoritative, so ``pandas.read_parquet(RUN/"metrics")``
        is unchanged. A reader uses the cache only while its sequence number equals the
        ledger's commit_seq (analysis.load does), so a later commit simply makes it stale.
        Returns the cache's run-relative path, or None if the case has no metrics.
        """
        _check_name(case_id, "case id")
        with self._lock:
            entry = self._committed(case_id)
            if entry is None or entry.commit_seq == 0:
                return None
            self._publish_all(entry)  # a cache of every committed part, none still under its staged name
            folder = self.path("metrics", f"{PARTITION_KEY}={case_id}")
            parts = sorted(
                (int(m.group(1)), info.path)
                for info in self._list(folder)
                if (m := _PART_RE.match(info.base_name)) and int(m.group(1)) <= entry.commit_seq
            )
            if not parts:
                return None
            tables = [pq.read_table(path, filesystem=self._fs) for _, path in parts]
            table = pa.concat_tables(tables, promote_options="permissive")
            rel = f"{COMPACT}/{PARTITION_KEY}={case_id}/upto-{entry.commit_seq:06d}.parquet"
            self._write_table(self.path(rel), table)
            for info in self._list(self.path(COMPACT, f"{PARTITION_KEY}={case_id}")):
                if _COMPACT_RE.match(info.base_name) and info.path != self.path(rel):
                    self._delete(info.path)
            return rel

    # ------------------------------------------------------------------ the driver's lease
    def read_lock(self) -> dict | None:
        """The current driver's lease, or None if no driver holds the run (or the lease is unreadable)."""
        try:
            holder = json.loads(self._read_bytes(self.path(LOCK)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            return None  # a torn lease: see _lease_state
        return holder if isinstance(holder, dict) else None

    def take_lease(self, token: str, stale_seconds: float = LEASE_STALE_SECONDS, *,
                   details: Mapping[str, Any] | None = None) -> None:
        """Claim the run for the driver holding ``token``; StorageError (one line) if another holds it.

        The lease is ``RUN/driver.lock``. It is taken with an exclusive create, so of many
        drivers starting at once exactly one wins. A lease is live while its pid lives (same
        host) or, on another host, while its heartbeat is younger than ``stale_seconds``; an
        expired lease is taken over under a short takeover mark (``.driver.lock.takeover``,
        itself created exclusively), which also serialises renewals and releases, so a lease
        is never overwritten by anyone but its owner. The run folder is created if needed.

        ``details`` (JSON-able, e.g. the suite and options a new run is started with) are kept
        in the lease record and its renewals, so a driver killed before the manifest exists
        still leaves word of what it was starting (see jobs.liveness).

        Object stores: pyarrow offers no conditional write, so there the exclusive create is
        a write followed by a read-back check, which narrows but does not close the window
        in which two drivers starting in the same instant could both win.
        """
        if not isinstance(token, str) or not token:
            raise StorageError("a lease token must be a non-empty string")
        self._make_folder()
        record = {**dict(details or {}), **_lease_record(token)}
        for _ in range(3):
            if self._create_exclusive(self.path(LOCK), record):
                return
            state, holder = self._lease_state(stale_seconds)
            if state == "gone":
                continue  # released in the meantime: try the exclusive create again
            if holder.get("token") == token:
                self.renew_lease(token)
                return
            if state == "live":
                raise StorageError(self._held_message(holder))
            with self._takeover_mark() as marked:  # expired: take it over, one taker at a time
                if not marked:
                    raise StorageError(f"{self.location}: another driver is taking over its expired {LOCK}; try again")
                state, holder = self._lease_state(stale_seconds)  # look again, under the mark
                if state == "live" and holder.get("token") != token:
                    raise StorageError(self._held_message(holder))
                if state != "gone":
                    self._delete(self.path(LOCK))
                if self._create_exclusive(self.path(LOCK), record):
                    return
        raise StorageError(f"{self.location}: could not take {LOCK} (other drivers keep taking it); try again")

    def renew_lease(self, token: str) -> None:
        """Refresh the heartbeat of the lease ``token`` holds; StorageError if it is not the owner's any more."""
        with self._takeover_mark() as marked:
            if not marked:
                return  # someone is looking at the lease right now: renew at the next heartbeat
            holder = self.read_lock()
            if holder is None or holder.get("token") != token:
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "nobody"
                raise LeaseLost(f"{self.location}: this driver lost {LOCK} (now held by {who}); stopped")
            record = {**holder, **_lease_record(token)}  # the details given to take_lease stay
            self._write_bytes(self.path(LOCK), _json_bytes(record, f"{self.location}: {LOCK}"))

    def release_lease(self, token: str) -> None:
        """Give the run up, if ``token`` still holds it."""
        with self._takeover_mark() as marked:
            if marked and (self.read_lock() or {}).get("token") == token:
                self._delete(self.path(LOCK))

    def lease_holder(self, stale_seconds: float = LEASE_STALE_SECONDS) -> dict | None:
        """The live lease's record (host, pid, token, heartbeat), or None if no live driver holds the run."""
        state, holder = self._lease_state(stale_seconds)
        return holder if state == "live" else None

    def lease_state(self, stale_seconds: float = LEASE_STALE_SECONDS) -> tuple[str, dict]:
        """('gone' | 'live' | 'expired', the lease record): is a driver alive for this run? Reads only.

        'expired': the holder's process is gone (same host) or its heartbeat is older than
        ``stale_seconds`` (another host); the record ({} when gone, or torn) says who it was and
        when it was last seen (``heartbeat``, unix seconds)."""
        try:
            return self._lease_state(stale_seconds)
        except (OSError, pa.ArrowException):
            return "gone", {}

    def _lease_state(self, stale_seconds: float) -> tuple[str, dict]:
        """('gone' | 'live' | 'expired', the lease record)."""
        info = self._fs.get_file_info(self.path(LOCK))
        if info.type == pafs.FileType.NotFound:
            return "gone", {}
        holder = self.read_lock()
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        if holder is None:  # being written right now, or torn by a crash: judged by its age
            return ("live" if time.time() - mtime < stale_seconds else "expired"), {}
        try:
            beat = float(holder.get("heartbeat", 0))
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            beat, pid = mtime, -1
        if holder.get("host") == platform.node():
            return ("live" if _pid_alive(pid) else "expired"), holder
        return ("live" if time.time() - beat < stale_seconds else "expired"), holder

    def _held_message(self, holder: dict) -> str:
        if not holder:
            return f"{self.location} is being started by another driver ({LOCK} is being written); wait for it"
        try:
            age = f"{time.time() - float(holder.get('heartbeat', 0)):.0f} s"
        except (TypeError, ValueError):
            age = "?"
        return (f"{self.location} is being run by pid {holder.get('pid')} on {holder.get('host')} (heartbeat {age} ago); "
                f"wait for it, or remove {self.location}/{LOCK} if it is dead")

    def _create_exclusive(self, path: str, record: dict) -> bool:
        """Create ``path`` holding ``record`` only if it does not exist; True if this call created it."""
        data = _json_bytes(record, f"{self.location}: {posixpath.basename(path)}")
        if self._fs.type_name == "local":
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {_one_line(exc)}") from None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync(posixpath.dirname(path))
            return True
        if self._exists(path):  # object stores: write, then check that the write that landed is ours
            return False
        self._write_bytes(path, data)
        time.sleep(0.2)
        try:
            return json.loads(self._read_bytes(path)).get("token") == record.get("token")
        except (FileNotFoundError, ValueError):
            return False

    @contextlib.contextmanager
    def _takeover_mark(self):
        """Hold ``.driver.lock.takeover`` (exclusive create) for a moment; yields False if another process holds it."""
        path = self.path(_TAKEOVER)
        record = {"host": platform.node(), "pid": os.getpid(), "token": secrets.token_hex(8), "heartbeat": time.time()}
        mine = False
        for attempt in range(50):
            if self._create_exclusive(path, record):
                mine = True
                break
            info = self._fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                continue
            if info.mtime is not None and time.time() - info.mtime.timestamp() > _TAKEOVER_STALE_SECONDS:
                self._delete(path)  # left by a process that died while holding it
                continue
            time.sleep(0.01 + 0.02 * secrets.randbelow(5))
        try:
            yield mine
        finally:
            if mine:
                self._delete(path)

    def _make_folder(self) -> None:
        info = self._fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise StorageError(f"{self.location} is a file, not a folder for a bplab run")
        if info.type == pafs.FileType.NotFound:
            try:
                self._fs.create_dir(self.root, recursive=True)
            except (OSError, pa.ArrowException) as exc:
                raise StorageError(f"cannot create {self.location}: {_one_line(exc)}") from None

    def load_checkpoint(self, case_id: str) -> bytes | None:
        """The bytes of the case's latest committed checkpoint (per the ledger), or None.

        StorageError (one line, naming the file) if it is missing or does not match the
        SHA-256 its commit recorded; ``bplab run --resume`` then falls back to the one before.
        """
        entry = self.entry(case_id)
        if entry.checkpoint is None:
            return None
        try:
            data = self._read_bytes(self.path(entry.checkpoint))
        except FileNotFoundError:
            raise StorageError(
                f"case {case_id}: the ledger names checkpoint {entry.checkpoint} but the file is missing; "
                f"`bplab run --resume {self.location}` falls back to the commit before it"
            ) from None
        gen = entry.checkpoints[0] if entry.checkpoints else {}
        if gen.get("path") == entry.checkpoint and gen.get("sha256") and hashlib.sha256(data).hexdigest() != gen["sha256"]:
            raise StorageError(
                f"case {case_id}: checkpoint {self.location}/{entry.checkpoint} is damaged (SHA-256 mismatch); "
                f"`bplab run --resume {self.location}` falls back to the commit before it"
            )
        return data

    # ------------------------------------------------------------------ recovery
    def recover(self) -> list[str]:
        """Repair the run after a driver crash or damage; call it holding the lease (no other driver alive).

        Deletes leftover temporary files and everything a commit wrote but did not record
        (staged or published parts and checkpoints newer than the ledger's commit), publishes
        committed parts still under their staged names (a commit cut between its ledger
        write and its renames), restores a damaged ledger entry from its backup copy, checks
        every committed part (and an unfinished case's latest checkpoint) against the ledger
        and rolls a damaged case back to its last intact commit, deletes checkpoints the
        ledger no longer keeps, writes a pending entry for any case that has none and sets
        'running' cases back to 'pending'. Returns human-readable notes.
        """
        notes: list[str] = []
        with self._lock:
            self._require_run()
            self._entries.clear()
            self._schemas.clear()
            self._restored.clear()
            files = [i for i in self._list(self.root, recursive=True) if i.type == pafs.FileType.File]
            for info in files:
                if _is_tmp(info.base_name):
                    self._delete(info.path)
                    notes.append(f"deleted leftover temporary file {self._rel(info.path)}")
            files = [i for i in files if not _is_tmp(i.base_name)]

            ledger = self.ledger()
            for case_id in sorted(self._restored):
                self._put_entry(ledger[case_id])
                notes.append(f"case {case_id}: ledger/{case_id}.json was damaged; restored it from its backup copy")
            self._restored.clear()
            for row in self._cases_table().select(["case_id", "name"]).to_pylist():
                if row["case_id"] not in ledger:
                    ledger[row["case_id"]] = self._put_entry(LedgerEntry(case_id=row["case_id"], name=str(row["name"])))
                    notes.append(f"case {row['case_id']}: had no ledger entry; added it as pending")

            for dataset in DATASETS:
                if self._anchor_problem(dataset) is not None:
                    notes.append(self._rebuild_anchor(dataset))

            for case_id, entry in sorted(ledger.items()):  # a commit cut before its renames
                for rel in self._publish_all(entry):
                    notes.append(f"case {case_id}: published committed {rel}")

            orphans: set[str] = set()
            for info in files:
                rel = self._rel(info.path).split("/")
                if len(rel) == 3 and rel[0] in COMMITTED and rel[1].startswith(PARTITION_KEY + "="):
                    case_id = rel[1][len(PARTITION_KEY) + 1 :]
                    m = _PART_RE.match(rel[2]) or _STAGED_RE.match(rel[2])
                elif len(rel) == 3 and rel[0] == CHECKPOINTS:
                    case_id, m = rel[1], _CKPT_RE.match(rel[2])
                elif len(rel) == 3 and rel[0] == COMPACT and rel[1].startswith(PARTITION_KEY + "="):
                    case_id, m = rel[1][len(PARTITION_KEY) + 1 :], _COMPACT_RE.match(rel[2])
                else:
                    continue
                entry = ledger.get(case_id)
                if entry is None:
                    orphans.add(case_id)
                    continue
                if m is None or not self._exists(info.path):
                    continue
                seq = int(m.group(1))
                if seq > entry.commit_seq:
                    self._delete(info.path)
                    notes.append(
                        f"case {case_id}: deleted uncommitted {'/'.join(rel)} (ledger is at commit {entry.commit_seq})"
                    )
                elif rel[0] == CHECKPOINTS and "/".join(rel) != entry.checkpoint and "/".join(rel) not in {
                    g.get("path") for g in entry.checkpoints
                }:
                    self._delete(info.path)
                    notes.append(f"case {case_id}: deleted superseded checkpoint {'/'.join(rel)}")

            for case_id, entry in sorted(ledger.items()):
                found = self._first_damage(entry)
                if found is not None:
                    entry, note = self._rollback(entry, *found)
                    ledger[case_id] = entry
                    notes.append(note)
                if entry.checkpoint is not None and not self._exists(self.path(entry.checkpoint)):
                    notes.append(f"case {case_id}: WARNING the committed checkpoint {entry.checkpoint} is missing")
                if entry.state == "running":
                    self._put_entry(dataclasses.replace(entry, state="pending"))
                    notes.append(f"case {case_id}: was running when the driver stopped; set back to pending")
            for case_id in sorted(orphans):
                notes.append(f"case {case_id}: has files but no ledger entry (left in place)")
        return notes

    # ------------------------------------------------------------------ internals: ledger
    def _entry_path(self, case_id: str) -> str:
        return self.path(LEDGER, f"{case_id}.json")

    def _backup_path(self, case_id: str) -> str:
        return self.path(LEDGER, f".{case_id}.json{_BACKUP_SUFFIX}")

    def _parse_entry(self, path: str, case_id: str) -> LedgerEntry:
        data = json.loads(self._read_bytes(path))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        entry = LedgerEntry.from_dict(data)
        entry.validate()
        return entry

    def _read_entry(self, case_id: str) -> LedgerEntry | None:
        """The entry on disk; a damaged one is replaced by its backup copy (StorageError if that is damaged too)."""
        try:
            entry = self._parse_entry(self._entry_path(case_id), case_id)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, StorageError) as exc:
            try:
                entry = self._parse_entry(self._backup_path(case_id), case_id)
                if entry.case_id != case_id:
                    raise ValueError("it holds another case's entry")
            except (FileNotFoundError, ValueError, TypeError, StorageError):
                raise StorageError(
                    f"{self.location}/ledger/{case_id}.json is damaged ({_one_line(exc)[:100]}) and has no intact backup; "
                    f"delete it and run `bplab run --resume {self.location}` to run case {case_id} again from the start"
                ) from None
            with self._lock:
                self._restored.add(case_id)
        if entry.case_id != case_id:
            raise StorageError(f"{self.location}: ledger/{case_id}.json holds the entry of case {entry.case_id}")
        with self._lock:
            self._entries[case_id] = copy.deepcopy(entry)
        return entry

    def _committed(self, case_id: str) -> LedgerEntry | None:
        """The entry on disk (cached: the driver is the only writer)."""
        cached = self._entries.get(case_id)
        return copy.deepcopy(cached) if cached is not None else self._read_entry(case_id)

    def _put_entry(self, entry: LedgerEntry) -> LedgerEntry:
        """Write the entry, then its backup copy (so one of the two always holds a whole entry)."""
        entry = dataclasses.replace(copy.deepcopy(entry), updated_at=time.time())
        entry.validate()
        data = _json_bytes(entry.to_dict(), f"case {entry.case_id}: ledger entry")
        self._write_bytes(self._entry_path(entry.case_id), data)
        self._entries[entry.case_id] = copy.deepcopy(entry)
        self._write_bytes(self._backup_path(entry.case_id), data)
        return entry

    # ------------------------------------------------------------------ internals: cases
    def _cases_table(self) -> pa.Table:
        try:
            data = self._read_bytes(self.path(CASES))
        except FileNotFoundError:
            raise StorageError(f"{self.location} is not a bplab run directory (no {CASES})") from None
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"{self.location}/{CASES} is damaged ({_one_line(exc)[:100]}); restore it from a copy, "
                               "or start the study again in a new folder") from None

    def _known_case_ids(self) -> set[str]:
        if self._case_ids is None:
            self._case_ids = set(self.case_ids())
        return self._case_ids

    def _require_run(self) -> None:
        if not self.is_run():
            raise StorageError(f"{self.location} is not a bplab run directory (no manifest.json)")

    # ------------------------------------------------------------------ internals: Parquet
    def _part_path(self, dataset: str, case_id: str, suffix: str) -> str:
        return self.path(dataset, f"{PARTITION_KEY}={case_id}", f"part-{suffix}.parquet")

    def _registry(self, dataset: str) -> tuple[pa.Schema, set[str]]:
        if dataset not in self._schemas:
            try:
                schema = pq.read_schema(pa.BufferReader(self._read_bytes(self.path(dataset, SCHEMA_ANCHOR))))
                provisional = set(json.loads((schema.metadata or {}).get(_PROVISIONAL_KEY, b"[]")))
                schema = schema.remove_metadata()
            except FileNotFoundError:
                schema, provisional = pa.schema([]), set()
            self._schemas[dataset] = (schema, provisional)
        schema, provisional = self._schemas[dataset]
        return schema, set(provisional)

    def _conform(self, dataset: str, rows: list[dict] | None, table: pa.Table | None = None) -> pa.Table:
        """Build a table from ``rows`` (or take ``table``, already in stable types) with the
        dataset's run-wide schema, widening it if needed."""
        if table is None:
            table, null_cols = _build_table(rows, dataset)
        else:
            null_cols = {name for name in table.column_names if table.column(name).null_count == len(table)}
        schema, provisional = self._registry(dataset)
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
            elif old_type == pa.string() and pa.types.is_list(new_type):
                # a run begun before lists were stored as lists (JSON strings): stay consistent
                table = table.set_column(table.schema.get_field_index(name), name, _as_json_strings(table.column(name)))
            else:
                raise StorageError(
                    f"{dataset}: column {name!r} holds {new_type} values but earlier commits stored {old_type}"
                )
        schema = pa.schema([(name, fields[name]) for name in order])
        if changed:
            meta = {_PROVISIONAL_KEY: json.dumps(sorted(provisional)).encode()}
            self._write_table(self.path(dataset, SCHEMA_ANCHOR), schema.with_metadata(meta).empty_table())
            self._schemas[dataset] = (schema, provisional)
        columns = []
        for f in schema:
            if f.name in table.column_names and (
                f.name not in null_cols or _is_list(f.type) and _is_list(table.schema.field(f.name).type)
            ):  # (a column of empty lists keeps them)
                columns.append(table.column(f.name).cast(f.type))
            else:
                columns.append(pa.nulls(len(table), f.type))
        return pa.Table.from_arrays(columns, schema=schema)

    def _write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._write_bytes(path, sink.getvalue())

    # ------------------------------------------------------------------ internals: files
    def _rel(self, path: str) -> str:
        return posixpath.relpath(path, self._root)

    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type != pafs.FileType.NotFound

    def _list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        try:
            return self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        except (NotADirectoryError, FileNotFoundError):
            return []

    def _read_bytes(self, path: str) -> bytes:
        if not self._exists(path):
            raise FileNotFoundError(path)
        with self._fs.open_input_stream(path) as f:
            return f.read()

    def _delete(self, path: str) -> None:
        try:
            self._fs.delete_file(path)
        except FileNotFoundError:
            pass

    def _make_parent(self, path: str) -> str:
        parent = posixpath.dirname(path)
        if parent not in self._made_dirs:
            self._fs.create_dir(parent, recursive=True)
            self._made_dirs.add(parent)
        return parent

    def _write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        """Write a whole file atomically: temporary name + rename, or in place on object stores."""
        parent = self._make_parent(path)
        if not self._rename:
            with self._fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}{_TMP_MARK}{secrets.token_hex(4)}")
        try:
            with self._fs.open_output_stream(tmp) as f:
                f.write(data)
            self._sync(tmp)
            self._fs.move(tmp, path)
        except BaseException:
            self._delete(tmp)
            raise
        self._sync(parent)

    def _sync(self, path: str) -> None:
        """fsync a local file or folder, so a rename never exposes data the disk does not hold."""
        if not self._durable:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # folders cannot be fsynced on some platforms
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- helpers
def _lease_record(token: str) -> dict:
    return {"host": platform.node(), "pid": os.getpid(), "token": token, "heartbeat": time.time()}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _generation(entry: LedgerEntry, seq: int, path: str, sha256: str | None) -> dict:
    return {"commit_seq": seq, "path": path, "sha256": sha256, "epoch": entry.epoch, "step": entry.step,
            "latest": copy.deepcopy(entry.latest)}


def _ckpt_seq(rel: str) -> int:
    m = _CKPT_RE.match(posixpath.basename(rel))
    return int(m.group(1)) if m else 0


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value) or _TMP_MARK in value:
        raise StorageError(f"bad {what} {value!r}: use letters, digits, '_', '.', '-' and start with a letter or digit")


def _check_cases(cases: Iterable[Mapping]) -> list[dict]:
    rows, seen = [], set()
    for case in cases:
        if not isinstance(case, Mapping) or "case_id" not in case or "name" not in case:
            raise StorageError("every case needs at least a case_id and a name")
        _check_name(case["case_id"], "case id")
        if case["case_id"] in seen:
            raise StorageError(f"case id {case['case_id']} appears twice")
        seen.add(case["case_id"])
        rows.append(dict(case))
    return rows


def _strip_key(rows: list[dict], case_id: str, what: str) -> list[dict]:
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


def _stable_type(t: pa.DataType) -> pa.DataType:
    """The stored type of a column inferred as ``t`` (see the module doc); lists of those."""
    if pa.types.is_null(t) or pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if _is_list(t) or pa.types.is_large_list(t) or getattr(pa.types, "is_list_view", lambda _: False)(t):
        return pa.list_(_stable_type(t.value_type))
    return t


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t)


def _normalise(array: pa.Array) -> pa.Array:
    target = _stable_type(array.type)
    return array if target == array.type else array.cast(target)


def _only_empty_lists(array: pa.Array) -> bool:
    """A list column whose element type is unknown yet (every value None or [])."""
    return pa.types.is_list(array.type) and pa.types.is_null(array.type.value_type)


def _rows_to_table(rows: list[Mapping], what: str, json_fallback: bool = False) -> pa.Table:
    """A table from dicts: union of keys (missing -> null), stable types (see module doc)."""
    return _build_table(rows, what, json_fallback)[0]


def _build_table(rows: list[Mapping], what: str, json_fallback: bool = False) -> tuple[pa.Table, set[str]]:
    """Like _rows_to_table, also returning the names of the columns that were None in every row.

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
                [v if v is None or isinstance(v, str) else json.dumps(v, default=_json_default, sort_keys=True) for v in values],
                pa.string(),
            )
        if pa.types.is_null(array.type) or _only_empty_lists(array):
            null_cols.add(name)  # a later real type wins (see _conform)
        arrays.append(_normalise(array))
    return pa.Table.from_arrays(arrays, names=list(names)), null_cols


def _as_json_strings(column: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())


def settings_column_types() -> dict[str, pa.DataType]:
    """Cases-table column -> Parquet type, from the annotations of the case settings
    (``hidden`` -> list<int64>, ``data.path`` -> string, ``data.train_size`` -> int64, ...),
    so a setting that is None in every case is a null of the right type, not float64."""
    import typing

    from workers import settings as settings_module

    def arrow(annotation) -> pa.DataType | None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Literal:  # a name from the registry
            return arrow(type(args[0])) if args else None
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
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


def _cases_to_table(rows: list[Mapping]) -> pa.Table:
    """The cases table: setting columns typed by their annotations (lists as lists, None as a
    typed null; a list given as a JSON string, as CaseSettings.flat() gives it, is decoded),
    every other column as _rows_to_table infers it."""
    try:
        types = settings_column_types()
    except ImportError:  # storage used without the workers package
        types = {}
    table = _rows_to_table(rows, "cases", json_fallback=True)
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
            continue  # not what the annotation says (an older bplab?): keep the inferred column
        table = table.set_column(index, name, array)
    return table


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return value.tolist()
    if isinstance(value, (PurePath, set, frozenset)):
        return str(value) if isinstance(value, PurePath) else sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(data: Any, what: str) -> bytes:
    try:
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{what} cannot be stored as JSON ({_one_line(exc)})") from None
