"""Retry accounting of the driver, without a cluster: Ray is replaced by a fake whose actors
follow a script (start, commit, then die with one of Ray 2.60's exceptions, or never start),
with a real run directory underneath.

A worker lost before its case started is not an attempt; a case whose node is lost costs one
retry and its retries avoid that node (Ray's node-id label) until the GCS settles it; the
ledger keeps each loss, classified node_lost once the GCS has declared the node dead.
"""
from __future__ import annotations

import io
import sys
import types

import pandas as pd
import pytest
import ray.exceptions as rex
from ray._private.label_utils import validate_label_selector
from ray.core.generated.common_pb2 import ActorDiedErrorContext, NodeDeathInfo

from jobs import driver as driver_module
from jobs.driver import Driver, classify_loss, node_state, placement_options
from jobs.plan import PlannedCase
from analysis.rundir import RunDir
from jobs.suites import Case
from tests.helpers import case_row
from workers.settings import CaseSettings, DataSpec
from workers.trainer import Report

ACTOR = b"\x01" * 16
STEPS = 6
N0, N1, N2 = "a0" * 28, "b1" * 28, "c2" * 28  # node ids: 56 hex digits, as Ray's


# ---------------------------------------------------------------------- Ray 2.60's exceptions

def cancelled():
    """What the driver gets when the GCS cancels an actor's creation with its dead node."""
    return rex.ActorDiedError(ActorDiedErrorContext(actor_id=ACTOR, never_started=True,
                                                    error_message="Actor creation cancelled."))


def node_died():
    return rex.ActorDiedError(ActorDiedErrorContext(actor_id=ACTOR, error_message=(
        f"The actor died because its node has died. Node Id: {N1}")))


