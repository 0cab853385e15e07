"""RunDir: a bplab run directory on a local path or a ``pyarrow.fs`` filesystem.

The class is put together from the package's parts: commit.py (writing), repair.py (verify,
recover), lease.py (the driver's lease); this module holds opening and creating a run, the
cases table, reading the ledger, and the read side every reader goes through
(:meth:`RunDir.committed_files`, :meth:`RunDir.read_case`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import posixpath
import threading
import time
from collections.abc import Iterable

import pandas
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.rundir import legacy
from analysis.rundir.commit import CommitMixin
from analysis.rundir.errors import StorageError
from analysis.rundir.files import Files, json_bytes, resolve
from analysis.rundir.layout import (
    CASES, COMPACT, COMPACT_RE, DATASETS, FORMAT_VERSION, LAYOUT_NAMES, LEDGER, MANIFEST, PART_RE, STAGED_RE,
    backup_rel, dataset as dataset_spec, entry_case, entry_rel, is_hidden, is_tmp, log_rel, partition,
    partition_case, REPORT, TENSORBOARD,
)
from analysis.rundir.lease import LeaseMixin
from analysis.rundir.liveness import not_a_run_message
from analysis.rundir.ledger import LedgerEntry, check_name, read_entry
from analysis.rundir.repair import RepairMixin
from analysis.rundir.schema import Schemas, cases_to_table, check_cases, settings_column_types
from workers.errors import one_line


class RunDir(CommitMixin, RepairMixin, LeaseMixin):
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
        fs, root = resolve(self.location, filesystem)
        self._files = Files(fs, root, atomic_rename)
        self._schemas = Schemas(self._files)
        self._lock = threading.RLock()
        self._entries: dict[str, LedgerEntry] = {}  # last ledger entry known to be on disk
        self._case_ids: set[str] | None = None
        self._restored: set[str] = set()  # cases whose ledger entry was read from its backup copy
        self._version: int | None = None

    # ------------------------------------------------------------------ basics
    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs.FileSystem`` holding the run."""
        return self._files.fs

    @property
    def root(self) -> str:
        """The run's path inside :attr:`filesystem` (no URI scheme)."""
        return self._files.root

    @property
    def is_local(self) -> bool:
        return self._files.fs.type_name == "local"

    def path(self, *parts: str) -> str:
        """The path of ``RUN/parts...`` inside :attr:`filesystem` (names from layout.py)."""
        return self._files.path(*parts)

    def log_path(self, name: str) -> str:
        """Where the output of case ``name`` is kept (a plain text file outside the commit protocol)."""
        return self._files.path(log_rel(name))

    def report_folder(self, suffix: str = "") -> str:
        """Where ``bplab report`` writes this run's report: ``RUN/report<suffix>`` (a path inside
        :attr:`filesystem`; ``suffix`` such as ``-vs-BASELINE``)."""
        return self._files.path(REPORT + suffix)

    def tensorboard_folder(self) -> str:
        """Where ``bplab tensorboard`` writes this run's event files: ``RUN/tensorboard``."""
        return self._files.path(TENSORBOARD)

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    def is_run(self) -> bool:
        """True if the location holds a bplab run (its manifest.json exists)."""
        return self._files.exists(self._files.path(MANIFEST))

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
        written last (with ``format_version``), so a create that dies half-way leaves no run
        and can be repeated. Refuses (StorageError) if the location already holds a run, or
        holds files that are not part of a bplab run.
        """
        run = cls(location, filesystem=filesystem, atomic_rename=atomic_rename)
        if not isinstance(manifest, dict):
            raise StorageError("the run manifest must be a dict")
        manifest_bytes = json_bytes({**manifest, "format_version": FORMAT_VERSION}, f"{run.location}: manifest")
        rows = check_cases(cases)
        with run._lock:
            run.check_new()
            run._files.write_table(run._files.path(CASES), cases_to_table(rows))
            ids = {row["case_id"] for row in rows}
            for info in run._files.list(run._files.path(LEDGER)):  # leftovers of a create that died half-way
                case_id = entry_case(info.base_name)
                if case_id is not None and case_id not in ids:
                    run._files.delete(info.path)
            for row in rows:
                run._put_entry(LedgerEntry(case_id=row["case_id"], name=str(row["name"])))
            run._case_ids = ids
            run._files.write_bytes(run._files.path(MANIFEST), manifest_bytes)
        return run

    def check_new(self) -> None:
        """StorageError (one line) unless a new run can be created here: the location is not a
        file, holds no run and no files foreign to a run. Reads only."""
        try:
            kind = self._files.kind(self.root)
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"cannot use {self.location}: {one_line(exc)}") from None
        if kind == pafs.FileType.File:
            raise StorageError(f"{self.location} is a file, not a folder for a bplab run")
        if self.is_run():
            raise StorageError(f"{self.location} already holds a run: resume it with --resume {self.location}")
        foreign = sorted(
            info.base_name
            for info in self._files.list(self.root)
            if info.base_name not in LAYOUT_NAMES and not is_tmp(info.base_name)
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
        """Open an existing run; StorageError if ``location`` is not a run directory or was
        written by a newer bplab."""
        run = cls(location, filesystem=filesystem, atomic_rename=atomic_rename)
        run._require_run()
        run.format_version()
        return run

    def manifest(self) -> dict:
        """The manifest dict given to :meth:`create` (plus ``format_version``)."""
        try:
            data = self._files.read_json(self._files.path(MANIFEST))
        except FileNotFoundError:
            raise StorageError(f"{self.location} is not a bplab run directory (no {MANIFEST})") from None
        except ValueError as exc:
            raise StorageError(f"{self.location}: damaged {MANIFEST} ({one_line(exc)})") from None
        if not isinstance(data, dict):
            raise StorageError(f"{self.location}: damaged {MANIFEST} (not a JSON object)")
        return data

    def format_version(self) -> int:
        """The run's format version (1: written before the manifest said; see legacy.py)."""
        if self._version is None:
            self._version = legacy.format_version(self.manifest(), self.location)
        return self._version

    def created_at(self) -> float | None:
        """When the run was created (seconds since the epoch), if the manifest says."""
        return legacy.created_at(self.manifest())

    # ------------------------------------------------------------------ cases
    def cases(self) -> pandas.DataFrame:
        """The cases table: one row per case with case_id, name and every setting."""
        return self._cases_table().to_pandas()

    def cases_table(self, columns: list[str] | None = None) -> pa.Table:
        """The cases table as Arrow, its setting columns in the settings' types (older runs'
        tables converted, see legacy.py)."""
        table = self._cases_table()
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        return legacy.typed_cases(table, settings_column_types())

    def has_cases(self) -> bool:
        """True if the cases table exists (a run whose create() got that far)."""
        return self._files.exists(self._files.path(CASES))

    def case_ids(self) -> list[str]:
        """The ids of all cases, in the order of the cases table."""
        return [str(x) for x in self._cases_table().column("case_id").to_pylist()]

    def add_cases(self, cases: list[dict]) -> list[str]:
        """Add cases to an existing run and return the ids that were new.

        Cases whose id is already in the run are skipped (their row and ledger entry are
        untouched); cases.parquet is rewritten atomically with the new rows appended, then a
        pending ledger entry is written for each new case.
        """
        rows = check_cases(cases)
        with self._lock:
            self._require_run()
            old_rows = self._cases_table().to_pylist()
            known = {row["case_id"] for row in old_rows}
            new_rows = [row for row in rows if row["case_id"] not in known]
            if new_rows:
                self._files.write_table(self._files.path(CASES), cases_to_table(old_rows + new_rows))
                self._case_ids = known | {row["case_id"] for row in new_rows}
            for row in new_rows:
                if not self._files.exists(self._files.path(entry_rel(row["case_id"]))):
                    self._put_entry(LedgerEntry(case_id=row["case_id"], name=str(row["name"])))
            return [row["case_id"] for row in new_rows]

    # ------------------------------------------------------------------ ledger
    def ledger(self) -> dict[str, LedgerEntry]:
        """Every ledger entry, by case id (read from storage; works with no driver alive).
        StorageError (one line) if an entry and its backup are both damaged."""
        return {entry.case_id: entry for entry in self._scan(strict=True)[0]}

    def scan_ledger(self) -> tuple[dict[str, LedgerEntry], list[str]]:
        """(every readable ledger entry by case id, the ids whose entry and backup are both
        damaged): for readers that report damage rather than stop at it."""
        entries, damaged = self._scan(strict=False)
        return {entry.case_id: entry for entry in entries}, damaged

    def _scan(self, strict: bool) -> tuple[list[LedgerEntry], list[str]]:
        entries, damaged = [], []
        for info in sorted(self._files.list(self._files.path(LEDGER)), key=lambda i: i.base_name):
            case_id = entry_case(info.base_name)
            if info.type != pafs.FileType.File or case_id is None:
                continue
            try:
                entry = self._read_entry(case_id)
            except StorageError:
                if strict:
                    raise
                damaged.append(case_id)
                continue
            if entry is not None:
                entries.append(entry)
        return entries, damaged

    def entry(self, case_id: str) -> LedgerEntry:
        """The ledger entry of one case (StorageError if the case has none)."""
        check_name(case_id, "case id")
        entry = self._read_entry(case_id)
        if entry is None:
            raise StorageError(f"{self.location}: no case {case_id} in the ledger")
        return entry

    def _read_entry(self, case_id: str) -> LedgerEntry | None:
        """The entry on disk; a damaged one is replaced by its backup copy."""
        entry, restored = read_entry(self._files, case_id, self.location)
        if entry is None:
            return None
        with self._lock:
            if restored:
                self._restored.add(case_id)
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
        data = json_bytes(entry.to_dict(), f"case {entry.case_id}: ledger entry")
        self._files.write_bytes(self._files.path(entry_rel(entry.case_id)), data)
        self._entries[entry.case_id] = copy.deepcopy(entry)
        self._files.write_bytes(self._files.path(backup_rel(entry.case_id)), data)
        return entry

    # ------------------------------------------------------------------ reading datasets
    def committed_files(self, dataset: str, ledger: dict[str, LedgerEntry] | None = None,
                        case_ids: Iterable[str] | None = None) -> list[tuple[str, list[str]]]:
        """The files that hold a dataset's committed rows, as ``[(base folder, [paths])]``:
        each list is hive-partitioned under its base folder (``case_id=<id>/...``), so
        ``pyarrow.dataset.dataset(paths, partition_base_dir=base, ...)`` reads them.

        Committed datasets: each case's parts up to the ledger's commit_seq (a committed part
        not yet published is read under its staged name), or a finished case's compacted
        metrics file while it is current; per-case datasets: every file of the case. Only
        cases of the ledger (``ledger`` if given, else read) count; ``case_ids`` narrows them.
        """
        spec = dataset_spec(dataset)
        if ledger is None:
            ledger = self.ledger()
        wanted = set(ledger) if case_ids is None else set(case_ids) & set(ledger)
        version = self.format_version()
        by_case: dict[str, list] = {}
        if case_ids is not None:  # named cases: list only their folders
            listed = [i for case_id in sorted(wanted) for i in self._files.list(self._files.path(dataset, partition(case_id)))]
        else:
            listed = self._files.list(self._files.path(dataset), recursive=True)
        for info in listed:
            if info.type != pafs.FileType.File:
                continue
            case_id = partition_case(_folder_name(info.path))
            if case_id in wanted:
                by_case.setdefault(case_id, []).append(info)
        cached: dict[str, str] = {}
        if dataset == "metrics":
            for info in self._files.list(self._files.path(COMPACT), recursive=True):
                m = COMPACT_RE.match(info.base_name)
                case_id = partition_case(_folder_name(info.path))
                if m and case_id in wanted and int(m.group(1)) == ledger[case_id].commit_seq:
                    cached[case_id] = info.path
        rest: list[str] = []
        for case_id in sorted(by_case):
            if case_id in cached:
                continue
            entry = ledger[case_id]
            if not spec.committed:
                rest += sorted(i.path for i in by_case[case_id] if i.base_name.endswith(".parquet")
                               and not is_hidden(i.base_name))
                continue
            every_published = legacy.every_published_part_committed(entry, version)
            recorded = entry.committed_seqs(dataset)
            published = {}
            staged = {}
            for info in by_case[case_id]:
                if m := PART_RE.match(info.base_name):
                    published[int(m.group(1))] = info.path
                elif m := STAGED_RE.match(info.base_name):
                    staged[int(m.group(1))] = info.path
            for seq in sorted(published.keys() | staged.keys()):
                if every_published:
                    if seq in published:
                        rest.append(published[seq])
                elif seq <= entry.commit_seq and (seq in published or seq in recorded):
                    rest.append(published.get(seq) or staged[seq])
        out = []
        if cached:
            out.append((self._files.path(COMPACT), sorted(cached.values())))
        out.append((self._files.path(dataset), rest))
        return out

    def cases_with(self, dataset: str) -> set[str]:
        """The ids of the cases that have a folder in ``dataset`` (files written for them;
        listing only, nothing is read)."""
        dataset_spec(dataset)
        return {case_id for info in self._files.list(self._files.path(dataset))
                if info.type == pafs.FileType.Directory and (case_id := partition_case(info.base_name)) is not None}

    def read_case(self, dataset: str, case_id: str, ledger: dict[str, LedgerEntry] | None = None) -> pa.Table | None:
        """The committed rows of one case in a dataset as one Arrow table (None if it has none).
        Parts written before a column existed lack it (promoted to nulls)."""
        check_name(case_id, "case id")
        if ledger is None:
            entry = self._read_entry(case_id)
            ledger = {case_id: entry} if entry is not None else {}
        paths = [p for _, group in self.committed_files(dataset, ledger, [case_id]) for p in group]
        if not paths:
            return None
        tables = [pq.read_table(path, filesystem=self._files.fs) for path in paths]
        return pa.concat_tables(tables, promote_options="permissive")

    # ------------------------------------------------------------------ internals
    def _cases_table(self) -> pa.Table:
        try:
            data = self._files.read_bytes(self._files.path(CASES))
        except FileNotFoundError:
            raise StorageError(f"{self.location} is not a bplab run directory (no {CASES})") from None
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"{self.location}/{CASES} is damaged ({one_line(exc)[:100]}); restore it from a copy, "
                               "or start the study again in a new folder") from None

    def _known_case_ids(self) -> set[str]:
        if self._case_ids is None:
            self._case_ids = set(self.case_ids())
        return self._case_ids

    def _require_run(self) -> None:
        if not self.is_run():  # (a driver that died before creating the run left its lease: say so)
            raise StorageError(not_a_run_message(self))


def _folder_name(path: str) -> str:
    """The name of the folder holding ``path``."""
    return posixpath.basename(posixpath.dirname(path))
