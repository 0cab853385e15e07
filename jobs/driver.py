# Long module: the driver's one event loop and every case transition it handles (launch, report, commit, lost worker, retry, finish), in the order they happen.
"""The driver: a pool of long-lived workers, reports collected with ray.wait, commits to the run dir.

The driver is the only writer of the run directory (README, Guarantees). It keeps one
worker per resource slot that fits (README, Design notes: workers are reused) and hands
each free worker a pending case, preferring one of a structure the worker has traced
(Driver._pick).
Rows of a case are buffered until a report carries a checkpoint, then rows + checkpoint +
ledger entry are committed together, so a case restarted from its last commit logs every
step exactly once. A worker that dies is replaced and only its case is retried (a worker
or a node lost: transient), a bounded number of times, from the last commit; a case that
fails gets a fresh worker for the next case; one failed case never stops the others.

A lost node (a preempted spot instance) costs each case on it one retry. The GCS takes its
health-check timeout (~15 s by default) to declare a dead node dead and until then would
place a replacement back on it, so the driver asks the node's raylet itself: a node whose
raylet no longer answers is avoided by every new worker (Ray's ``ray.io/node-id`` label)
until the GCS has settled what became of it, and each loss is classified again then
(``node_lost`` once the GCS declares the node dead), with the node id and the time kept in
the case's ledger entry. An actor lost before its case started (creation cancelled with its
node, unschedulable, died while setting up) is not an attempt: it uses no retry.
"""

from __future__ import annotations

import errno
import itertools
import json
import socket
import sys
import time
from dataclasses import dataclass, field

from analysis.rundir import FINISHED, LedgerEntry, RunDir
from jobs.plan import PlannedCase
from jobs.view import LiveView, shown_epoch
from workers.actor import classify_exception, first_line
from workers.columns import add_rows, gather
from workers.logs import CaseLogs
from workers.steps import STEPS_KEPT
from workers.text import duration

TRANSIENT = ("worker_died", "node_lost")
POLL_SECONDS = 1.0
LEASE_REFRESH_SECONDS = 10.0
INTERRUPT_COMMIT_SECONDS = 15.0  # Ctrl-C: how long running cases get to commit before they are stopped
NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its own id
NODE_SETTLE_SECONDS = 60.0  # a suspect node still alive in the GCS after this long survived (its health check: ~15 s)
NODE_CHECK_SECONDS = 1.0  # how often the GCS is asked about suspect nodes
PROBE_SECONDS = 2.0  # a raylet silent this long does not answer
PICK_WINDOW = 1000  # queued cases a free worker looks through for one of a structure it holds (Driver._pick)
MAX_UNSTARTED = 10  # actors a case may lose before it starts (not attempts), per session: a broken cluster ends


@dataclass
class WorkerSlot:
    """One live worker actor and what it is doing."""

    actor: object
    num_cpus: float
    num_gpus: float
    case_id: str | None = None  # the case it runs, None when idle
    cases: int = 0  # cases it has finished
    memory_mb: float = 0.0  # resident memory at its last report
    node_id: str | None = None  # where it runs, known once its first case started
    structures: list = field(default_factory=list)  # the structures of its last cases, most recent last (see Driver._pick)


@dataclass
class CaseState:
    planned: PlannedCase
    entry: LedgerEntry
    worker: WorkerSlot | None = None
    start_ref: object = None
    poll_ref: object = None
    rows: list = field(default_factory=list)  # uncommitted rows: workers.columns.Rows chunks (or row dicts)
    layer_stats: list = field(default_factory=list)
    alignment: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    started_at: float = 0.0
    steps_at_start: int = 0
    attempts_at_start: int = 0  # retries are bounded per session, not over the run's life
    unstarted: int = 0  # actors lost before this case started on them (no attempt), this session
    requeued: bool = False  # put back at the queue's head (a retry, or its worker lost before it started)