def worker_died():
    return rex.ActorDiedError(ActorDiedErrorContext(actor_id=ACTOR, pid=123, error_message=(
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR")))


def unavailable():  # a node killed whole: the driver's RPC to the actor fails before the GCS knows
    return rex.ActorUnavailableError("The actor is temporarily unavailable: RpcError: Socket closed", ACTOR)


def preempted():
    return rex.ActorDiedError(ActorDiedErrorContext(actor_id=ACTOR, node_death_info=NodeDeathInfo(
        reason=NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED)))


EXCEPTIONS = {
    "cancelled": cancelled, "node_died": node_died, "worker_died": worker_died, "unavailable": unavailable,
    "preempted": preempted, "unschedulable": lambda: rex.ActorUnschedulableError("no node satisfies it"),
    "object_lost": lambda: rex.ObjectLostError("ab" * 14, "owner", ""), "generic": lambda: rex.ActorDiedError(),
    "oom": lambda: rex.OutOfMemoryError("Task was killed due to the node running low on memory"),
    "init_failed": lambda: rex.RayActorError(actor_init_failed=True),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, node, expected", [
    ("unavailable", "unreachable", "node_lost"), ("unavailable", "dead", "node_lost"),
    ("unavailable", "alive", "worker_died"), ("unavailable", "unknown", "worker_died"),
    ("node_died", "dead", "node_lost"), ("worker_died", "alive", "worker_died"),
    ("cancelled", "unknown", "worker_died"), ("preempted", "unknown", "node_lost"),
    ("generic", "unreachable", "node_lost"), ("oom", "unreachable", "oom"), ("init_failed", "dead", "bug"),
])
def test_a_lost_actor_is_classified_by_what_became_of_its_node(name, node, expected):
    assert classify_loss(EXCEPTIONS[name](), node) == expected


@pytest.mark.timeout(30)
def test_node_state_from_the_gcs_then_the_raylet():
    nodes = [{"NodeID": N0, "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 1},
             {"NodeID": N1, "Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeManagerPort": 2},
             {"NodeID": N2, "Alive": False, "NodeManagerAddress": "10.0.0.3", "NodeManagerPort": 3}]

    def probe(answers):
        return lambda address, port: answers.get(address, "silent")

    assert node_state(N2, nodes, probe({})) == "dead"  # the GCS's word first
    assert node_state("ff" * 28, nodes, probe({})) == "unknown"
    assert node_state(N1, nodes, probe({"10.0.0.2": "answers"})) == "alive"
    assert node_state(N1, nodes, probe({"10.0.0.1": "answers", "10.0.0.2": "refused"})) == "unreachable"
    assert node_state(N1, nodes, probe({"10.0.0.1": "answers"})) == "unreachable"  # silent, another answers
    # the driver reaches no raylet at all (outside the cluster): it cannot tell
    assert node_state(N1, nodes, probe({"10.0.0.2": "refused"})) == "unknown"
    assert node_state(N1, nodes, probe({})) == "unknown"


@pytest.mark.timeout(30)
def test_placement_options_are_a_valid_ray_label_selector():
    assert placement_options([]) == {}
    options = placement_options([N1, N2])
    assert options == {"label_selector": {"ray.io/node-id": f"!in({N1},{N2})"}}
    assert validate_label_selector(options["label_selector"]) is None  # Ray's own check
    assert validate_label_selector({"ray.io/node-id": "!in(a b)"}) is not None  # the check can fail


# ---------------------------------------------------------------------- a fake Ray


class Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeActor:
    """Follows one script: ("cancel", exc) never starts; ("die", node, exc, after) starts on `node`,
    commits `after` steps and dies; ("finish", node) starts on `node` and runs to the end."""

    def __init__(self, cluster, script, options):
        self.cluster, self.script, self.options = cluster, script, options
        self.start = types.SimpleNamespace(remote=self._start)
        self.poll = types.SimpleNamespace(remote=self._poll)
        self.request_commit = types.SimpleNamespace(remote=lambda: Ref(True))
        self.polls = 0

    def _start(self, case_id, settings_json, data, resume, checkpoint_every, commit_every):
        kind = self.script[0]
        if kind == "cancel":
            return Ref(error=self.script[1]())
        self.case_id, self.first = case_id, int(resume.decode()) if resume else 0
        node = self.script[1]
        return Ref({"node_id": node, "node_ip": f"ip-{node[:2]}", "pid": 1, "gpu_ids": ["0"], "worker_cases": 1})

    def _poll(self, timeout):
        if self.script[0] == "cancel":
            return Ref(error=self.script[1]())
        self.polls += 1
        if self.polls > 1:  # after its first report
            if self.script[0] == "die":
                return Ref(error=self.script[2]())
            return Ref({"reports": [], "finished": True, "outcome": {"ok": True}, "memory_mb": 1.0})
        last = self.first + self.script[3] if self.script[0] == "die" else STEPS
        rows = [{"split": "train", "epoch": 0, "step": s, "cost": 1.0 / (s + 1), "accuracy": 0.5}
                for s in range(self.first, last)]
        done = last == STEPS
        report = Report(rows=rows, checkpoint=str(last).encode(), status="done" if done else "running",
                        progress={"epoch": 0, "step": last})
        self.cluster.ran.append((self.case_id, self.script[1], self.first, last))
        return Ref({"reports": [report], "finished": done, "outcome": {"ok": True} if done else None, "memory_mb": 1.0})


class FakeCluster:
    """The `ray` module as the driver uses it: actors from `scripts` in order, a node table."""

    def __init__(self, scripts, alive=(N0, N1, N2), answering=(N0, N2)):
        self.scripts, self.options, self.ran = list(scripts), [], []
        self.alive, self.answering = set(alive), set(answering)
        self.exceptions = rex

    def remote(self, cls):
        cluster = self

        class Remote:
            def options(self, **options):
                return types.SimpleNamespace(remote=lambda *a: cluster.new_actor(options))
        return Remote()

    def new_actor(self, options):
        self.options.append(options)
        return FakeActor(self, self.scripts.pop(0), options)

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs)[:num_returns], list(refs)[num_returns:]

    def get(self, ref, timeout=None):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor, no_restart=True):
        pass

    def nodes(self):
        return [{"NodeID": n, "Alive": n in self.alive, "NodeManagerAddress": n, "NodeManagerPort": 1}
                for n in (N0, N1, N2)]

    def probe(self, address, port, timeout=None):
        return "answers" if address in self.answering else "refused"


def make_driver(tmp_path, monkeypatch, scripts, max_retries=2, **cluster):
    fake = FakeCluster(scripts, **cluster)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(driver_module, "probe_raylet", fake.probe)
    monkeypatch.setattr(driver_module, "POLL_SECONDS", 0.0)
    settings = CaseSettings(model="mlp", data=DataSpec("moons"), epochs=STEPS)
    row = case_row("a-0001", "a", settings, steps_total=STEPS, num_gpus=1.0)
    run = RunDir.create(str(tmp_path / "run"), {"suite": "retries"}, [row])
    planned = [PlannedCase(Case("a", "a", settings), "a-0001", 1.0, 1.0, STEPS, STEPS, settings.data)]
    out = io.StringIO()
    driver = Driver(run, planned, {settings.data: None}, max_retries=max_retries, progress_every=0, out=out)
    monkeypatch.setattr(driver, "_worker_class", lambda: fake.remote(None))
    return driver, fake, run, out


def steps_logged(run) -> list[int]:
    return sorted(pd.read_parquet(f"{run.location}/metrics")["step"].tolist())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("never_started", ["cancelled", "unschedulable", "unavailable", "generic", "object_lost"])
def test_a_worker_lost_before_its_case_started_is_not_an_attempt(tmp_path, monkeypatch, never_started):
    """A spot preemption as it unfolds: the node dies mid-case; the replacement is cancelled with the dead
    node; the next one runs elsewhere. With one retry allowed the case finishes."""
    scripts = [("die", N1, unavailable, 2), ("cancel", EXCEPTIONS[never_started]), ("finish", N2)]
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts, max_retries=1)
    fake.alive.discard(N1)  # the GCS declares it dead by the next check
    assert driver.execute() == {"a-0001": "done"}, out.getvalue()
    entry = run.entry("a-0001")
    assert entry.attempts == 2  # the loss of the node: one retry; the cancelled creation: none
    assert steps_logged(run) == list(range(STEPS))  # every row exactly once
    assert fake.ran == [("a-0001", N1, 0, 2), ("a-0001", N2, 2, STEPS)]
    assert "not an attempt" in out.getvalue()
    [loss] = entry.losses
    assert loss["node_id"] == N1 and loss["reason_class"] == "node_lost" and loss["counted"] and loss["step"] == 2


