"""Faults of the run directory: torn checkpoints, metrics parts and ledger entries, commits cut
between their steps, a second driver, an unreachable cluster, a full disk.

Runs are made with RunDir directly (no Ray); the CLI commands (`status`, `report`, `run`) run
in-process with `ray` stubbed out (tests.helpers.run_main), so none may start Ray.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.rundir import RunDir, StorageError
from analysis.rundir.layout import LOCK
from workers.settings import CaseSettings, DataSpec
from tests.helpers import assert_refused, bplab, case_row, make_existing_run, run_main, tree_state, write_suite

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = CaseSettings(model="mlp", data=DataSpec("moons"), epochs=1)
CASES = [case_row("aaa111", "a", SETTINGS), case_row("bbb222", "b", SETTINGS)]


def rows(*steps):
    return [{"split": "train", "epoch": 0, "step": s, "cost": 1.0 / s, "accuracy": 0.5} for s in steps]


def make_run(tmp_path: Path, finished: bool) -> tuple[RunDir, Path]:
    """Case aaa111: commits 1 (ckpt 'one', steps 1-2), 2 (steps 3-4, no ckpt), 3 (ckpt 'three', steps 5-6),
    then (finished) commit 4 (steps 7-8, done). Case bbb222: one commit."""
    root = tmp_path / "run"
    run = RunDir.create(str(root), {"suite": "faults"}, CASES)
    a = dataclasses.replace(run.entry("aaa111"), state="running", attempts=1)
    a = run.commit("aaa111", dataclasses.replace(a, step=2), checkpoint=b"one", tables={"metrics": rows(1, 2)})
    a = run.commit("aaa111", dataclasses.replace(a, step=4), tables={"metrics": rows(3, 4)})
    a = run.commit("aaa111", dataclasses.replace(a, step=6), checkpoint=b"three", tables={"metrics": rows(5, 6)})
    if finished:
        a = run.commit("aaa111", dataclasses.replace(a, step=8, state="done"), tables={"metrics": rows(7, 8)})
        run.compact_metrics("aaa111")
    run.commit("bbb222", dataclasses.replace(run.entry("bbb222"), step=1), checkpoint=b"b-one", tables={"metrics": rows(1)})
    return run, root


def steps_of(root: Path, case_id: str = "aaa111") -> list[int]:
    frame = pd.read_parquet(root / "metrics")
    return sorted(frame[frame["case_id"] == case_id]["step"].tolist())


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    def run(*args):
        return run_main(list(args), tmp_path, monkeypatch, capsys)
    return run


# ---------------------------------------------------------------------- torn checkpoint


@pytest.mark.timeout(60)
def test_torn_latest_checkpoint_falls_back_to_the_commit_before(tmp_path):
    run, root = make_run(tmp_path, finished=False)
    cut(root / "checkpoints" / "aaa111" / "ckpt-000003.npz")
    with pytest.raises(StorageError) as error:
        RunDir.open(str(root)).load_checkpoint("aaa111")
    assert "ckpt-000003.npz" in str(error.value) and "--resume" in str(error.value)
    assert "\n" not in str(error.value)
    assert RunDir.open(str(root)).verify()[0][:2] == ("aaa111", 3)

    notes = RunDir.open(str(root)).recover()
    assert any("rolled back to commit 1" in n and "ckpt-000003" in n for n in notes), notes
    again = RunDir.open(str(root))
    entry = again.entry("aaa111")
    assert (entry.commit_seq, entry.step, entry.state) == (1, 2, "pending")
    assert again.load_checkpoint("aaa111") == b"one"
    assert steps_of(root) == [1, 2]  # the rows of the rolled-back commits went with them
    assert steps_of(root, "bbb222") == [1]  # the other case is untouched
    assert again.verify() == [] and again.recover() == []
    # the resumed case commits 2 again, exactly once
    entry = again.commit("aaa111", entry, checkpoint=b"two", tables={"metrics": rows(3, 4)})
    assert steps_of(root) == [1, 2, 3, 4] and entry.commit_seq == 2


@pytest.mark.timeout(60)
def test_both_checkpoints_torn_restarts_the_case_from_its_start(tmp_path):
    run, root = make_run(tmp_path, finished=False)
    for name in ("ckpt-000001.npz", "ckpt-000003.npz"):
        cut(root / "checkpoints" / "aaa111" / name)
    notes = RunDir.open(str(root)).recover()
    assert any("rolled back to its start" in n for n in notes), notes
    entry = RunDir.open(str(root)).entry("aaa111")
    assert (entry.commit_seq, entry.checkpoint, entry.step) == (0, None, 0)
    assert steps_of(root) == []
    assert not list((root / "checkpoints" / "aaa111").iterdir())


@pytest.mark.timeout(60)
def test_torn_checkpoint_of_a_finished_case_loses_nothing(tmp_path):
    run, root = make_run(tmp_path, finished=True)
    cut(root / "checkpoints" / "aaa111" / "ckpt-000003.npz")
    RunDir.open(str(root)).recover()
    entry = RunDir.open(str(root)).entry("aaa111")
    assert (entry.state, entry.commit_seq) == ("done", 4)  # a finished case needs no checkpoint
    assert steps_of(root) == list(range(1, 9))


# ---------------------------------------------------------------------- torn metrics part


@pytest.mark.timeout(120)
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_torn_metrics_part_is_found_by_status_report_and_resume(tmp_path, cli, finished):
    run, root = make_run(tmp_path, finished=finished)
    cut(root / "metrics" / "case_id=aaa111" / "part-000002.parquet")
    with pytest.raises(Exception):
        pd.read_parquet(root / "metrics")

    line = assert_refused(cli("report", root), "part-000002.parquet", "bplab status")  # one line, exit 2
    assert not (root / "report").exists()

    result = cli("status", root)
    assert "Traceback" not in result.stderr and result.code == 0, result.stderr
    assert "repaired: case aaa111: metrics/case_id=aaa111/part-000002.parquet is damaged" in result.stdout
    assert "rolled back to commit 1" in result.stdout
    assert steps_of(root) == [1, 2]  # readable again, the committed rows before the damage
    entry = RunDir.open(str(root)).entry("aaa111")
    assert (entry.state, entry.commit_seq) == ("pending", 1)
    assert not (root / "metrics_compact" / "case_id=aaa111").exists() or not list(
        (root / "metrics_compact" / "case_id=aaa111").iterdir())
    import analysis

    data = analysis.load(str(root))
    assert sorted(data.metrics[data.metrics["case_id"] == "aaa111"]["step"]) == [1, 2]
    assert cli("status", root).stdout.count("repaired") == 0  # nothing left to repair
    assert line


@pytest.mark.timeout(60)
def test_a_part_with_other_rows_than_its_commit_is_damage(tmp_path):
    run, root = make_run(tmp_path, finished=False)
    part = root / "metrics" / "case_id=aaa111" / "part-000003.parquet"
    frame = pd.read_parquet(part)
    frame.iloc[:1].to_parquet(part)  # whole, readable, one row short
    damage = RunDir.open(str(root)).verify()
    assert damage and damage[0][:2] == ("aaa111", 3) and "holds 1 rows where its commit wrote 2" in damage[0][2]
    RunDir.open(str(root)).recover()
    assert steps_of(root) == [1, 2]  # back to commit 1: the checkpoint of commit 3 came after the damage


# ---------------------------------------------------------------------- torn ledger entry


@pytest.mark.timeout(60)
def test_torn_ledger_entry_is_restored_from_its_backup(tmp_path, cli):
    run, root = make_run(tmp_path, finished=False)
    entry_file = root / "ledger" / "aaa111.json"
    good = json.loads(entry_file.read_text())
    cut(entry_file)
    assert RunDir.open(str(root)).entry("aaa111").commit_seq == good["commit_seq"]  # readers use the backup
    import analysis

    assert analysis.load(str(root)).ledger.set_index("case_id").loc["aaa111", "commit_seq"] == good["commit_seq"]
    result = cli("status", root)
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert "restored it from its backup copy" in result.stdout
    assert json.loads(entry_file.read_text())["commit_seq"] == good["commit_seq"]


@pytest.mark.timeout(60)
def test_torn_ledger_entry_without_backup_is_named_in_one_line(tmp_path, cli):
    run, root = make_run(tmp_path, finished=True)
    cut(root / "ledger" / "aaa111.json")
    cut(root / "ledger" / ".aaa111.json.bak")
    before = tree_state(root)
    for command in ("status", "report"):
        assert_refused(cli(command, root), "ledger/aaa111.json", "is damaged")
    assert tree_state(root) == before
    with pytest.raises(StorageError, match="ledger/aaa111.json is damaged"):
        RunDir.open(str(root)).recover()
    # the way out the message names: delete it and resume; the case runs again from its start
    (root / "ledger" / "aaa111.json").unlink()
    notes = RunDir.open(str(root)).recover()
    assert RunDir.open(str(root)).entry("aaa111").commit_seq == 0
    assert steps_of(root) == [] and any("uncommitted" in n for n in notes)


# ---------------------------------------------------------------------- commits cut between their steps


@pytest.mark.timeout(60)
def test_rows_of_a_commit_that_never_reached_the_ledger_are_never_visible(tmp_path, monkeypatch):
    run, root = make_run(tmp_path, finished=False)
    entry = run.entry("aaa111")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDir, "_put_entry", full_disk)
    with pytest.raises(OSError):
        run.commit("aaa111", dataclasses.replace(entry, step=8), checkpoint=b"four", tables={"metrics": rows(7, 8)})
    monkeypatch.undo()
    assert steps_of(root) == [1, 2, 3, 4, 5, 6]  # a plain read sees only committed rows
    import analysis

    assert sorted(analysis.load(str(root)).metrics.query("case_id == 'aaa111'")["step"]) == [1, 2, 3, 4, 5, 6]
    notes = RunDir.open(str(root)).recover()
    assert any("uncommitted" in n and "staged-part-000004" in n for n in notes), notes
    assert not list(root.rglob(".staged-*"))


@pytest.mark.timeout(60)
def test_commit_killed_after_its_ledger_write_is_rolled_forward(tmp_path, monkeypatch):
    run, root = make_run(tmp_path, finished=False)
    entry = run.entry("aaa111")

    def killed(self, staged, final):
        raise KeyboardInterrupt  # the driver dies between the ledger write and the rename

    monkeypatch.setattr(RunDir, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        run.commit("aaa111", dataclasses.replace(entry, step=8, state="done"), checkpoint=b"four", tables={"metrics": rows(7, 8)})
    monkeypatch.undo()
    assert RunDir.open(str(root)).entry("aaa111").commit_seq == 4  # committed ...
    assert steps_of(root) == [1, 2, 3, 4, 5, 6]  # ... but not yet visible: never a row that is not committed
    notes = RunDir.open(str(root)).recover()
    assert any("published committed metrics/case_id=aaa111/part-000004.parquet" in n for n in notes), notes
    assert steps_of(root) == list(range(1, 9))  # every row exactly once
    again = RunDir.open(str(root))
    assert again.verify() == []
    again.compact_metrics("aaa111")
    import analysis

    assert sorted(analysis.load(str(root)).metrics.query("case_id == 'aaa111'")["step"]) == list(range(1, 9))


# ---------------------------------------------------------------------- a second driver, before Ray


@pytest.mark.timeout(120)
def test_second_driver_is_refused_in_one_line_before_ray(tmp_path, cli):
    location = tmp_path / "old-run"
    run = make_existing_run(location)
    run.take_lease("the-first-driver")  # this process is alive: the lease is live
    before = tree_state(location)
    line = assert_refused(cli("run", "--resume", location), "is being run by pid", LOCK)
    assert str(os.getpid()) in line
    assert tree_state(location) == before
    # a new run at a folder another driver is creating
    fresh = tmp_path / "fresh"
    RunDir(str(fresh)).take_lease("creator")
    assert_refused(cli("run", write_suite(tmp_path), "--out", fresh), "is being run by pid")
    assert sorted(p.name for p in fresh.iterdir()) == [LOCK]


@pytest.mark.timeout(120)
def test_read_only_out_is_refused_before_ray_and_nothing_is_left(tmp_path, cli):
    if os.geteuid() == 0:
        if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_mkdir("/sys"):
            pytest.skip("no read-only folder available to root here")
        target = Path("/sys/bplab-test-run")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        target = parent / "run"
    result = cli("run", write_suite(tmp_path), "--out", target)
    assert_refused(result, str(target))
    assert not target.exists()


def _can_mkdir(folder: str) -> bool:
    probe = Path(folder) / f".bplab-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


@pytest.mark.timeout(60)
def test_unreachable_address_fails_within_a_bounded_time(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs", "run", str(write_suite(tmp_path)), "--address", "127.0.0.1:1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "127.0.0.1:1" in proc.stderr
    assert elapsed < 30, elapsed
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- a full disk


@pytest.mark.timeout(60)
def test_storage_error_stops_launching_new_cases_and_says_so_once(tmp_path, monkeypatch):
    import ray

    from jobs import driver as driver_module
    from jobs.plan import PlannedCase
    from jobs.suites import Case
    run = RunDir.create(str(tmp_path / "run"), {"suite": "faults"}, CASES + [case_row("ccc333", "c", SETTINGS)])
    settings = CaseSettings(data=DataSpec("digits"))
    planned = [PlannedCase(Case(c, c, settings), cid, 1.0, 0.0, 10, 10, settings.data)
               for cid, c in (("aaa111", "a"), ("bbb222", "b"), ("ccc333", "c"))]
    out = io.StringIO()
    driver = driver_module.Driver(run, planned, {}, out=out)
    killed = []
    monkeypatch.setattr(driver, "_kill", lambda state: killed.append(state.planned.name))
    monkeypatch.setattr(ray, "kill", lambda *a, **k: pytest.fail("no worker to stop"))
    running, waiting, other = (driver.cases[p.case_id] for p in planned)
    running.entry.state = "running"
    driver.queue = [waiting, other]  # waiting for a worker
    driver._fail_case(running, OSError(errno.ENOSPC, "No space left on device"))
    assert driver.storage_broken and "No space left" in driver.storage_broken
    assert killed == ["a"]
    driver._dispatch()  # hands out nothing (no Ray call either: nothing is stubbed for a new worker)
    assert driver.queue == [waiting, other] and not driver.workers
    assert run.entry("bbb222").state == "pending"  # withdrawn, not failed: a resume runs it
    driver._fail_case(running, OSError(errno.ENOSPC, "No space left on device"))
    assert out.getvalue().count("no new case is started") == 1
    assert driver_module.storage_is_broken(StorageError("x")) is False
    assert driver_module.storage_is_broken(OSError(errno.EACCES, "Permission denied")) is True


# ---------------------------------------------------------------------- one real run through the CLI


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_run_with_a_torn_part_is_repaired_and_resumed_to_the_same_rows(tmp_path):
    out = tmp_path / "run"
    first = bplab("run", "quick", "--only", "a", "--set", "epochs=1", "--set", "steps_per_epoch=4",
                   "--checkpoint-every", "2", "--progress-every", "0", "--no-report", "--out", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (out / LOCK).exists()
    columns = ["split", "epoch", "step", "cost", "accuracy"]
    original = pd.read_parquet(out / "metrics")[columns].sort_values(["split", "step"]).reset_index(drop=True)
    parts = sorted((out / "metrics").glob("case_id=*/part-*.parquet"))
    assert len(parts) == 2, parts
    cut(parts[-1])

    report = bplab("report", out, cwd=tmp_path)
    assert report.returncode == 2 and "Traceback" not in report.stderr
    assert len(report.stderr.strip().splitlines()) == 1 and parts[-1].name in report.stderr

    status = bplab("status", out, cwd=tmp_path)
    assert status.returncode == 0 and "rolled back to commit 1" in status.stdout, status.stdout + status.stderr

    resumed = bplab("run", "--resume", out, "--progress-every", "0", "--no-report", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = pd.read_parquet(out / "metrics")[columns].sort_values(["split", "step"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, original)  # every row once, the same numbers
    assert RunDir.open(str(out)).verify() == []


@pytest.mark.timeout(60)
def test_torn_schema_anchor_is_rebuilt_and_a_torn_cases_table_named(tmp_path, cli):
    run, root = make_run(tmp_path, finished=True)
    cut(root / "metrics" / "0-schema.parquet")
    assert_refused(cli("report", root), "metrics/0-schema.parquet")
    result = cli("status", root)
    assert result.code == 0 and "metrics/0-schema.parquet was damaged" in result.stdout, result.stdout + result.stderr
    assert steps_of(root) == list(range(1, 9))
    cut(root / "cases.parquet")
    before = tree_state(root)
    for command in ("status", "report"):
        assert_refused(cli(command, root), "cases.parquet")
    assert tree_state(root) == before


@pytest.mark.timeout(60)
def test_a_visible_uncommitted_part_is_reported_and_removed(tmp_path, cli):
    run, root = make_run(tmp_path, finished=False)
    folder = root / "metrics" / "case_id=aaa111"
    (folder / "part-000004.parquet").write_bytes((folder / "part-000003.parquet").read_bytes())  # as an older driver left it
    assert steps_of(root) == [1, 2, 3, 4, 5, 5, 6, 6]
    assert_refused(cli("report", root), "part-000004.parquet", "not committed")
    result = cli("status", root)
    assert result.code == 0 and "deleted uncommitted metrics/case_id=aaa111/part-000004.parquet" in result.stdout
    assert steps_of(root) == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(60)
def test_resume_of_a_run_with_an_unrecoverable_ledger_entry_is_one_line_before_ray(tmp_path, cli):
    location = tmp_path / "old-run"
    make_existing_run(location)
    for name in ("a-0123456789.json", ".a-0123456789.json.bak"):
        cut(location / "ledger" / name)
    assert_refused(cli("run", "--resume", location), "ledger/a-0123456789.json", "delete it")
    assert not (location / LOCK).exists()
