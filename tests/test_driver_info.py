"""The trainer's description of a case (Report.info: model, units, batch, TensorFlow
version), sent with its first report, is kept in the case's ledger entry. No Ray: the
driver is fed reports by hand."""

import io

import pytest

from jobs.driver import Driver
from jobs.plan import PlannedCase
from analysis.rundir import RunDir
from jobs.suites import Case
from workers.settings import CaseSettings
from workers.trainer import Report


@pytest.mark.timeout(60)
def test_trainer_info_reaches_the_ledger(tmp_path):
    settings = CaseSettings(model="mlp", hidden=(4,), data="moons", epochs=1)
    case_id = "a-0123456789"
    planned = PlannedCase(Case("a", "a", settings), case_id, 1.0, 0.0, 4, 4, settings.data)
    run = RunDir.create(str(tmp_path / "run"), {"suite": "test", "description": "", "suite_text": ""}, [planned.row()])
    driver = Driver(run, [planned], {}, out=io.StringIO())
    state = driver.cases[case_id]
    state.entry.state = "running"
    info = {"model": "mlp: input (2,), 2 classes", "units": ["l1", "l2"], "batch": 32, "tensorflow": "2.x"}
    row = {"split": "train", "epoch": 0, "step": 1, "cost": 0.5, "accuracy": 0.5, "lr": 0.1}
    driver._take_report(state, Report(rows=[row], info=info, progress={"epoch": 0, "step": 1}))  # first report: no checkpoint
    driver._take_report(state, Report(rows=[dict(row, step=2)], checkpoint=b"ckpt", progress={"epoch": 0, "step": 2}))
    assert RunDir.open(str(tmp_path / "run")).entry(case_id).info["trainer"] == info
