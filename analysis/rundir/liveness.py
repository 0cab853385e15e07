"""Is a driver alive for a run, and what to show of a case when none is.

The ledger says what a driver last wrote: a case whose driver was killed stays ``running``
in it for ever. ``RUN/driver.lock`` says whether that driver is still there (see
``RunDir.take_lease``): its holder's process is gone (same host) or its heartbeat is older
than the lease's staleness limit (another host), or the lock is gone while cases are left
unfinished. `bplab status`, `bplab runs` and `bplab report` read both through
:func:`driver_liveness` and show such cases as ``interrupted`` (:func:`display_state`), with
when the driver was last seen and the command that continues the run (:func:`interrupted_line`).

A driver killed in its first seconds leaves a folder holding only ``driver.lock``: the run
was never created (its manifest is written last). :func:`not_a_run_message` says so, and
gives the command that starts it again, from the suite and options the driver recorded in
its lease.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from analysis.rundir.layout import LOCK, MANIFEST
from analysis.rundir.ledger import ENDED
from workers.text import duration

#: The states a case is shown in: the ledger's, and ``interrupted`` (started, not finished, no driver alive).
INTERRUPTED = "interrupted"
#: Why a folder is not a run, in a few words.
NO_MANIFEST = f"no {MANIFEST}"


@dataclass(frozen=True)
class Liveness:
    """Whether a driver holds a run, and when one was last seen."""

    alive: bool
    last_seen: float | None = None  # unix seconds: the last heartbeat or ledger write, None if unknown
    holder: dict = field(default_factory=dict)  # the lease record (host, pid, heartbeat, ...); {} if none

    def who(self) -> str:
        """'pid 123 on host' of the lease's holder, or 'its driver' when the lease is gone."""
        if self.holder.get("pid") is not None:
            return f"pid {self.holder.get('pid')} on {self.holder.get('host', '?')}"
        return "its driver"


def driver_liveness(run, ledger_times: list[float] = ()) -> Liveness:
    """Read ``RUN/driver.lock``: alive (a live lease) or not, and when a driver was last seen:
    the later of the lease's heartbeat (its file's time when the record is torn) and the
    latest of ``ledger_times`` (the ledger entries' ``updated_at``)."""
    state, holder = run.lease_state()
    seen = [t for t in ledger_times if isinstance(t, (int, float)) and t > 0]
    try:
        seen.append(float(holder["heartbeat"]))
    except (KeyError, TypeError, ValueError):
        if state != "gone":  # a torn record: the lock file's own time
            try:
                info = run.filesystem.get_file_info(run.path(LOCK))
                if info.mtime is not None:
                    seen.append(info.mtime.timestamp())
            except OSError:
                pass
    return Liveness(state == "live", max(seen) if seen else None, dict(holder))


def display_state(entry: Any, liveness: Liveness) -> str:
    """The state to show for a ledger entry (a LedgerEntry or its JSON dict).

    The ledger's own state, except that with no live driver a case that was started and not
    finished (``running``, or ``pending`` after an attempt or a Ctrl-C) is ``interrupted``;
    a case never started stays ``pending``."""
    get = entry.get if isinstance(entry, Mapping) else lambda name, default=None: getattr(entry, name, default)
    state = str(get("state", "pending"))
    if liveness.alive or state in ENDED:
        return state
    try:
        attempts = int(get("attempts", 0) or 0)
    except (TypeError, ValueError):
        attempts = 0
    if state == "running" or attempts > 0 or get("reason_class") == INTERRUPTED:
        return INTERRUPTED
    return state


def when(moment: float | None, now: float | None = None) -> str:
    """'2026-12-02 07:40:12 UTC (3m05s ago)', or 'at an unknown time'."""
    if moment is None:
        return "at an unknown time"
    ago = max(0.0, (time.time() if now is None else now) - moment)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(moment))} UTC ({duration(ago)} ago)"


def resume_command(location: str) -> str:
    return f"bplab run --resume {shlex.quote(str(location))}"


def interrupted_line(location: str, liveness: Liveness, unfinished: int) -> str | None:
    """One line for a run left unfinished with no driver alive (None otherwise)."""
    if liveness.alive or not unfinished:
        return None
    return (f"interrupted: no driver holds the run ({liveness.who()} was last seen {when(liveness.last_seen)}); "
            f"{unfinished} case(s) not finished; continue with: {resume_command(location)}")


def start_command(details: Mapping, location: str) -> str | None:
    """`bplab run SUITE [--only ...] [--set ...] --out RUN` from a lease's details, None without a suite."""
    suite = details.get("suite")
    if not isinstance(suite, str) or not suite:
        return None
    words = ["bplab", "run", suite]
    only = [str(x) for x in details.get("only") or []]
    if only:
        words += ["--only", *only]
    for override in details.get("overrides") or []:
        words += ["--set", str(override)]
    words += ["--out", str(location)]
    return shlex.join(words)


def not_a_run_message(run) -> str:
    """Why ``run`` is not a run directory, in one line, and what to type.

    A folder with ``driver.lock`` and no manifest is a run whose driver was starting it: still
    alive (wait), or killed before the run was created (nothing ran; start it again, with the
    suite and options its lease recorded)."""
    location = run.location
    plain = f"{location} is not a bplab run directory (no {MANIFEST})"
    state, holder = run.lease_state()
    if state == "gone":
        import pyarrow as pa
        import pyarrow.fs as pafs

        try:
            missing = run.filesystem.get_file_info(run.root).type == pafs.FileType.NotFound
        except (OSError, pa.ArrowException):
            missing = False
        return f"{location}: no such folder (not a bplab run directory)" if missing else plain
    who = f"pid {holder.get('pid')} on {holder.get('host', '?')}" if holder.get("pid") is not None else "a driver"
    if state == "live":
        return f"{location} is being created by {who} (no {MANIFEST} yet); wait for it to start the run"
    liveness = driver_liveness(run)
    command = start_command(holder, location) or f"bplab run SUITE --out {shlex.quote(str(location))}"
    held = f"holds only {LOCK}" if _only_lease(run) else f"has {LOCK} but no {MANIFEST}"
    return (f"{location} {held}: its driver ({who}) stopped before it created the run "
            f"(last seen {when(liveness.last_seen)}), so nothing ran; start it again with: {command}")


def _only_lease(run) -> bool:
    """True if the folder holds nothing but the lease (and hidden files such as its takeover mark)."""
    import pyarrow.fs as pafs

    try:
        infos = run.filesystem.get_file_info(pafs.FileSelector(run.root, allow_not_found=True))
    except OSError:
        return False
    return all(info.base_name == LOCK or info.base_name.startswith(".") for info in infos)