class Driver:
    def __init__(self, run: RunDir, planned: list[PlannedCase], data_refs: dict, *, max_retries: int = 2,
                 checkpoint_every_steps: int = 0, commit_every: float = 30.0, slots: int = 0,
                 fresh_worker_per_case: bool = False, worker_max_cases: int = 50, worker_max_memory_mb: float = 0.0,
                 progress_every: float = 10.0, out=sys.stderr, lease=None, workers: list | None = None):
        self.run = run
        self.data_refs = data_refs
        self.max_retries = max_retries
        self.checkpoint_every_steps = checkpoint_every_steps
        self.commit_every = commit_every
        self.slots = max(1, slots or len(planned))  # workers at most: what fits the cluster
        self.fresh_worker_per_case = fresh_worker_per_case
        self.worker_max_cases = worker_max_cases
        self.worker_max_memory_mb = worker_max_memory_mb
        self.progress_every = progress_every
        self.out = out
        self.lease = lease  # called every LEASE_REFRESH_SECONDS: refreshes the run's lease
        ledger = run.ledger()
        self.cases = {p.case_id: CaseState(p, ledger[p.case_id], attempts_at_start=ledger[p.case_id].attempts)
                      for p in planned}
        self.structures = {p.case_id: case_structure(p) for p in planned}
        self.queue: list[CaseState] = []  # cases waiting for a worker, in order
        self.storage_broken: str | None = None  # set by the first storage error: no new case is handed out
        self.workers: list[WorkerSlot] = list(workers or [])  # started early: see start_workers
        self.active: dict = {}  # ObjectRef -> (case_id, kind)
        self.interrupting = False
        self._remote_class = None
        self.view = LiveView(out, summary_every=progress_every)  # the terminal: summary + running cases
        # nodes the driver believes gone and the GCS has not settled yet: node_id -> {since, avoid}
        self.suspects: dict[str, dict] = {}
        self.last_node_check = 0.0
        self.logs = CaseLogs(run)  # the cases' own output -> RUN/logs/<case>.log

    # ------------------------------------------------------------------ workers
    def _worker_class(self):
        import ray

        from workers.actor import Worker

        if self._remote_class is None:
            self._remote_class = ray.remote(Worker)
        return self._remote_class

    def _new_worker(self, num_cpus: float, num_gpus: float, resources: dict | None = None) -> WorkerSlot:
        worker = new_worker(self._worker_class(), num_cpus, num_gpus, resources, placement_options(self._avoided()))
        self.workers.append(worker)
        return worker

    def _release(self, worker: WorkerSlot) -> None:
        """Stop a worker (its process ends; a GPU's memory goes back to the device)."""
        import ray

        if worker in self.workers:
            self.workers.remove(worker)
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:  # already gone with its node
            pass

    def _dispatch(self) -> None:
        """Hand each free worker a pending case (Driver._pick); start workers while more fit."""
        while self.queue and not self.storage_broken:  # a broken run directory: a new case would fail at its first commit
            state = self.queue[0]
            p = state.planned
            worker = next((w for w in self.workers if w.case_id is None and (w.num_cpus, w.num_gpus) == (p.num_cpus, p.num_gpus)), None)
            if worker is None:
                idle_other = next((w for w in self.workers if w.case_id is None), None)
                if idle_other is not None:  # a slot of another shape: make room
                    self._release(idle_other)
                if len(self.workers) >= self.slots:
                    break
                worker = self._new_worker(p.num_cpus, p.num_gpus, p.resources)
            state = self._pick(worker)
            del self.queue[next(i for i, queued in enumerate(self.queue) if queued is state)]
            self._launch(state, worker)
        if not self.queue:  # nothing left to hand out: idle workers give their resources back
            for worker in [w for w in self.workers if w.case_id is None]:
                self._release(worker)

    def _pick(self, worker: WorkerSlot) -> CaseState:
        """The queued case `worker` runs next. A worker keeps the traced (and XLA-compiled)
        steps of its last structures (workers.steps.StepCache), which cost seconds to build
        again, so among the first PICK_WINDOW queued cases of its slot's shape it takes, in
        this order: one of a structure it has run (the most recent first); one of a structure
        no other worker has run or runs; the first. A case put back at the queue's head (a
        retry, or one whose worker was lost before it started) goes first. Which worker runs a
        case never changes what the case computes."""
        head = self.queue[0]
        if head.requeued:  # as soon as possible
            return head
        shape = (worker.num_cpus, worker.num_gpus)
        window = [state for state in itertools.islice(self.queue, PICK_WINDOW)
                  if (state.planned.num_cpus, state.planned.num_gpus) == shape]
        if not window:
            return head
        first = {}
        for state in window:
            first.setdefault(self.structures[state.planned.case_id], state)
        for structure in reversed(worker.structures):
            if structure in first:
                return first[structure]
        elsewhere = {s for other in self.workers if other is not worker for s in other.structures}
        return next((state for structure, state in first.items() if structure not in elsewhere), window[0])

    def _launch(self, state: CaseState, worker: WorkerSlot) -> None:
        p = state.planned
        state.requeued = False
        structure = self.structures[p.case_id]
        if structure in worker.structures:
            worker.structures.remove(structure)
        worker.structures = [*worker.structures, structure][-STEPS_KEPT:]
        resume = self.run.load_checkpoint(p.case_id) if state.entry.commit_seq else None
        settings_json = json.loads(json.dumps(p.case.settings.to_dict(), default=list))
        worker.case_id = p.case_id
        state.worker = worker
        state.rows, state.layer_stats, state.alignment = [], [], []
        state.start_ref = worker.actor.start.remote(p.case_id, settings_json, self.data_refs[p.data_key], resume,
                                                    self.checkpoint_every_steps, self.commit_every)
        state.poll_ref = worker.actor.poll.remote(POLL_SECONDS)
        self.active[state.start_ref] = (p.case_id, "start")
        self.active[state.poll_ref] = (p.case_id, "poll")
        state.entry.state = "pending"  # waits for its worker until start returns; an attempt once it has
        state.entry.node = state.entry.gpu = None  # this attempt's placement comes with start()
        state.entry.info = {k: v for k, v in state.entry.info.items() if k not in ("node_id", "pid", "gpu_ids")}
        state.entry = self.run.write_entry(state.entry)

    def _detach(self, state: CaseState, reusable: bool) -> None:
        """The case no longer runs on its worker: keep the worker for the next case, or stop it."""
        for ref in (state.start_ref, state.poll_ref):
            self.active.pop(ref, None)
        state.start_ref = state.poll_ref = None
        worker, state.worker = state.worker, None
        if worker is None or worker not in self.workers:
            return
        worker.case_id = None
        worker.cases += 1
        over_memory = self.worker_max_memory_mb and worker.memory_mb > self.worker_max_memory_mb
        if (not reusable or self.fresh_worker_per_case or worker.cases >= self.worker_max_cases or over_memory
                or self.interrupting):
            self._release(worker)

    def _kill(self, state: CaseState) -> None:
        self._detach(state, reusable=False)

    # ------------------------------------------------------------------ the loop
    def execute(self) -> dict[str, str]:
        """Run every case not done yet; return {case_id: final state}."""
        import ray

        for state in self.cases.values():
            if state.entry.state in FINISHED:
                continue
            if state.entry.state == "failed":  # a resumed run tries failed cases again
                state.entry.reason_class = state.entry.reason = None
            self.queue.append(state)
        last_lease = 0.0
        try:
            self._dispatch()
            while self.active or (self.queue and not self.storage_broken):
                ready, _ = ray.wait(list(self.active), num_returns=1, timeout=POLL_SECONDS) if self.active else ([], [])
                for ref in ready:
                    self._take(ref)
                self._settle_nodes()
                self._dispatch()
                now = time.monotonic()
                if self.lease is not None and now - last_lease >= LEASE_REFRESH_SECONDS:
                    self.lease()
                    last_lease = now
                if self.progress_every:
                    self.view.update(self.cases.values())
            self._wait_for_nodes()
        except KeyboardInterrupt:
            self._interrupt()
            raise
        finally:
            for worker in list(self.workers):
                self._release(worker)
            self.view.update(self.cases.values())
            self.view.close()
        return {cid: s.entry.state for cid, s in self.cases.items()}

    def _take(self, ref) -> None:
        if ref not in self.active:
            return
        case_id, kind = self.active.pop(ref)
        state = self.cases[case_id]
        try:
            self._handle(state, ref, kind)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # one case's trouble (e.g. storage) never stops the others
            self._fail_case(state, error)

    def _compact(self, state: CaseState) -> None:
        """One metrics file per finished case for fast loading (a cache; failure costs only speed)."""
        try:
            self.run.compact_metrics(state.planned.case_id)
        except Exception as error:
            self._say(f"{state.planned.name}: metrics not compacted ({first_line(error)})")

    def _fail_case(self, state: CaseState, error: Exception) -> None:
        from analysis.rundir import StorageError

        self._kill(state)
        reason_class = "storage" if isinstance(error, (StorageError, OSError)) else "bug"
        state.entry.state, state.entry.reason_class = "failed", reason_class
        state.entry.reason = f"driver: {type(error).__name__}: {first_line(error)}"
        self._say(f"{state.planned.name}: failed ({state.entry.reason})")
        try:
            state.entry = self.run.write_entry(state.entry)
        except Exception as second:  # storage unreachable: the ledger keeps its last state, resume fixes it
            self._say(f"{state.planned.name}: could not record the failure: {first_line(second)}")
        if self.storage_broken is None and storage_is_broken(error):
            self._stop_launching(f"{type(error).__name__}: {first_line(error)}")

    # ------------------------------------------------------------------ a broken run directory
    def _stop_launching(self, reason: str) -> None:
        """After a storage error (no space, no permission): hand out no new case, say so once.

        Queued cases keep their pending ledger entries, so a resume runs them; running cases go
        on and commit if they can."""
        self.storage_broken = reason
        self._say(f"storage error ({reason}): no new case is started ({len(self.queue)} withdrawn); "
                  f"fix it, then  bplab run --resume {self.run.location}")

    def _handle(self, state: CaseState, ref, kind: str) -> None:
        import ray

        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # start() itself raised: not transient
            if kind == "start":
                state.entry.attempts += 1  # the case's own code ran and failed
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
        if isinstance(result, dict) and result.get("log"):  # the case's own output, shipped by the actor
            self.logs.append(state.planned.name, result.pop("log"))
        if kind == "start":
            self._record_start(state, result)
            state.entry = self.run.write_entry(state.entry)
            self._say(f"{state.planned.name}: running on {placement(state.entry.node, state.planned, result)} "
                      f"(attempt {state.entry.attempts}, worker pid {result.get('pid')} case {result.get('worker_cases')}"
                      f"{', resumed at step %d' % state.entry.step if state.entry.commit_seq else ''})"
                      + (f"; WARNING {result['warning']}" if result.get("warning") else ""))
            return
        if state.worker is not None:
            state.worker.memory_mb = result.get("memory_mb", 0.0)
        for report in result["reports"]:
            self._take_report(state, report)
        if result["finished"] or state.entry.state in FINISHED:  # a committed end closes the case at once
            self._finish(state, result["outcome"] or {})
        else:
            state.poll_ref = state.worker.actor.poll.remote(POLL_SECONDS)
            self.active[state.poll_ref] = (state.planned.case_id, "poll")

    def _record_start(self, state: CaseState, result: dict) -> None:
        """start() returned: the case runs on its worker, an attempt (written by the caller)."""
        entry = state.entry
        entry.attempts += 1
        entry.info = {**{k: v for k, v in entry.info.items() if k != "traceback"}, **result}
        entry.node = result.get("node_ip") or result.get("hostname")
        entry.gpu = ",".join(result.get("gpu_ids") or []) or None
        entry.state = "running"
        if entry.losses and entry.losses[-1].get("resumed_at") is None:  # back at work after a loss
            entry.losses[-1]["resumed_at"] = time.time()
        if state.worker is not None:
            state.worker.node_id = result.get("node_id")
        state.started_at = time.monotonic()
        state.steps_at_start = entry.step

    def _take_report(self, state: CaseState, report) -> None:
        if report.info:  # the trainer's description (model, units, batch, TF version): kept with the case
            state.entry.info = {**state.entry.info, "trainer": report.info}  # written by the next commit
        add_rows(state.rows, report.rows)  # a Rows (columns) per report, kept as columns
        state.layer_stats.extend(report.layer_stats)
        state.alignment.extend(report.alignment)
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
        if report.checkpoint is not None or report.status in FINISHED:
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
            state.entry = self.run.commit(state.planned.case_id, entry, checkpoint=report.checkpoint,
                                          tables={"metrics": gather(state.rows), "layer_stats": state.layer_stats,
                                                  "alignment": state.alignment})
            state.rows, state.layer_stats, state.alignment = [], [], []

    def _finish(self, state: CaseState, outcome: dict) -> None:
        entry = state.entry
        if entry.state in FINISHED:
            self._detach(state, reusable=True)
            self._compact(state)
            self._say(f"{state.planned.name}: {entry.state}" + (f" ({entry.reason})" if entry.reason else ""))
            return
        self._kill(state)  # the next case gets a fresh worker: a failure never poisons it
        if outcome.get("ok"):  # a trainer that finished normally always commits its end first
            entry.state, entry.reason_class, entry.reason = "failed", "bug", "trainer ended without a final report"
        else:
            entry.state, entry.reason_class = "failed", outcome.get("error_class", "bug")
            entry.reason = f"{outcome.get('error_type')}: {outcome.get('error')}"
            entry.info = {**entry.info, "traceback": outcome.get("traceback", "")}
            self.logs.append(state.planned.name, outcome.get("traceback", ""))
        state.entry = self.run.write_entry(entry)
        self._say(f"{state.planned.name}: {entry.state}" + (f" ({entry.reason_class}: {entry.reason})" if entry.reason else ""))
        self._say_log_tail(state)

    def _actor_lost(self, state: CaseState, error) -> None:
        """The case's worker is gone: classify the loss, then retry the case or fail it."""
        worker = state.worker
        if worker is not None and worker in self.workers:
            self.workers.remove(worker)  # dead: never handed another case
        if state.entry.state in FINISHED:  # died after committing its end: nothing is lost
            self._kill(state)
            return
        started = self._case_started(state)
        node_id = (state.entry.info or {}).get("node_id") if started else (worker.node_id if worker else None)
        node_state = self._node_state(node_id)
        reason_class = classify_loss(error, node_state)
        self._kill(state)
        state.rows, state.layer_stats, state.alignment = [], [], []  # uncommitted: the resumed case regenerates them
        entry = state.entry
        text = " ".join(str(error).split())
        entry.reason_class, entry.reason = reason_class, (text or type(error).__name__)[:1000]
        if reason_class in TRANSIENT and node_id:
            now, settled = time.time(), node_state == "dead"
            entry.losses.append({"at": now, "node_id": node_id, "node": entry.node if started else None,
                                 "reason_class": reason_class, "settled": settled,
                                 "settled_at": now if settled else None,
                                 "attempt": entry.attempts, "counted": started, "step": entry.step,
                                 "commit_seq": entry.commit_seq, "resumed_at": None})
            if node_state != "dead":  # the GCS has the last word: re-checked until it settles
                self._suspect(node_id, avoid=node_state == "unreachable")
        if self.interrupting:
            state.entry = entry
            return
        entry.state = "pending"  # until a new worker starts it (or it fails below)
        where = f" on node {node_id[:12]} ({node_state})" if node_id else ""
        if not started:  # not an attempt: the case never began on that worker
            state.unstarted += 1
            if reason_class in TRANSIENT and state.unstarted <= MAX_UNSTARTED:
                self._say(f"{state.planned.name}: worker lost before the case started{where}, not an attempt; "
                          f"placing it again")
                state.entry = self.run.write_entry(entry)
                state.requeued = True
                self.queue.insert(0, state)
                return
        elif reason_class in TRANSIENT and entry.attempts - state.attempts_at_start - 1 < self.max_retries:
            self._say(f"{state.planned.name}: {reason_class}{where}; retrying from commit {entry.commit_seq} "
                      f"(step {entry.step})")
            state.entry = self.run.write_entry(entry)
            state.requeued = True
            self.queue.insert(0, state)  # a new worker takes it at the next dispatch
            return
        entry.state = "failed"
        state.entry = self.run.write_entry(entry)
        self._say(f"{state.planned.name}: failed ({reason_class}{where}, {entry.attempts} attempts"
                  + (f", {state.unstarted} workers lost before it started" if state.unstarted else "") + ")")
        self._say_log_tail(state)

    def _case_started(self, state: CaseState) -> bool:
        """Did the case begin on its worker (start() returned)? A start result the loop has not
        taken yet counts: it is recorded now."""
        import ray

        if state.entry.state == "running":
            return True
        ref = state.start_ref
        if ref is None:
            return False
        try:
            ready, _ = ray.wait([ref], num_returns=1, timeout=0)
            result = ray.get(ready[0], timeout=0) if ready else None
        except Exception:  # start() failed with its worker
            return False
        if not isinstance(result, dict):
            return False
        result.pop("log", None)
        self._record_start(state, result)
        return True

    # ------------------------------------------------------------------ lost nodes
    def _node_state(self, node_id: str | None) -> str:
        """'dead' (the GCS says so), 'unreachable' (the GCS still counts it alive but its raylet
        does not answer: a node just lost), 'alive' (its raylet answers) or 'unknown'."""
        import ray

        if not node_id:
            return "unknown"
        try:
            nodes = ray.nodes()
        except Exception:
            return "unknown"
        return node_state(node_id, nodes, probe_raylet)

    def _suspect(self, node_id: str, avoid: bool) -> None:
        """Re-check `node_id` with the GCS until it settles; with `avoid`, no new worker goes there."""
        known = self.suspects.get(node_id)
        if known is None:
            self.suspects[node_id] = {"since": time.monotonic(), "avoid": avoid}
        else:
            known["avoid"] = known["avoid"] or avoid
        if avoid:
            for worker in [w for w in self.workers if w.case_id is None and w.node_id == node_id]:
                self._release(worker)  # an idle worker there is gone with it

    def _avoided(self) -> list[str]:
        return sorted(node_id for node_id, suspect in self.suspects.items() if suspect["avoid"])

    def _settle_nodes(self, force: bool = False) -> None:
        """Ask the GCS about suspect nodes: dead -> their losses are node_lost; still alive past
        NODE_SETTLE_SECONDS -> the node survived (worker_died) and is used again."""
        import ray

        now = time.monotonic()
        if not self.suspects or (not force and now - self.last_node_check < NODE_CHECK_SECONDS):
            return
        self.last_node_check = now
        try:
            alive = {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}
        except Exception:
            return
        for node_id, suspect in list(self.suspects.items()):
            if alive.get(node_id, False):
                if now - suspect["since"] < NODE_SETTLE_SECONDS:
                    continue
                final = "worker_died"
            else:
                final = "node_lost"
            del self.suspects[node_id]
            if suspect["avoid"] or final == "node_lost":
                self._say(f"node {node_id[:12]}: " + ("dead (the GCS declared it)" if final == "node_lost"
                                                      else "alive again: new workers may go there"))
            if suspect["avoid"] and final == "worker_died":
                self._replace_waiting_workers()
            for state in self.cases.values():
                self._settle_losses(state, node_id, final)

    def _replace_waiting_workers(self) -> None:
        """Workers still waiting to be placed were asked for with the old list of avoided nodes
        (which no node may satisfy any more): ask again (their cases had not started: no attempt)."""
        for state in self.cases.values():
            worker = state.worker
            if worker is not None and worker.node_id is None and state.entry.state == "pending":
                self._kill(state)
                state.requeued = True
                self.queue.insert(0, state)

    def _settle_losses(self, state: CaseState, node_id: str, final: str) -> None:
        changed = False
        for loss in state.entry.losses:
            if loss.get("node_id") == node_id and not loss.get("settled"):
                loss["reason_class"], loss["settled"], loss["settled_at"] = final, True, time.time()
                changed = True
        if not changed:
            return
        last = state.entry.losses[-1]
        if state.entry.state not in FINISHED and last.get("node_id") == node_id and state.entry.reason_class in TRANSIENT:
            state.entry.reason_class = final
        try:
            state.entry = self.run.write_entry(state.entry)
        except Exception as error:  # the next write of the entry carries it
            self._say(f"{state.planned.name}: could not record the node's fate: {first_line(error)}")

    def _wait_for_nodes(self) -> None:
        """At the end: nodes whose raylet went silent are settled by the GCS before the run ends."""
        waiting = {node_id: s for node_id, s in self.suspects.items() if s["avoid"]}
        if not waiting:
            return
        deadline = max(s["since"] for s in waiting.values()) + NODE_SETTLE_SECONDS
        self._say(f"waiting for the GCS to settle {len(waiting)} lost node(s)")
        while any(s["avoid"] for s in self.suspects.values()) and time.monotonic() < deadline:
            time.sleep(NODE_CHECK_SECONDS)
            self._settle_nodes(force=True)
        self._settle_nodes(force=True)

    def _interrupt(self) -> None:
        """Ctrl-C: running cases commit what they have (a checkpoint with their rows, within
        INTERRUPT_COMMIT_SECONDS; a second Ctrl-C skips this), then every worker stops and the
        ledger is left resumable (running -> pending)."""
        import ray

        self.interrupting = True
        running = [s for s in self.cases.values() if s.worker is not None and s.entry.state not in FINISHED]
        try:
            if running:
                self._say(f"interrupted: committing {len(running)} running case(s) (Ctrl-C again to stop at once)")
                waiting = {s.planned.case_id: s.entry.commit_seq for s in running}
                for s in running:
                    s.worker.actor.request_commit.remote()
                deadline = time.monotonic() + INTERRUPT_COMMIT_SECONDS
                while waiting and time.monotonic() < deadline:
                    polls = [ref for ref, (cid, kind) in self.active.items() if cid in waiting]
                    if not polls:
                        break
                    ready, _ = ray.wait(polls, num_returns=1, timeout=POLL_SECONDS)
                    for ref in ready:
                        case_id = self.active[ref][0]
                        self._take(ref)
                        state = self.cases[case_id]
                        if state.worker is None or state.entry.commit_seq > waiting.get(case_id, 0):
                            waiting.pop(case_id, None)
        except KeyboardInterrupt:
            pass
        for state in self.cases.values():
            launched = state.worker is not None or state in running
            if state.worker is not None:
                self._kill(state)
            if not launched or state.entry.state in FINISHED:
                continue
            try:
                entry = self.run.entry(state.planned.case_id)  # the ledger's own copy: a commit may have just landed
                if entry.state not in FINISHED:
                    entry.state, entry.reason_class, entry.reason = "pending", "interrupted", "stopped by the user"
                    state.entry = self.run.write_entry(entry)
            except Exception as error:  # recover() on resume puts 'running' back to 'pending' anyway
                self._say(f"{state.planned.name}: could not mark interrupted: {first_line(error)}")
        for worker in list(self.workers):
            self._release(worker)
        self._say(f"interrupted; continue with: bplab run --resume {self.run.location}")


    # ------------------------------------------------------------------ the view
    def _say(self, text: str) -> None:
        self.view.event(text)

    def _say_log_tail(self, state: CaseState) -> None:
        """A failed case's last lines of output, and where the rest is."""
        lines = self.logs.tail(state.planned.name)
        if lines:
            self._say(f"{state.planned.name}: last lines of its output (bplab logs {self.run.location} {state.planned.name}):\n"
                      + "\n".join(f"    | {line[:300]}" for line in lines))

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
_STORAGE_TEXTS = ("no space left", "disk quota", "permission denied", "read-only file system", "input/output error")


