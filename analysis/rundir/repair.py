"""Verify a run against its ledger, recover it after a crash, roll damaged cases back.

:meth:`RunDir.verify` checks every committed part and checkpoint against the ledger and
changes nothing; :meth:`RunDir.recover` publishes committed parts, deletes uncommitted ones
and rolls a case with a damaged part or checkpoint back to its last intact commit.
"""
from __future__ import annotations

import dataclasses
import hashlib

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.rundir import legacy
from analysis.rundir.layout import (
    CHECKPOINTS, CKPT_RE, COMMITTED, COMPACT, COMPACT_RE, DATASETS, PART_RE, STAGED_RE, entry_rel, is_tmp,
    partition, partition_case,
)
from analysis.rundir.ledger import FINISHED, LedgerEntry
from workers.errors import one_line


class RepairMixin:
    """RunDir's verify / recover methods (mixed into RunDir)."""

    def verify(self, *, checkpoints: bool = True, ledger: bool = True) -> list[tuple[str, int, str]]:
        """Check the committed files of each case against its ledger entry, changing nothing.

        Returns ``(case_id, first damaged commit, what)`` for every case whose committed part
        is missing, unreadable or holds another number of rows than its commit recorded, or
        (unfinished cases, with ``checkpoints``) whose latest checkpoint is missing or does
        not match its SHA-256, and (with ``ledger``) whose ledger entry is damaged but has an
        intact backup copy; ``("", 0, what)`` for a damaged schema anchor. :meth:`recover`
        repairs them.
        """
        damage = []
        self._restored.clear()
        entries = self.ledger()
        for dataset in DATASETS:
            problem = self._schemas.anchor_problem(dataset)
            if problem is not None:
                damage.append(("", 0, problem))
        for case_id, entry in sorted(entries.items()):
            found = self._first_damage(entry, checkpoints=checkpoints)
            if found is None:
                found = self._uncommitted_visible(entry)
            if found is not None:
                damage.append((case_id, *found))
            elif ledger and case_id in self._restored:
                damage.append((case_id, entry.commit_seq + 1, f"{entry_rel(case_id)} is damaged (its backup copy is intact)"))
        return damage

    def _first_damage(self, entry: LedgerEntry, checkpoints: bool = True) -> tuple[int, str] | None:
        worst: tuple[int, str] | None = None
        for dataset, seqs in sorted(entry.parts.items()):
            for seq_text, rows in sorted(seqs.items(), key=lambda kv: int(kv[0])):
                seq = int(seq_text)
                if seq > entry.commit_seq or (worst is not None and seq >= worst[0]):
                    continue
                final = self._part_path(dataset, entry.case_id, seq)
                path = final if self._files.exists(final) else self._staged_path(dataset, entry.case_id, seq)
                problem = self._part_problem(path, rows)
                if problem is not None:
                    worst = (seq, f"{self._files.rel(final)} {problem}")
                    break
        if checkpoints and entry.state not in FINISHED and entry.checkpoint is not None:
            gen = entry.checkpoints[0] if entry.checkpoints else None
            seq = int(gen["commit_seq"]) if gen else legacy.checkpoint_seq(entry.checkpoint)
            problem = self._checkpoint_problem(entry.checkpoint, gen["sha256"] if gen else None)
            if problem is not None and (worst is None or seq < worst[0]):
                worst = (seq, f"{entry.checkpoint} {problem}")
        return worst

    def _uncommitted_visible(self, entry: LedgerEntry) -> tuple[int, str] | None:
        """A published part newer than the ledger's commit (left by a driver from before the
        staged commit, see legacy.py)."""
        for dataset in COMMITTED:
            for info in self._files.list(self._files.path(dataset, partition(entry.case_id))):
                m = PART_RE.match(info.base_name)
                if m and int(m.group(1)) > entry.commit_seq:
                    return entry.commit_seq + 1, f"{self._files.rel(info.path)} is not committed but visible to readers"
        return None

    def _part_problem(self, path: str, rows: int) -> str | None:
        if not self._files.exists(path):
            return "is missing"
        try:
            found = pq.read_metadata(path, filesystem=self._files.fs).num_rows
        except (OSError, pa.ArrowException, ValueError) as exc:
            return f"is damaged ({one_line(exc)[:120]})"
        if found != int(rows):
            return f"holds {found} rows where its commit wrote {rows}"
        return None

    def _checkpoint_problem(self, rel: str, sha256: str | None) -> str | None:
        try:
            data = self._files.read_bytes(self._files.path(rel))
        except FileNotFoundError:
            return "is missing"
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            return "is damaged (its SHA-256 differs from the one its commit recorded)"
        if sha256 is None:
            return legacy.undigested_checkpoint_problem(data)
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
            for info in self._files.list(self._files.path(dataset, partition(entry.case_id))):
                m = PART_RE.match(info.base_name) or STAGED_RE.match(info.base_name)
                if m and int(m.group(1)) > seq:
                    self._files.delete(info.path)
        kept = [g for g in entry.checkpoints if int(g["commit_seq"]) <= seq]
        keep = {g["path"] for g in kept}
        for info in self._files.list(self._files.path(CHECKPOINTS, entry.case_id)):
            if self._files.rel(info.path) not in keep:
                self._files.delete(info.path)
        for info in self._files.list(self._files.path(COMPACT, partition(entry.case_id))):
            self._files.delete(info.path)
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
            files = [i for i in self._files.list(self._files.root, recursive=True) if i.type == pafs.FileType.File]
            for info in files:
                if is_tmp(info.base_name):
                    self._files.delete(info.path)
                    notes.append(f"deleted leftover temporary file {self._files.rel(info.path)}")
            files = [i for i in files if not is_tmp(i.base_name)]

            ledger = self.ledger()
            for case_id in sorted(self._restored):
                self._put_entry(ledger[case_id])
                notes.append(f"case {case_id}: {entry_rel(case_id)} was damaged; restored it from its backup copy")
            self._restored.clear()
            for row in self._cases_table().select(["case_id", "name"]).to_pylist():
                if row["case_id"] not in ledger:
                    ledger[row["case_id"]] = self._put_entry(LedgerEntry(case_id=row["case_id"], name=str(row["name"])))
                    notes.append(f"case {row['case_id']}: had no ledger entry; added it as pending")

            for dataset in DATASETS:
                if self._schemas.anchor_problem(dataset) is not None:
                    notes.append(self._schemas.rebuild_anchor(dataset))

            for case_id, entry in sorted(ledger.items()):  # a commit cut before its renames
                for rel in self._publish_all(entry):
                    notes.append(f"case {case_id}: published committed {rel}")

            orphans: set[str] = set()
            for info in files:
                rel = self._files.rel(info.path).split("/")
                if len(rel) != 3:
                    continue
                if rel[0] in COMMITTED and partition_case(rel[1]) is not None:
                    case_id, m = partition_case(rel[1]), PART_RE.match(rel[2]) or STAGED_RE.match(rel[2])
                elif rel[0] == CHECKPOINTS:
                    case_id, m = rel[1], CKPT_RE.match(rel[2])
                elif rel[0] == COMPACT and partition_case(rel[1]) is not None:
                    case_id, m = partition_case(rel[1]), COMPACT_RE.match(rel[2])
                else:
                    continue
                entry = ledger.get(case_id)
                if entry is None:
                    orphans.add(case_id)
                    continue
                if m is None or not self._files.exists(info.path):
                    continue
                seq = int(m.group(1))
                if seq > entry.commit_seq:
                    self._files.delete(info.path)
                    notes.append(
                        f"case {case_id}: deleted uncommitted {'/'.join(rel)} (ledger is at commit {entry.commit_seq})"
                    )
                elif rel[0] == CHECKPOINTS and "/".join(rel) != entry.checkpoint and "/".join(rel) not in {
                    g.get("path") for g in entry.checkpoints
                }:
                    self._files.delete(info.path)
                    notes.append(f"case {case_id}: deleted superseded checkpoint {'/'.join(rel)}")

            for case_id, entry in sorted(ledger.items()):
                found = self._first_damage(entry)
                if found is not None:
                    entry, note = self._rollback(entry, *found)
                    ledger[case_id] = entry
                    notes.append(note)
                if entry.checkpoint is not None and not self._files.exists(self._files.path(entry.checkpoint)):
                    notes.append(f"case {case_id}: WARNING the committed checkpoint {entry.checkpoint} is missing")
                if entry.state == "running":
                    self._put_entry(dataclasses.replace(entry, state="pending"))
                    notes.append(f"case {case_id}: was running when the driver stopped; set back to pending")
            for case_id in sorted(orphans):
                notes.append(f"case {case_id}: has files but no ledger entry (left in place)")
        return notes