@pytest.mark.timeout(60)
def test_a_retry_avoids_a_node_whose_raylet_is_silent_until_the_gcs_declares_it_dead(tmp_path, monkeypatch):
    scripts = [("die", N1, unavailable, 2), ("finish", N2)]
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts, max_retries=1)
    # the GCS still counts N1 alive throughout the case: the driver must not wait for it...
    monkeypatch.setattr(driver_module, "NODE_SETTLE_SECONDS", 0.5)
    assert driver.execute() == {"a-0001": "done"}, out.getvalue()
    assert "label_selector" not in fake.options[0]
    assert fake.options[1]["label_selector"] == {"ray.io/node-id": f"!in({N1})"}  # not back on the lost node
    entry = run.entry("a-0001")
    assert entry.attempts == 2 and steps_logged(run) == list(range(STEPS))
    [loss] = entry.losses
    # ...and at the end it waited for the GCS, which never declared N1 dead: it survived
    assert loss["reason_class"] == "worker_died" and loss["settled"] and loss["resumed_at"] >= loss["at"]
    assert loss["settled_at"] > loss["at"]  # settled by the check at the end, after the loss
    assert "alive again" in out.getvalue()


@pytest.mark.timeout(60)
def test_a_worker_killed_on_a_live_node_is_retried_anywhere(tmp_path, monkeypatch):
    scripts = [("die", N1, worker_died, 3), ("finish", N1)]
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts, max_retries=1, answering=(N0, N1, N2))
    assert driver.execute() == {"a-0001": "done"}, out.getvalue()
    assert all("label_selector" not in options for options in fake.options)
    entry = run.entry("a-0001")
    assert entry.attempts == 2 and [loss["reason_class"] for loss in entry.losses] == ["worker_died"]
    assert steps_logged(run) == list(range(STEPS))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("losses, max_retries, final", [(2, 2, "done"), (3, 2, "failed"), (1, 0, "failed")])
