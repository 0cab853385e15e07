"""The commit protocol: each progress report of a case is committed exactly once.

Actors never touch storage; the driver calls :meth:`RunDir.commit`. Every file is written
under a temporary name and renamed into place, and the case's ledger entry is written last,
so the ledger entry is the commit record: whatever a crashed driver wrote after its last
ledger write is removed by :meth:`RunDir.recover` and reported again by the resumed case.

A part is written as ``.staged-part-<seq>.parquet``, recorded (row count) in the case's
ledger entry, which is the commit, and only then renamed into place, so a plain
``pandas.read_parquet(RUN/metrics)`` never reads an uncommitted row. Each ledger entry also
keeps the SHA-256 of the two kept checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from analysis.rundir import legacy
from analysis.rundir.errors import StorageError
from analysis.rundir.layout import (
    CHECKPOINTS, COMPACT, COMMITTED, COMPACT_RE, CKPT_RE, DATASETS, PART_RE, checkpoint_rel, compact_rel, file_name,
    part_name, partition, staged_name,
)
from analysis.rundir.ledger import LedgerEntry, check_name, generation


class CommitMixin:
    """RunDir's writing methods (mixed into RunDir)."""

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

    def commit(
        self,
        case_id: str,
        entry: LedgerEntry,
        *,
        checkpoint: bytes | None = None,
        tables: Mapping[str, Any] | None = None,
    ) -> LedgerEntry:
        """Commit one progress report of a case, exactly once; return the new ledger entry.

        ``tables``: dataset name -> its new rows, as row dicts, a mapping column -> 1-D
        values, or a ``pyarrow.Table`` (e.g. ``{"metrics": rows, "layer_stats": stats}``);
        empty ones are skipped. Each name must be a committed dataset of layout.DATASETS.
        ``seq = entry.commit_seq + 1``. In order:

        1. each dataset's part is written under a hidden name (``.staged-part-<seq>.parquet``,
           which every Parquet reader skips) and the checkpoint (if given) as ``ckpt-<seq>.npz``;
        2. the ledger entry is written: ``entry`` with ``commit_seq = seq``, the parts' row
           counts in ``parts``, the checkpoint's path and SHA-256 in ``checkpoints`` (this
           one and the one before it: two generations). This write is the commit;
        3. the parts are published (renamed to ``part-<seq>.parquet``) and checkpoints older
           than the two kept generations are deleted.

        A driver that dies before step 2 leaves hidden files that :meth:`recover` deletes; one
        that dies between 2 and 3 leaves committed parts that :meth:`recover` publishes (and
        readers read them under their staged names meanwhile).

        ``entry.commit_seq`` must equal the ledger's: committing the same report twice, or
        from a stale entry, raises StorageError and changes nothing. If commit raises before
        step 2, nothing is committed and it may be called again with the same arguments.
        """
        check_name(case_id, "case id")
        if not isinstance(entry, LedgerEntry):
            raise TypeError(f"commit(case_id, entry, *, checkpoint=None, tables=None): entry must be a LedgerEntry, "
                            f"not {type(entry).__name__}")
        if entry.case_id != case_id:
            raise StorageError(f"commit for case {case_id} was given the ledger entry of case {entry.case_id}")
        entry.validate()
        if checkpoint is not None and not isinstance(checkpoint, (bytes, bytearray, memoryview)):
            raise StorageError(f"case {case_id}: a checkpoint must be bytes, not {type(checkpoint).__name__}")
        tables = dict(tables or {})
        for name in tables:
            if name not in COMMITTED:
                raise StorageError(f"case {case_id}: {name!r} is not a committed dataset (one of {', '.join(COMMITTED)})")
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
            conformed = [(name, self._schemas.conform(name, tables[name], case_id))
                         for name in COMMITTED if name in tables and not _empty(tables[name])]
            parts = copy.deepcopy(current.parts)
            for dataset, table in conformed:  # 1. staged under hidden names
                if table.num_rows == 0:
                    continue
                self._files.write_table(self._staged_path(dataset, case_id, seq), table)
                parts.setdefault(dataset, {})[str(seq)] = table.num_rows
            ckpt_rel, generations = current.checkpoint, copy.deepcopy(current.checkpoints)
            if checkpoint is not None:
                data = bytes(checkpoint)
                ckpt_rel = checkpoint_rel(case_id, seq)
                self._files.write_bytes(self._files.path(ckpt_rel), data)
                generations = legacy.kept_generations(current, generation)
                generations = [generation(entry, seq, ckpt_rel, hashlib.sha256(data).hexdigest())] + generations[:1]
            new = dataclasses.replace(copy.deepcopy(entry), commit_seq=seq, checkpoint=ckpt_rel, parts=parts,
                                      checkpoints=generations)
            new = self._put_entry(new)  # 2. the commit record
            self._publish_all(new, quiet=True)  # 3. visible to readers
            if checkpoint is not None:
                keep = {g["path"] for g in generations}
                for info in self._files.list(self._files.path(CHECKPOINTS, case_id)):
                    if CKPT_RE.match(info.base_name) and self._files.rel(info.path) not in keep:
                        self._files.delete(info.path)
            return new

    def _staged_path(self, dataset: str, case_id: str, seq: int) -> str:
        return self._files.path(dataset, partition(case_id), staged_name(seq))

    def _part_path(self, dataset: str, case_id: str, seq: int) -> str:
        return self._files.path(dataset, partition(case_id), part_name(seq))

    def _publish_all(self, entry: LedgerEntry, quiet: bool = False) -> list[str]:
        """Rename the committed parts of ``entry`` still under their staged names into place."""
        done = []
        for dataset, seqs in entry.parts.items():
            for seq in seqs:
                staged = self._staged_path(dataset, entry.case_id, int(seq))
                if not self._files.exists(staged):
                    continue
                final = self._part_path(dataset, entry.case_id, int(seq))
                try:
                    self._publish(staged, final)
                except (OSError, pa.ArrowException):
                    if quiet:  # committed all the same: the next commit or recover() publishes it
                        continue
                    raise
                done.append(self._files.rel(final))
        return done

    def _publish(self, staged: str, final: str) -> None:
        self._files.move(staged, final)

    # ------------------------------------------------------------------ per-case files
    def write_file(self, dataset: str, case_id: str, name: str, data: Any) -> None:
        """Write (or replace) the file ``name`` of a case in a per-case dataset, atomically.

        ``data``: row dicts, a mapping column -> 1-D values, or a ``pyarrow.Table``."""
        check_name(case_id, "case id")
        check_name(name, f"{dataset} file name")
        if dataset not in DATASETS or DATASETS[dataset].committed:
            raise StorageError(f"{dataset!r} is not a per-case dataset (committed ones go through commit())")
        with self._lock:
            table = self._schemas.conform(dataset, data, case_id)
            self._files.write_table(self._files.path(dataset, partition(case_id), file_name(name)), table)

    def write_histograms(self, case_id: str, phase: str, rows: list[dict]) -> None:
        """Write (or replace) the weight histograms of a case for ``phase`` ('before', 'after')."""
        check_name(phase, "histogram phase")
        self.write_file("weights", case_id, phase, rows)

    def write_boundary(self, case_id: str, rows: list[dict] | Mapping) -> None:
        """Write (or replace) a case's decision-boundary grid (2-D data only): row dicts, or
        column name -> equal-length 1-D arrays (what the trainer sends: a grid has thousands of points)."""
        self.write_file("boundary", case_id, "final", rows)

    # ------------------------------------------------------------------ the read cache
    def compact_metrics(self, case_id: str) -> str | None:
        """Merge a finished case's committed metrics parts into one file, a read cache.

        Written to ``metrics_compact/case_id=<id>/upto-<commit_seq>.parquet`` (atomically);
        ``metrics/`` stays complete and authoritative. A reader uses the cache only while its
        sequence number equals the ledger's commit_seq (RunDir.committed_files does), so a
        later commit simply makes it stale. Returns the cache's run-relative path, or None if
        the case has no metrics.
        """
        check_name(case_id, "case id")
        with self._lock:
            entry = self._committed(case_id)
            if entry is None or entry.commit_seq == 0:
                return None
            self._publish_all(entry)  # a cache of every committed part, none still under its staged name
            parts = sorted(
                (int(m.group(1)), info.path)
                for info in self._files.list(self._files.path("metrics", partition(case_id)))
                if (m := PART_RE.match(info.base_name)) and int(m.group(1)) <= entry.commit_seq
            )
            if not parts:
                return None
            table = pa.concat_tables([self._files.read_table(path) for _, path in parts], promote_options="permissive")
            rel = compact_rel(case_id, entry.commit_seq)
            self._files.write_table(self._files.path(rel), table)
            for info in self._files.list(self._files.path(COMPACT, partition(case_id))):
                if COMPACT_RE.match(info.base_name) and info.path != self._files.path(rel):
                    self._files.delete(info.path)
            return rel

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, case_id: str) -> bytes | None:
        """The bytes of the case's latest committed checkpoint (per the ledger), or None.

        StorageError (one line, naming the file) if it is missing or does not match the
        SHA-256 its commit recorded; ``bplab run --resume`` then falls back to the one before.
        """
        entry = self.entry(case_id)
        if entry.checkpoint is None:
            return None
        try:
            data = self._files.read_bytes(self._files.path(entry.checkpoint))
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


def _empty(data: Any) -> bool:
    if data is None:
        return True
    if isinstance(data, pa.Table):
        return data.num_rows == 0
    if isinstance(data, Mapping):
        return all(len(values) == 0 for values in data.values())
    return len(data) == 0