def new_worker(remote_class, num_cpus: float, num_gpus: float, resources: dict | None = None,
               placement: dict | None = None) -> WorkerSlot:
    """Start one worker actor (of `remote_class`, ray.remote(Worker)) with a slot's resources
    (`resources`: the training marker of the cluster's training node types, never the head;
    `placement`: placement_options). It imports TensorFlow at once."""
    actor = remote_class.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, max_restarts=0,
                                 max_task_retries=0, **(placement or {})).remote(num_cpus, num_gpus)
    return WorkerSlot(actor, num_cpus, num_gpus)


def case_structure(planned: PlannedCase) -> str:
    """What decides a case's traced steps, as far as the driver can tell without the data:
    its settings but those that enter a step as values (workers.steps.PER_CASE_FIELDS, and
    value_fields for the way `compile: auto` would run it: workers.steps.compile_plan), and its
    data set. Two cases with equal keys reuse one worker's traced and compiled steps."""
    from workers.steps import XLA_MIN_STEPS, structure_settings

    settings = planned.case.settings
    mode = settings.compile
    if mode == "auto":  # value_fields names fields of MLPs only: no convolution to look for
        mode = "xla" if not planned.num_gpus and planned.steps_total >= XLA_MIN_STEPS else "graph"
    return json.dumps({"settings": structure_settings(settings, mode), "data": settings.data.to_dict()},
                      sort_keys=True, default=list)


