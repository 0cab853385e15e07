"""The runs in a folder, one line each (`bplab runs [DIR]`): suite, created, case states, wall time.

Reads only manifest.json, the ledger and cases.parquet of each run folder; a damaged or
partial folder gives one line saying what is wrong, never an exception.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

STATE_ORDER = ("done", "running", "interrupted", "pending", "failed", "diverged")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe_run(folder: str | os.PathLike) -> dict:
    """{run, suite, created, states (Counter), wall_seconds, problem, note}: problem is None for a
    readable run, else one line (not a run, damaged manifest, unreadable ledger entries); note
    is None unless the run is unfinished with no driver alive (then its cases started and not
    finished count as interrupted, see jobs.liveness) and says how to continue it."""
    from jobs.liveness import display_state, driver_liveness, not_a_run_message, resume_command, when
    from jobs.storage import LOCK, RunDir

    folder = Path(folder)
    info = {"run": folder.name, "suite": "", "created": None, "states": Counter(), "wall_seconds": None,
            "problem": None, "note": None}
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        # a driver killed before it created the run leaves its lease: say so, and what to type
        info["problem"] = not_a_run_message(RunDir(str(folder))) if (folder / LOCK).exists() else \
            "not a run (no manifest.json)"
        return info
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        info["problem"] = f"damaged manifest.json ({' '.join(str(error).split())})"
        return info
    info["suite"] = str(manifest.get("suite", "?"))
    created = manifest.get("created_at")
    if isinstance(created, str):  # an ISO date (older manifests, hand-made runs)
        try:
            from datetime import datetime, timezone

            moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
            created = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
        except ValueError:
            created = None
    info["created"] = float(created) if isinstance(created, (int, float)) else None
    bad, last_update = 0, None
    known = set()
    entries = []
    ledger = folder / "ledger"
    for path in sorted(ledger.glob("*.json")) if ledger.is_dir() else []:
        if path.name.startswith((".", "_")):
            continue
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            state = str(entry["state"])
        except (OSError, ValueError, KeyError, TypeError):
            bad += 1
            continue
        known.add(path.stem)
        entries.append(entry if isinstance(entry, dict) else {"state": state})
        updated = entry.get("updated_at")
        if isinstance(updated, (int, float)) and updated > 0:
            last_update = updated if last_update is None else max(last_update, updated)
    liveness = driver_liveness(RunDir(str(folder)), [last_update] if last_update else [])
    for entry in entries:
        info["states"][display_state(entry, liveness)] += 1
    unfinished = sum(n for s, n in info["states"].items() if s not in ("done", "diverged", "failed"))
    if unfinished and not liveness.alive:
        info["note"] = f"no driver since {when(liveness.last_seen)}: {resume_command(str(folder))}"
    try:  # cases without a ledger entry yet
        import pyarrow.parquet as pq

        if (folder / "cases.parquet").is_file():
            ids = pq.read_table(folder / "cases.parquet", columns=["case_id"]).column("case_id").to_pylist()
            missing = len(set(map(str, ids)) - known)
            if missing:
                info["states"]["no ledger"] += missing
        elif not known:
            info["problem"] = "partial run (no cases.parquet, no ledger)"
    except Exception as error:  # a damaged cases table is reported, not raised
        info["problem"] = f"damaged cases.parquet ({type(error).__name__})"
    if bad:
        info["problem"] = f"{bad} unreadable ledger entr{'y' if bad == 1 else 'ies'}"
    if info["created"] is not None and last_update is not None:
        info["wall_seconds"] = max(0.0, last_update - info["created"])
    return info


def list_runs(folder: str | os.PathLike = "runs") -> list[dict]:
    """describe_run for every sub-folder of `folder`, oldest first (by creation, then name)."""
    folder = Path(folder)
    infos = [describe_run(path) for path in sorted(folder.iterdir()) if path.is_dir()]
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
        wall = _duration(info["wall_seconds"]) if info["wall_seconds"] is not None else "-"
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
