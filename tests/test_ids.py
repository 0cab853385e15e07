"""Case ids across the change of id scheme: a run written before ids left out default settings
(tests/fixtures/run-v1, made by tests/fixtures/make_run_v1.py with that code: case `done`
finished, case `cut` interrupted by a SIGKILLed driver after a committed checkpoint) keeps
its ids, shows in `bplab status`, and `bplab run --resume` finishes `cut` under its old id."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from jobs import plan, suites
from analysis.rundir import RunDir
from jobs.study import suite_from_run
from tests.helpers import bplab, copy_old_run

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run-v1"
OLD_IDS = {"done": "done-a1392ffdd5", "cut": "cut-d5305ba059"}  # as the fixture's ledger and cases table hold them


@pytest.fixture
def old_run(tmp_path) -> Path:
    return copy_old_run(tmp_path)


def planned_for(study):
    return plan.make_plan(study, plan.load_data(study.cases), cpus_per_case=1, gpus_per_case=0)


@pytest.mark.timeout(60)
def test_the_fixture_is_an_old_run():
    cases = pd.read_parquet(FIXTURE / "cases.parquet")
    assert dict(zip(cases["name"], cases["case_id"])) == OLD_IDS
    ledger = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (FIXTURE / "ledger").glob("*.json")}
    assert ledger["done"]["state"] == "done" and ledger["cut"]["state"] == "running" and ledger["cut"]["checkpoint"]
    # the current scheme gives these settings other ids: the run must be matched, not recomputed
    study = suite_from_run(RunDir.open(str(FIXTURE)))
    assert {p.name: p.case_id for p in planned_for(study)}.keys() == OLD_IDS.keys()
    assert not set(p.case_id for p in planned_for(study)) & set(OLD_IDS.values())


@pytest.mark.timeout(60)
def test_an_old_run_is_planned_under_its_own_ids(old_run, tmp_path):
    run = RunDir.open(str(old_run))
    rows = run.cases().to_dict("records")
    # without a suite (`bplab run --resume RUN`): the run's own cases
    planned = planned_for(suite_from_run(run))
    assert plan.adopt_stored_ids(planned, rows) == 2
    assert {p.name: p.case_id for p in planned} == OLD_IDS
    # with the suite it was made from (`bplab run SUITE --resume RUN`)
    suite_file = tmp_path / "fixture-v1.yaml"
    suite_file.write_text(run.manifest()["suite_text"])
    planned = planned_for(suites.load_suite(str(suite_file)))
    plan.adopt_stored_ids(planned, rows)
    assert {p.name: p.case_id for p in planned} == OLD_IDS
    # another setting or other data is another case: a new id, never the old one
    changed = planned_for(suites.load_suite(str(suite_file), ["cut.lr=0.25"]))
    plan.adopt_stored_ids(changed, rows)
    assert {p.name: p.case_id for p in changed}["cut"] not in OLD_IDS.values()
    assert {p.name: p.case_id for p in changed}["done"] == OLD_IDS["done"]
    other_data = planned_for(suites.load_suite(str(suite_file)))
    for p in other_data:
        p.data_fingerprint = "another data set"
    assert plan.adopt_stored_ids(other_data, rows) == 0


@pytest.mark.timeout(60)
def test_status_shows_an_old_run(old_run, capsys):
    from jobs.cli import main

    assert main(["status", str(old_run)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    # its driver was SIGKILLed (the lease's process is gone): running in the ledger, shown interrupted
    # step 100 of 40-step epochs is in epoch 3 (numbered from 1, as the live view and the report count)
    assert lines["cut"][1] == "interrupted" and lines["cut"][4:6] == ["3/60", "100/2400"]
    assert out.strip().endswith(f"continue with: bplab run --resume {old_run}")
    assert lines["done"][1] == "done" and lines["done"][4:6] == ["2/2", "80/80"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_finishes_an_old_run_under_its_old_ids(old_run):
    before = {p: p.read_bytes() for p in (old_run / "metrics" / f"case_id={OLD_IDS['done']}").glob("part-*")}
    result = bplab("run", "--resume", old_run, "--progress-every", "0", "--no-report", cwd=old_run.parent, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "new case" not in result.stderr
    cases = pd.read_parquet(old_run / "cases.parquet")
    assert dict(zip(cases["name"], cases["case_id"])) == OLD_IDS  # nothing added
    ledger = {p.stem: json.loads(p.read_text()) for p in (old_run / "ledger").glob("*.json")}
    assert set(ledger) == set(OLD_IDS.values())
    assert ledger[OLD_IDS["cut"]]["state"] == "done" and ledger[OLD_IDS["cut"]]["step"] == 2400
    assert ledger[OLD_IDS["done"]]["state"] == "done" and ledger[OLD_IDS["done"]]["commit_seq"] == 4
    # the finished case was not run again: its parts are as they were, the one the kill left staged published
    after = {p: p.read_bytes() for p in (old_run / "metrics" / f"case_id={OLD_IDS['done']}").glob("part-*")}
    assert {p: b for p, b in after.items() if p in before} == before and len(after) == len(before) + 1
    # every (case, step, split) row once: the rows after cut's last commit were run again, not kept twice
    metrics = pd.read_parquet(old_run / "metrics")
    metrics["case_id"] = metrics["case_id"].astype(str)
    assert not metrics.duplicated(["case_id", "step", "split"]).any()
    for name, steps, tests in (("done", 80, 1), ("cut", 2400, 6)):
        mine = metrics[metrics["case_id"] == OLD_IDS[name]]
        assert sorted(mine[mine.split == "train"]["step"]) == list(range(steps)), name
        assert (mine.split == "test").sum() == tests, name
    status = bplab("status", old_run, timeout=120)
    assert status.returncode == 0 and status.stdout.count(" done ") == 2, status.stdout


@pytest.mark.timeout(120)
def test_a_checkpoint_written_before_a_setting_existed_resumes():
    """A checkpoint stores the settings it was made with; one written before the newest setting
    existed lacks it, and resumes as the case it is (the setting at its default); a checkpoint
    of other settings is still refused."""
    import io

    import numpy as np

    from workers.data import load_dataset
    from workers.settings import CaseFields, from_dict
    from workers.trainer import train

    settings = from_dict({"model": "mlp", "hidden": [4], "data": {"name": "moons", "samples": 100}, "batch_size": 0,
                          "optimizer": "sgd", "lr": 0.5, "epochs": 4})
    data = load_dataset(settings.data)
    reports = []
    train(settings, data, reports.append, report_every_seconds=1e9, commit_every=1e9, checkpoint_every_steps=2,
          max_chunk=1)
    blob = next(report.checkpoint for report in reports if report.checkpoint is not None)
    with np.load(io.BytesIO(blob)) as archive:
        arrays = dict(archive)
    meta = json.loads(arrays["meta"].tobytes().decode())
    newest = list(CaseFields.model_fields)[-1]
    del meta["settings"][newest]  # as the code before that setting wrote it
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    old = buffer.getvalue()
    resumed = []
    train(settings, data, resumed.append, resume=old, report_every_seconds=1e9, commit_every=1e9, max_chunk=1)
    steps = [row["step"] for report in resumed for row in report.rows if row["split"] == "train"]
    assert steps == [2, 3] and resumed[-1].status == "done"
    with pytest.raises(AssertionError, match="checkpoint of other settings"):
        train(settings.model_copy(update={"lr": 0.25}), data, lambda report: None, resume=old)