def start_workers(planned: list[PlannedCase], slots: int) -> list[WorkerSlot]:
    """Workers for the first cases to run, started as soon as Ray is up: their TensorFlow
    import (seconds) then overlaps the driver's own start (the run directory, the data put in
    the object store). Handed to Driver(workers=...), which uses them like its own."""
    import ray

    from workers.actor import Worker

    remote_class = ray.remote(Worker)
    return [new_worker(remote_class, p.num_cpus, p.num_gpus, p.resources) for p in planned[:max(0, slots)]]


def stop_workers(workers: list[WorkerSlot]) -> None:
    """Stop workers that no driver took (nothing was left to run)."""
    import ray

    for worker in workers:
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:
            pass


def storage_is_broken(error: BaseException) -> bool:
    """True for an error that every later write to the run directory would hit too."""
    while error is not None:
        if isinstance(error, OSError) and (error.errno in STORAGE_ERRNOS
                                           or any(t in str(error).lower() for t in _STORAGE_TEXTS)):
            return True
        error = error.__cause__ or error.__context__
    return False


def classify_loss(error: BaseException, node: str) -> str:
    """Failure class of a lost actor: `node` is what became of its node (see node_state)."""
    text = " ".join(str(error).split()).lower()
    if getattr(error, "actor_init_failed", False):
        return "bug"
    if "out of memory" in text or "memory monitor" in text or "OutOfMemoryError" in type(error).__name__:
        return "oom"
    if node in ("dead", "unreachable") or getattr(error, "preempted", False):
        return "node_lost"
    return "worker_died"


