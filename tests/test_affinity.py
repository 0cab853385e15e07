"""Which worker runs which case: a free worker takes a queued case of a structure whose traced
steps it holds, else one of a structure no other worker holds (jobs.driver.Driver._pick), so a
structure is traced (and compiled) once per study where the queue allows, not once per worker."""

from pathlib import Path

import pytest

from tests.helpers import bplab, ledger, write_suite

MOONS = {"model": "mlp", "hidden": [4], "data": {"name": "moons", "samples": 100, "noise": 0.2}, "optimizer": "sgd",
         "lr": 1.0, "batch_size": 0, "epochs": 30}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_each_structure_is_traced_by_one_worker(tmp_path):
    # queued a0, a1, b0, b1: by the queue's order both workers would start on tanh and both
    # would trace it, then both trace relu (four traces); by structure, two
    cases = {"a0": {"activation": "tanh", "seed": 0}, "a1": {"activation": "tanh", "seed": 1},
             "b0": {"activation": "relu", "seed": 0}, "b1": {"activation": "relu", "seed": 1}}
    suite = write_suite(tmp_path, cases=cases, base=MOONS, name="pairs.yaml")
    run = tmp_path / "run"
    done = bplab("run", str(suite), "--out", str(run), "--progress-every", "0", "--no-report", timeout=380)
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