def test_each_lost_node_costs_one_retry(tmp_path, monkeypatch, losses, max_retries, final):
    nodes = [N1, N2, N0]
    scripts = [("die", nodes[i], unavailable, 1) for i in range(losses)] + [("finish", N0)]
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts, max_retries=max_retries, alive=(),
                                         answering=())
    assert driver.execute() == {"a-0001": final}, out.getvalue()
    entry = run.entry("a-0001")
    assert entry.attempts == min(losses, max_retries + 1) + (final == "done")
    assert [loss["node_id"] for loss in entry.losses] == nodes[:entry.attempts - (final == "done")]
    assert all(loss["reason_class"] == "node_lost" and loss["settled"] for loss in entry.losses)
    # the GCS had declared each node dead when its loss was seen: settled at that moment
    assert all(loss["settled_at"] == loss["at"] for loss in entry.losses), entry.losses
    if final == "done":
        assert steps_logged(run) == list(range(STEPS))
    else:
        assert entry.reason_class == "node_lost"


@pytest.mark.timeout(60)
def test_workers_that_never_start_end_the_case_after_a_bound(tmp_path, monkeypatch):
    scripts = [("cancel", cancelled)] * (driver_module.MAX_UNSTARTED + 1)
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts)
    assert driver.execute() == {"a-0001": "failed"}, out.getvalue()
    assert run.entry("a-0001").attempts == 0 and not fake.scripts
    assert f"{driver_module.MAX_UNSTARTED + 1} workers lost before it started" in out.getvalue()


@pytest.mark.timeout(60)
def test_an_actor_whose_constructor_failed_is_not_retried(tmp_path, monkeypatch):
    scripts = [("die", N1, EXCEPTIONS["init_failed"], 1), ("finish", N2)]
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts)
    assert driver.execute() == {"a-0001": "failed"}, out.getvalue()
    assert run.entry("a-0001").reason_class == "bug" and len(fake.scripts) == 1


@pytest.mark.timeout(60)
def test_status_and_the_report_name_the_lost_nodes(tmp_path, monkeypatch, capsys):
    from analysis.load import load
    from analysis.report import lost_workers, write_report
    from tests.helpers import run_main

    scripts = [("die", N1, unavailable, 1), ("cancel", cancelled), ("die", N2, unavailable, 2), ("finish", N0)]
    driver, fake, run, out = make_driver(tmp_path, monkeypatch, scripts, alive=(N0,), answering=(N0,))
    assert driver.execute() == {"a-0001": "done"}, out.getvalue()
    entry = run.entry("a-0001")
    assert entry.attempts == 3 and [loss["node_id"] for loss in entry.losses] == [N1, N2]
    table = lost_workers(load(run.location).ledger)
    assert table[["name", "attempt", "reason_class", "node_id", "step"]].values.tolist() == [
        ["a", 1, "node_lost", N1, 1], ["a", 2, "node_lost", N2, 3]]
    assert (table["back_after_s"] >= 0).all()
    report = write_report(run.location, tmp_path / "report", figures=False).read_text()
    assert "## Lost workers and nodes" in report and report.count(f"| {N1} |") == 1 and f"| {N2} |" in report
    status = run_main(["status", run.location], tmp_path, monkeypatch, capsys)
    assert status.code == 0, status.stderr
    assert f"a: node_lost: node {N1[:12]}" in status.stdout and "attempt 1 at step 1" in status.stdout
    assert f"a: node_lost: node {N2[:12]}" in status.stdout and "attempt 2 at step 3" in status.stdout