def node_state(node_id: str, nodes: list[dict], probe) -> str:
    """What became of `node_id`, from the GCS's node table `nodes` (ray.nodes()) and, while the
    GCS still counts it alive, its raylet: 'dead', 'unreachable', 'alive' or 'unknown'.

    `probe(address, port)` -> 'answers' | 'refused' | 'silent'. A raylet that does not answer
    means a node gone only if the driver reaches another node's raylet (a driver outside the
    cluster, behind a firewall, reaches none: 'unknown')."""
    by_id = {n.get("NodeID"): n for n in nodes}
    node = by_id.get(node_id)
    if node is None:
        return "unknown"
    if not node.get("Alive"):
        return "dead"
    answer = probe(node.get("NodeManagerAddress"), node.get("NodeManagerPort"))
    if answer == "answers":
        return "alive"
    others = [n for n in nodes if n.get("Alive") and n.get("NodeID") != node_id]
    for other in others[:3]:
        if probe(other.get("NodeManagerAddress"), other.get("NodeManagerPort")) == "answers":
            return "unreachable"
    return "unknown"


def probe_raylet(address: str | None, port: int | None, timeout: float = PROBE_SECONDS) -> str:
    """Open a TCP connection to a raylet: 'answers', 'refused' (the host is up, nothing listens)
    or 'silent' (no reply within `timeout`, or no address)."""
    if not address or not port:
        return "silent"
    try:
        with socket.create_connection((address, int(port)), timeout=timeout):
            return "answers"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "silent"


