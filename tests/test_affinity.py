"""Which worker runs which case: a free worker takes a queued case of a structure whose traced
steps it holds, else one of a structure no other worker holds (jobs.driver.Driver._pick), so a
structure is traced (and compiled) once per study where the queue allows, not once per worker."""

import io
from pathlib import Path

import pytest

from analysis.rundir import RunDir
from jobs.driver import Driver, WorkerSlot, case_structure
from jobs.plan import PlannedCase
from jobs.suites import Case
from tests.helpers import bplab, case_row, ledger, local_cluster, write_suite
from workers import settings as settings_module

MOONS = {"model": "mlp", "hidden": [4], "data": {"name": "moons", "samples": 100, "noise": 0.2}, "optimizer": "sgd",
         "lr": 1.0, "batch_size": 0, "epochs": 30}


def queued_driver(tmp_path, cases: dict) -> Driver:
    """A Driver (no Ray) with `cases` (name -> settings changes over MOONS) queued in order."""
    planned, rows = [], []
    for index, (name, changes) in enumerate(cases.items()):
        settings = settings_module.from_dict({**MOONS, **changes})
        rows.append(case_row(f"{name}-{index}", name, settings))
        planned.append(PlannedCase(Case(name, name, settings), f"{name}-{index}", 1.0, 0.0, 30, 30, settings.data))
    run = RunDir.create(str(tmp_path / "run"), {"suite": "pick"}, rows)
    driver = Driver(run, planned, {}, progress_every=0, out=io.StringIO())
    driver.queue = list(driver.cases.values())
    return driver


@pytest.mark.timeout(60)
def test_a_free_worker_picks_its_own_structure_then_one_nobody_holds_then_the_next(tmp_path):
    driver = queued_driver(tmp_path, {"t0": {"activation": "tanh"}, "t1": {"activation": "tanh", "seed": 1},
                                      "r0": {"activation": "relu"}, "s0": {"activation": "sigmoid"},
                                      "r1": {"activation": "relu", "seed": 1}})
    structure = {state.planned.name: driver.structures[state.planned.case_id] for state in driver.queue}
    assert structure["t0"] == structure["t1"] != structure["r0"] == structure["r1"] != structure["s0"]
    holds_relu, holds_tanh, new = (WorkerSlot(None, 1.0, 0.0, structures=[structure["s0"], structure["r0"]]),
                                   WorkerSlot(None, 1.0, 0.0, structures=[structure["t0"]]), WorkerSlot(None, 1.0, 0.0))
    driver.workers = [holds_relu, holds_tanh, new]
    assert driver._pick(holds_relu).planned.name == "r0"  # its most recent structure, behind two others
    assert driver._pick(holds_tanh).planned.name == "t0"
    assert driver._pick(new).planned.name == "t0"  # every structure is held: the next
    driver.workers = [holds_tanh, new]
    assert driver._pick(new).planned.name == "r0"  # the first one no other worker holds
    a_gpu = WorkerSlot(None, 1.0, 1.0, structures=[structure["r0"]])
    assert driver._pick(a_gpu).planned.name == "t0"  # no queued case of its shape: the next
    head = driver.queue[0]
    head.requeued = True  # a retry, or its worker lost before it started: put back at the head
    assert driver._pick(holds_relu) is head


@pytest.mark.timeout(60)
def test_the_driver_knows_which_cases_share_an_executable():
    """An MLP's activation is a value of its XLA step (workers.steps.value_fields): the driver
    groups such cases when `compile: auto` would compile them (a CPU slot, 10,000 steps or
    more) or XLA is asked for, and keeps them apart on the graph."""
    def key(activation, steps=20_000, gpus=0.0, **changes):
        settings = settings_module.from_dict({**MOONS, "activation": activation, **changes})
        return case_structure(PlannedCase(Case("c", "c", settings), "c-1", 1.0, gpus, 1, steps, settings.data))

    assert key("tanh") == key("relu") == key("sigmoid") != key("elu")
    assert key("tanh", compile="xla", steps=30) == key("relu", compile="xla", steps=30)
    assert key("tanh", steps=30) != key("relu", steps=30)  # auto: the graph for a short case
    assert key("tanh", gpus=1.0) != key("relu", gpus=1.0)  # auto: the graph on a GPU
    assert key("tanh", compile="graph") != key("relu", compile="graph")
    assert key("tanh") != key("tanh", hidden=[5])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_each_structure_is_traced_by_one_worker(tmp_path):
    # queued a0, a1, b0, b1: by the queue's order both workers would start on tanh and both
    # would trace it, then both trace relu (four traces); by structure, two
    cases = {"a0": {"activation": "tanh", "seed": 0}, "a1": {"activation": "tanh", "seed": 1},
             "b0": {"activation": "relu", "seed": 0}, "b1": {"activation": "relu", "seed": 1}}
    suite = write_suite(tmp_path, cases=cases, base=MOONS, name="pairs.yaml")
    run = tmp_path / "run"
    with local_cluster(head_cpus=2) as cluster:  # two CPU slots, whatever the machine has
        done = bplab("run", str(suite), "--address", cluster.address, "--out", str(run), "--progress-every", "0",
                     "--no-report", timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = {e["name"]: e for e in ledger(Path(run)).values()}
    assert {e["state"] for e in entries.values()} == {"done"}
    workers = {name: e["info"]["pid"] for name, e in entries.items()}
    assert len(set(workers.values())) == 2, workers  # two CPU slots: two workers
    first = {e["info"]["pid"]: name for name, e in entries.items() if e["info"]["worker_cases"] == 1}
    assert sorted(name[0] for name in first.values()) == ["a", "b"], first  # by the queue: a0 and a1
    built = sorted(name for name, e in entries.items() if not e["info"]["trainer"]["steps_kept"])
    # each structure once, and once more at most where a worker that ran out of its own took the
    # other's rather than wait (by the queue: four)
    assert {name[0] for name in built} == {"a", "b"} and len(built) <= 3, (built, workers)
