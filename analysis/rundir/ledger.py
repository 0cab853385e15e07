"""The ledger: one JSON entry per case (``ledger/<case_id>.json``) and its backup copy.

Each write puts the entry, then the same bytes into ``ledger/.<case_id>.json.bak``, so one of
the two always holds a whole entry; a reader that finds the entry damaged reads the backup.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from analysis.rundir.errors import StorageError
from analysis.rundir.files import Files
from analysis.rundir.layout import NAME_RE, TMP_MARK, backup_rel, entry_rel
from workers.errors import one_line

CASE_STATES = ("pending", "running", "done", "failed", "diverged")
#: States a case never leaves: its result is in (diverged is a result, not a failure).
FINISHED = ("done", "diverged")
#: States in which a case is neither running nor waiting to run: finished, or failed (a resume runs
#: a failed case again); any other state with no driver alive is an interrupted case.
ENDED = ("done", "diverged", "failed")
FAILURE_CLASSES = ("oom", "node_lost", "worker_died", "diverged", "bad_settings", "bug", "interrupted", "storage")


@dataclass
class LedgerEntry:
    """The state of one case, stored as ``ledger/<case_id>.json``.

    ``commit_seq`` counts the commits made (0 = nothing committed); parts and checkpoints with
    a higher sequence number than it are not committed. ``checkpoint`` is the run-relative
    path of the latest committed checkpoint.
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
    # the commit record: {dataset: {str(seq): rows}} of every committed part
    parts: dict = field(default_factory=dict)
    # the kept checkpoints, newest first (at most two): {commit_seq, path, sha256, epoch, step, latest}
    checkpoints: list = field(default_factory=list)
    # the workers it lost, oldest first: {at, node_id, node, reason_class, settled, settled_at, attempt,
    # counted, step, commit_seq, resumed_at}; reason_class is node_lost once the GCS has declared the node
    # dead, settled_at when it did (the time of the loss itself if the node was already dead then)
    losses: list = field(default_factory=list)

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
        check_name(self.case_id, "case id")
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
        if not isinstance(self.losses, list) or not all(isinstance(loss, dict) for loss in self.losses):
            raise StorageError(f"case {self.case_id}: losses must be a list of dicts")

    def committed_seqs(self, dataset: str) -> dict[int, int]:
        """{commit sequence number: rows} of the dataset's committed parts."""
        return {int(seq): int(rows) for seq, rows in self.parts.get(dataset, {}).items() if int(seq) <= self.commit_seq}


def check_name(value: Any, what: str) -> None:
    """StorageError unless ``value`` is a name the run directory accepts (case ids, phases)."""
    if not isinstance(value, str) or not NAME_RE.match(value) or TMP_MARK in value:
        raise StorageError(f"bad {what} {value!r}: use letters, digits, '_', '.', '-' and start with a letter or digit")


def generation(entry: LedgerEntry, seq: int, path: str, sha256: str | None) -> dict:
    """A kept checkpoint's record in ``LedgerEntry.checkpoints``."""
    return {"commit_seq": seq, "path": path, "sha256": sha256, "epoch": entry.epoch, "step": entry.step,
            "latest": copy.deepcopy(entry.latest)}


def _parse(files: Files, path: str) -> LedgerEntry:
    data = files.read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    entry = LedgerEntry.from_dict(data)
    entry.validate()
    return entry


def read_entry(files: Files, case_id: str, location: str) -> tuple[LedgerEntry | None, bool]:
    """(the case's entry or None if it has none, True if it was read from the backup copy).

    StorageError (one line, naming the file and what to do) if entry and backup are damaged."""
    try:
        entry, restored = _parse(files, files.path(entry_rel(case_id))), False
    except FileNotFoundError:
        return None, False
    except (ValueError, TypeError, StorageError) as exc:
        try:
            entry, restored = _parse(files, files.path(backup_rel(case_id))), True
            if entry.case_id != case_id:
                raise ValueError("it holds another case's entry")
        except (FileNotFoundError, ValueError, TypeError, StorageError):
            raise StorageError(
                f"{location}/{entry_rel(case_id)} is damaged ({one_line(exc)[:100]}) and has no intact backup; "
                f"delete it and run `bplab run --resume {location}` to run case {case_id} again from the start"
            ) from None
    if entry.case_id != case_id:
        raise StorageError(f"{location}: {entry_rel(case_id)} holds the entry of case {entry.case_id}")
    return entry, restored