def placement_options(avoid: list[str]) -> dict:
    """Actor options that keep a new worker off the nodes in `avoid` (none: no constraint)."""
    if not avoid:
        return {}
    return {"label_selector": {NODE_LABEL: f"!in({','.join(avoid)})"}}


def placement(node: str | None, planned: PlannedCase, info: dict) -> str:
    """Where a case runs, for its event line: '192.0.2.2, 1 CPU slot' or '10.0.0.3, GPU 0 (Tesla T4)
    + 1 CPU slot'. ``info``: what the worker's start() returned (gpu_ids, gpu_names, warning)."""
    cpus = float(planned.num_cpus or 0)
    slots = f"{cpus:g} CPU slot{'' if cpus == 1 else 's'}"
    ids = [str(g) for g in info.get("gpu_ids") or []]
    if not ids:
        return f"{node or '?'}, {slots}"
    gpus = float(planned.num_gpus or 0)
    device = f"GPU{'s' if len(ids) > 1 else ''} {','.join(ids)}"
    names = sorted(set(info.get("gpu_names") or []))
    if names:
        device += f" ({', '.join(names)})"
    if 0 < gpus < 1:
        device = f"{gpus:g} of {device}"
    return f"{node or '?'}, {device} + {slots}"


def render_view(states) -> str:
    states = list(states)
    width = max([22, *(len(s.planned.name) for s in states)])  # columns stay aligned for long names
    lines = [f"{'case':<{width}} {'state':<11} {'node':<16} {'gpu':<5} {'epoch':>7} {'step':>13} {'test acc':>9} {'ETA':>8}"]
    for s in states:
        e, p = s.entry, s.progress
        epochs = s.planned.case.settings.epochs
        step = p.get("step", e.step)
        total = s.planned.steps_total
        eta = "-"
        if e.state == "running" and s.started_at and step > s.steps_at_start:
            rate = (step - s.steps_at_start) / (time.monotonic() - s.started_at)
            eta = duration((total - step) / rate) if rate > 0 else "-"
        accuracy = p.get("test_accuracy", e.latest.get("test_accuracy"))
        started = step > 0 or e.state == "running"  # a done case is in its last epoch
        epoch = epochs if e.state == "done" else shown_epoch(step, total, epochs) if started else 0
        lines.append(f"{s.planned.name:<{width}} {e.state:<11} {(e.node or '-'):<16} {(e.gpu or '-'):<5} "
                     f"{epoch:>3}/{epochs:<3} {step:>6}/{total:<6} "
                     f"{(f'{accuracy:.4f}' if accuracy is not None else '-'):>9} {eta:>8}")
    return "\n".join(lines)


def render_losses(states) -> list[str]:
    """One line per worker or node a case lost, oldest first (the ledger's `losses`)."""
    lines = []
    for s in states:
        for loss in s.entry.losses:
            at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(loss.get("at", 0)))
            back = loss.get("resumed_at")
            lines.append(f"  {s.planned.name}: {loss.get('reason_class')}: node {str(loss.get('node_id'))[:12]} at {at}, "
                         + (f"attempt {loss.get('attempt')} at step {loss.get('step')}" if loss.get("counted", True)
                            else "before the case started (not an attempt)")
                         + (f", running again {back - loss['at']:.0f} s later" if back else "")
                         + ("" if loss.get("settled", True) else " (not confirmed by the GCS)"))
    return lines
