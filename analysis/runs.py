"""The runs in a folder, one line each (`bplab runs [DIR]`): suite, created, case states, wall time.

Reads only the manifest, the ledger and the cases table of each run folder (through
analysis.rundir); a damaged or partial folder gives one line saying what is wrong, never an
exception.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from analysis.rundir import ENDED, RunDir, StorageError, is_uri, subfolders
from analysis.rundir.liveness import NO_MANIFEST, display_state, driver_liveness, not_a_run_message, resume_command, when
from workers.errors import one_line
from workers.text import duration

STATE_ORDER = ("done", "running", "interrupted", "pending", "failed", "diverged")


def describe_run(folder: str | os.PathLike) -> dict:
    """{run, suite, created, states (Counter), wall_seconds, problem, note}: problem is None for a
    readable run, else one line (not a run, damaged manifest, unreadable ledger entries); note
    is None unless the run is unfinished with no driver alive (then its cases started and not
    finished count as interrupted, see analysis.rundir.liveness) and says how to continue it."""
    folder = os.fspath(folder)
    name = folder.partition("?")[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(folder) else Path(folder).name
    info = {"run": name, "suite": "", "created": None, "states": Counter(), "wall_seconds": None,
            "problem": None, "note": None}
    run = RunDir(folder)
    if not run.is_run():
        # a driver killed before it created the run leaves its lease: say so, and what to type
        info["problem"] = f"not a run ({NO_MANIFEST})" if run.lease_state()[0] == "gone" else not_a_run_message(run)
        return info
    try:
        manifest = run.manifest()
        run.format_version()
    except StorageError as error:
        info["problem"] = one_line(error).replace(f"{run.location}: ", "")
        return info
    info["suite"] = str(manifest.get("suite", "?"))
    info["created"] = run.created_at()
    try:
        entries, damaged = run.scan_ledger()
    except (OSError, ValueError) as error:
        entries, damaged = {}, []
        info["problem"] = f"unreadable ledger ({type(error).__name__})"
    updates = [e.updated_at for e in entries.values() if isinstance(e.updated_at, (int, float)) and e.updated_at > 0]
    last_update = max(updates, default=None)
    liveness = driver_liveness(run, [last_update] if last_update else [])
    for entry in entries.values():
        info["states"][display_state(entry, liveness)] += 1
    unfinished = sum(n for s, n in info["states"].items() if s not in ENDED)
    if unfinished and not liveness.alive:
        info["note"] = f"no driver since {when(liveness.last_seen)}: {resume_command(str(folder))}"
    try:  # cases without a ledger entry yet
        missing = len(set(run.case_ids()) - set(entries) - set(damaged))
        if missing:
            info["states"]["no ledger"] += missing
    except StorageError as error:  # a damaged or missing cases table is reported, not raised
        if run.has_cases():
            info["problem"] = one_line(error).replace(f"{run.location}/", "").split(";")[0]
        elif not entries and not damaged:
            info["problem"] = "partial run (no cases table, no ledger)"
    if damaged:
        info["problem"] = f"{len(damaged)} unreadable ledger entr{'y' if len(damaged) == 1 else 'ies'}"
    if info["created"] is not None and last_update is not None:
        info["wall_seconds"] = max(0.0, last_update - info["created"])
    return info


def list_runs(folder: str | os.PathLike = "runs") -> list[dict]:
    """describe_run for every sub-folder of `folder` (a path or a pyarrow.fs URI), oldest first
    (by creation, then name); StorageError if `folder` is not a folder."""
    locations = subfolders(folder)
    if locations is None:
        raise StorageError(f"{os.fspath(folder)} is not a folder")
    infos = [describe_run(location) for location in locations]
    return sorted(infos, key=lambda i: (i["created"] is None, i["created"] or 0.0, i["run"]))


def format_runs(infos: list[dict]) -> str:
    """One line per run: name, suite, created (UTC), case states, wall time; a problem instead
    of the numbers it spoils."""
    if not infos:
        return "no runs"
    width = max(12, *(len(i["run"]) for i in infos))
    suite_width = max(8, *(len(i["suite"]) for i in infos))
    lines = [f"{'run':<{width}}  {'suite':<{suite_width}}  {'created (UTC)':<19}  {'wall':>8}  cases"]
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info["created"])) if info["created"] else "-"
        wall = duration(info["wall_seconds"]) if info["wall_seconds"] is not None else "-"
        states = info["states"]
        ordered = [s for s in STATE_ORDER if states[s]] + sorted(s for s in states if s not in STATE_ORDER)
        counts = ", ".join(f"{states[s]} {s}" for s in ordered) or "none"
        if info.get("note"):
            counts += f"; {info['note']}"
        line = f"{info['run']:<{width}}  {info['suite']:<{suite_width}}  {created:<19}  {wall:>8}  {counts}"
        if info["problem"]:
            line = (f"{info['run']:<{width}}  {info['suite']:<{suite_width}}  {created:<19}  {wall:>8}  "
                    f"{counts if states else ''}{'; ' if states else ''}{info['problem']}")
        lines.append(line.rstrip())
    return "\n".join(lines)
