"""The driver: one actor per case, reports collected with ray.wait, commits to the run dir.

The driver is the only writer (DESIGN.md decision 1). Rows of a case are buffered until
a report carries a checkpoint, then rows + checkpoint + ledger entry are committed
together, so a case restarted from its last commit logs every step exactly once.
Only transient failures (a worker or a node lost) are retried, a bounded number of
times, from the last commit; one failed case never stops the others.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from jobs.plan import PlannedCase
from jobs.storage import LedgerEntry, RunDir
from workers.actor import classify_exception, first_line

TRANSIENT = ("worker_died", "node_lost")
TERMINAL = ("done", "diverged")
POLL_SECONDS = 1.0
LEASE_REFRESH_SECONDS = 10.0


@dataclass
class CaseState:
    planned: PlannedCase
    entry: LedgerEntry
    actor: object = None
    start_ref: object = None
    poll_ref: object = None
    rows: list = field(default_factory=list)
    layer_stats: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    started_at: float = 0.0
    steps_at_start: int = 0
    attempts_at_start: int = 0  # retries are bounded per session, not over the run's life


class Driver:
    def __init__(self, run: RunDir, planned: list[PlannedCase], data_refs: dict, *, max_retries: int = 2,
                 checkpoint_every_steps: int = 0, progress_every: float = 10.0, out=sys.stderr, lease=None):
        self.run = run
        self.data_refs = data_refs
        self.max_retries = max_retries
        self.checkpoint_every_steps = checkpoint_every_steps
        self.progress_every = progress_every
        self.out = out
        self.lease = lease  # called every LEASE_REFRESH_SECONDS: refreshes the run's driver.lock
        ledger = run.ledger()
        self.cases = {p.case_id: CaseState(p, ledger[p.case_id], attempts_at_start=ledger[p.case_id].attempts)
                      for p in planned}
        self.active: dict = {}  # ObjectRef -> (case_id, kind)
        self._remote_class = None

    # ------------------------------------------------------------------ actors
    def _runner_class(self):
        import ray

        from workers.actor import CaseRunner

        if self._remote_class is None:
            self._remote_class = ray.remote(CaseRunner)
        return self._remote_class

    def _launch(self, state: CaseState) -> None:
        p = state.planned
        resume = self.run.load_checkpoint(p.case_id) if state.entry.commit_seq else None
        actor = self._runner_class().options(num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=p.resources or None, max_restarts=0,
                                             max_task_retries=0).remote(p.case_id, p.num_cpus, p.num_gpus)
        settings_json = json.loads(json.dumps(p.case.settings.to_dict(), default=list))
        state.actor = actor
        state.rows, state.layer_stats = [], []
        state.start_ref = actor.start.remote(settings_json, self.data_refs[p.data_key], resume, self.checkpoint_every_steps)
        state.poll_ref = actor.poll.remote(POLL_SECONDS)
        self.active[state.start_ref] = (p.case_id, "start")
        self.active[state.poll_ref] = (p.case_id, "poll")
        state.entry.attempts += 1
        state.entry.state = "pending"  # waits for resources until start returns
        state.entry.node = state.entry.gpu = None  # this attempt's placement comes with start()
        state.entry.info = {k: v for k, v in state.entry.info.items() if k not in ("node_id", "pid", "gpu_ids")}
        state.entry = self.run.write_entry(state.entry)

    def _kill(self, state: CaseState) -> None:
        import ray

        for ref in (state.start_ref, state.poll_ref):
            self.active.pop(ref, None)
        if state.actor is not None:
            ray.kill(state.actor, no_restart=True)
        state.actor = state.start_ref = state.poll_ref = None

    # ------------------------------------------------------------------ the loop
    def execute(self) -> dict[str, str]:
        """Run every case not done yet; return {case_id: final state}."""
        import ray

        for state in self.cases.values():
            if state.entry.state in TERMINAL:
                continue
            if state.entry.state == "failed":  # a resumed run tries failed cases again
                state.entry.reason_class = state.entry.reason = None
            self._launch(state)
        last_view = last_lease = 0.0
        try:
            while self.active:
                ready, _ = ray.wait(list(self.active), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    if ref not in self.active:
                        continue
                    case_id, kind = self.active.pop(ref)
                    state = self.cases[case_id]
                    try:
                        self._handle(state, ref, kind)
                    except KeyboardInterrupt:
                        raise
                    except Exception as error:  # one case's trouble (e.g. storage) never stops the others
                        self._fail_case(state, error)
                now = time.monotonic()
                if self.lease is not None and now - last_lease >= LEASE_REFRESH_SECONDS:
                    self.lease()
                    last_lease = now
                if self.progress_every and now - last_view >= self.progress_every:
                    self.print_view()
                    last_view = now
        except KeyboardInterrupt:
            self._interrupt()
            raise
        self.print_view()
        return {cid: s.entry.state for cid, s in self.cases.items()}

    def _compact(self, state: CaseState) -> None:
        """One metrics file per finished case for fast loading (a cache; failure costs only speed)."""
        try:
            self.run.compact_metrics(state.planned.case_id)
        except Exception as error:
            self._say(f"{state.planned.name}: metrics not compacted ({first_line(error)})")

    def _fail_case(self, state: CaseState, error: Exception) -> None:
        from jobs.storage import StorageError

        self._kill(state)
        reason_class = "storage" if isinstance(error, (StorageError, OSError)) else "bug"
        state.entry.state, state.entry.reason_class = "failed", reason_class
        state.entry.reason = f"driver: {type(error).__name__}: {first_line(error)}"
        self._say(f"{state.planned.name}: failed ({state.entry.reason})")
        try:
            state.entry = self.run.write_entry(state.entry)
        except Exception as second:  # storage unreachable: the ledger keeps its last state, resume fixes it
            self._say(f"{state.planned.name}: could not record the failure: {first_line(second)}")

    def _handle(self, state: CaseState, ref, kind: str) -> None:
        import ray

        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # start() itself raised: not transient
            cause = getattr(error, "cause", None) or error
            self._finish(state, {"ok": False, "error_type": type(cause).__name__, "error": first_line(cause),
                                 "error_class": classify_exception(cause) if isinstance(cause, BaseException) else "bug",
                                 "traceback": str(error)[-4000:]})
            return
        except ray.exceptions.RayActorError as error:
            self._actor_lost(state, error)
            return
        except ray.exceptions.RayError as error:  # e.g. the object was lost with its node
            self._actor_lost(state, error)
            return
        if kind == "start":
            state.entry.info = result
            state.entry.node = result.get("node_ip") or result.get("hostname")
            state.entry.gpu = ",".join(result.get("gpu_ids") or []) or None
            state.entry.state = "running"
            state.started_at = time.monotonic()
            state.steps_at_start = state.entry.step
            state.entry = self.run.write_entry(state.entry)
            self._say(f"{state.planned.name}: running on {state.entry.node} gpu {state.entry.gpu or '-'} "
                      f"(attempt {state.entry.attempts}{', resumed at step %d' % state.entry.step if state.entry.commit_seq else ''})"
                      + (f"; WARNING {result['warning']}" if result.get("warning") else ""))
            return
        for report in result["reports"]:
            self._take_report(state, report)
        if result["finished"] or state.entry.state in TERMINAL:  # a committed end closes the case at once
            self._finish(state, result["outcome"] or {})
        else:
            state.poll_ref = state.actor.poll.remote(POLL_SECONDS)
            self.active[state.poll_ref] = (state.planned.case_id, "poll")

    def _take_report(self, state: CaseState, report) -> None:
        state.rows.extend(report.rows)
        state.layer_stats.extend(report.layer_stats)
        if report.progress:
            state.progress = report.progress
        if report.histograms:
            by_phase: dict = {}
            for row in report.histograms:
                by_phase.setdefault(row["phase"], []).append(row)
            for phase, rows in by_phase.items():
                self.run.write_histograms(state.planned.case_id, phase, rows)
        if report.boundary:
            self.run.write_boundary(state.planned.case_id, report.boundary)
        if report.checkpoint is not None or report.status in TERMINAL:
            entry = state.entry
            entry.epoch = int(report.progress.get("epoch", entry.epoch))
            entry.step = int(report.progress.get("step", entry.step))
            latest = {k: v for k, v in report.progress.items() if k.startswith("test_") or k == "train_accuracy"}
            entry.latest = {**entry.latest, **latest}
            if report.status == "done":
                entry.state, entry.reason_class, entry.reason = "done", None, None
            elif report.status == "diverged":
                entry.state, entry.reason_class = "diverged", "diverged"
                entry.diverged_step = report.progress.get("diverged_step")
                entry.reason = f"non-finite loss at step {entry.diverged_step}"
            state.entry = self.run.commit(state.planned.case_id, state.rows, report.checkpoint, entry, state.layer_stats)
            state.rows, state.layer_stats = [], []

    def _finish(self, state: CaseState, outcome: dict) -> None:
        self._kill(state)
        entry = state.entry
        if entry.state in TERMINAL:
            self._compact(state)
            self._say(f"{state.planned.name}: {entry.state}" + (f" ({entry.reason})" if entry.reason else ""))
            return
        if outcome.get("ok"):  # a trainer that finished normally always commits its end first
            entry.state, entry.reason_class, entry.reason = "failed", "bug", "trainer ended without a final report"
        else:
            entry.state, entry.reason_class = "failed", outcome.get("error_class", "bug")
            entry.reason = f"{outcome.get('error_type')}: {outcome.get('error')}"
            entry.info = {**entry.info, "traceback": outcome.get("traceback", "")}
        state.entry = self.run.write_entry(entry)
        self._say(f"{state.planned.name}: {entry.state}" + (f" ({entry.reason_class}: {entry.reason})" if entry.reason else ""))

    def _actor_lost(self, state: CaseState, error) -> None:
        import ray

        if state.entry.state in TERMINAL:  # died after committing its end: nothing is lost
            self._kill(state)
            return
        node_id = (state.entry.info or {}).get("node_id")
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        text = " ".join(str(error).split())
        if getattr(error, "actor_init_failed", False):
            reason_class = "bug"
        elif "out of memory" in text.lower() or "memory monitor" in text.lower() or "OutOfMemoryError" in type(error).__name__:
            reason_class = "oom"
        elif node_id and node_id not in alive:
            reason_class = "node_lost"
        else:
            reason_class = "worker_died"
        self._kill(state)
        state.rows, state.layer_stats = [], []  # uncommitted: the resumed actor regenerates them
        entry = state.entry
        entry.reason_class, entry.reason = reason_class, (text or type(error).__name__)[:1000]
        retries_used = entry.attempts - state.attempts_at_start - 1
        if reason_class in TRANSIENT and retries_used < self.max_retries:
            self._say(f"{state.planned.name}: {reason_class}; retrying from commit {entry.commit_seq} (step {entry.step})")
            state.entry = entry
            self._launch(state)
        else:
            entry.state = "failed"
            state.entry = self.run.write_entry(entry)
            self._say(f"{state.planned.name}: failed ({reason_class}, {entry.attempts} attempts)")

    def _interrupt(self) -> None:
        """Ctrl-C: stop every actor, leave the ledger resumable (running -> pending)."""
        for state in self.cases.values():
            if state.actor is None:
                continue
            self._kill(state)
            if state.entry.state in TERMINAL:
                continue
            try:
                entry = self.run.entry(state.planned.case_id)  # the ledger's own copy: a commit may have just landed
                if entry.state not in TERMINAL:
                    entry.state, entry.reason_class, entry.reason = "pending", "interrupted", "stopped by the user"
                    state.entry = self.run.write_entry(entry)
            except Exception as error:  # recover() on resume puts 'running' back to 'pending' anyway
                self._say(f"{state.planned.name}: could not mark interrupted: {first_line(error)}")
        self._say(f"interrupted: resume with  bplab run --resume {self.run.location}")

    # ------------------------------------------------------------------ the view
    def _say(self, text: str) -> None:
        print(f"[bplab {time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def print_view(self) -> None:
        print(render_view(self.cases.values()), file=self.out, flush=True)


def render_view(states) -> str:
    lines = [f"{'case':<22} {'state':<9} {'node':<16} {'gpu':<5} {'epoch':>7} {'step':>13} {'test acc':>9} {'ETA':>8}"]
    for s in states:
        e, p = s.entry, s.progress
        epochs = s.planned.case.settings.epochs
        step = p.get("step", e.step)
        total = s.planned.steps_total
        eta = "-"
        if e.state == "running" and s.started_at and step > s.steps_at_start:
            rate = (step - s.steps_at_start) / (time.monotonic() - s.started_at)
            eta = _duration((total - step) / rate) if rate > 0 else "-"
        accuracy = p.get("test_accuracy", e.latest.get("test_accuracy"))
        lines.append(f"{s.planned.name:<22} {e.state:<9} {(e.node or '-'):<16} {(e.gpu or '-'):<5} "
                     f"{p.get('epoch', e.epoch):>3}/{epochs:<3} {step:>6}/{total:<6} "
                     f"{(f'{accuracy:.4f}' if accuracy is not None else '-'):>9} {eta:>8}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
