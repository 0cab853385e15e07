"""Runs written before the manifest had a format_version are read as version 1 by
analysis.rundir.legacy: analysis.load, `bplab runs`, `bplab report` and `bplab tensorboard` on
tests/fixtures/run-v1 (written by the code before analysis.rundir existed: case `done` finished
with its last commit's part still under its staged name, case `cut` cut by a SIGKILLed driver).
`bplab status` and `bplab run --resume` on the same fixture: tests/test_ids.py.

The oracle for the rows is the fixture's own files read with plain json and pyarrow: the
parts each ledger entry records as committed, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.rundir import FORMAT_VERSION, RunDir, StorageError
from tests.helpers import copy_old_run

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-v1"


@pytest.fixture
def old_run(tmp_path) -> Path:
    return copy_old_run(tmp_path)


def committed_rows(run: Path) -> dict[str, pa.Table]:
    """case name -> its committed metrics rows, from the ledger's record of each commit's part
    (published as part-N, or still staged as .staged-part-N after the kill)."""
    out = {}
    for path in sorted((run / "ledger").glob("*.json")):
        entry = json.loads(path.read_text())
        folder = run / "metrics" / f"case_id={entry['case_id']}"
        tables = []
        for seq, rows in sorted(entry["parts"]["metrics"].items(), key=lambda kv: int(kv[0])):
            name = f"part-{int(seq):06d}.parquet"
            file = folder / name if (folder / name).exists() else folder / f".staged-{name}"
            table = pq.read_table(file)
            assert table.num_rows == rows
            tables.append(table)
        out[entry["name"]] = pa.concat_tables(tables, promote_options="permissive")
    return out


@pytest.mark.timeout(60)
def test_the_fixture_is_version_1():
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assert "format_version" not in manifest
    assert RunDir.open(str(FIXTURE)).format_version() == 1 < FORMAT_VERSION
    # the kill left case done's last committed part unpublished: a plain reader misses it
    assert (FIXTURE / "metrics" / "case_id=done-a1392ffdd5" / ".staged-part-000004.parquet").exists()
    assert not (FIXTURE / "metrics" / "case_id=done-a1392ffdd5" / "part-000004.parquet").exists()


@pytest.mark.timeout(60)
def test_load_reads_every_committed_row_of_an_old_run(old_run):
    from analysis import load

    expected = committed_rows(old_run)
    data = load(old_run)
    assert data.manifest["suite"] == "fixture-v1"
    assert dict(zip(data.cases["name"], data.cases["state"])) == {"done": "done", "cut": "running"}
    for name, table in expected.items():
        mine = data.metrics[data.metrics["name"] == name].sort_values(["step", "split"]).reset_index(drop=True)
        theirs = table.to_pandas().sort_values(["step", "split"]).reset_index(drop=True)
        assert len(mine) == len(theirs) and len(mine) > 0, name
        for column in ("step", "epoch", "cost", "accuracy", "wall_time"):
            assert mine[column].tolist() == pytest.approx(theirs[column].tolist(), nan_ok=True), (name, column)
        assert mine["split"].astype(str).tolist() == theirs["split"].tolist()
    # the staged part of `done` is committed (its ledger says so): read, and not only by this reader
    assert len(data.metrics[data.metrics["name"] == "done"]) == 81
    # the other datasets: weights of both cases, the boundary grid of the finished one, no alignment yet
    assert set(data.weights["name"].astype(str)) == {"done", "cut"}
    assert set(data.boundary["name"].astype(str)) == {"done"} and len(data.boundary) == 120 * 120
    assert data.alignment.empty and {"case_id", "step", "unit", "quantity"} <= set(data.alignment.columns)
    # list columns as tuples, settings typed
    assert {len(v) for v in data.metrics.loc[data.metrics["split"] == "train", "updates"]} == {2}
    assert set(data.cases["hidden"]) == {(3,), (4,)}


@pytest.mark.timeout(60)
def test_runs_lists_an_old_run(old_run, capsys):
    from jobs.cli import main

    assert main(["runs", str(old_run.parent)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[:2] == ["run-v1", "fixture-v1"]
    assert "1 done" in line and "1 interrupted" in line and f"bplab run --resume {old_run}" in line


@pytest.mark.timeout(240)
def test_report_and_tensorboard_of_an_old_run(old_run, tmp_path):
    from analysis.tensorboard import export
    from jobs.cli import main

    expected = committed_rows(old_run)
    assert main(["report", str(old_run), "--out", str(tmp_path / "report")]) == 0
    table = pd.read_csv(tmp_path / "report" / "per_case.csv").set_index("name")
    test = expected["done"].to_pandas().query("split == 'test'")  # only `done` got as far as a test row
    assert len(test) == 1 and table.loc["done", "final_test_acc"] == pytest.approx(test["accuracy"].iloc[0])
    assert table.loc["cut", "state"] in ("running", "interrupted") and pd.isna(table.loc["cut", "final_test_acc"])
    # the boundary grid `done` stored is drawn (read as data.boundary, like every dataset)
    assert (tmp_path / "report" / "decision_boundaries.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {r.name: r for r in export(old_run, tmp_path / "board")}
    for name, rows in expected.items():
        train = rows.to_pandas().query("split == 'train'")
        assert results[name].train_steps == len(train), name


@pytest.mark.timeout(60)
def test_a_run_from_a_newer_bplab_is_refused_in_one_line(old_run, capsys):
    from jobs.cli import main

    manifest = json.loads((old_run / "manifest.json").read_text())
    (old_run / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(StorageError, match="newer bplab"):
        RunDir.open(str(old_run))
    assert main(["status", str(old_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "newer bplab" in err


@pytest.mark.timeout(60)
def test_tables_take_older_runs_list_text_through_the_legacy_reader():
    """A frame read straight from an older run's Parquet holds lists as JSON text; the tables
    read them as lists (analysis.rundir.legacy.as_list), like the tuples analysis.load gives."""
    from analysis.flags import chance_accuracy
    from analysis.labels import as_sequence
    from analysis.tables import update_counts

    raw = pd.DataFrame({"case_id": ["k1"] * 2, "split": ["train"] * 2, "step": [0, 1],
                        "updates": ["[1, 2]", "[3, 2]"], "layers": ['["a", "b"]'] * 2})
    counts = update_counts(raw)
    assert counts["layer"].tolist() == ["a", "b"] and counts["mean_updates"].tolist() == [2.0, 2.0]
    cases = pd.DataFrame({"data.name": ["digits", "digits", "moons"], "data.classes": ["[3, 5, 8]", None, "null"]})
    assert chance_accuracy(cases).tolist() == pytest.approx([1 / 3, 1 / 10, 1 / 2])
    assert as_sequence("[64, 64]") == [64, 64] and as_sequence((8,)) == [8] and as_sequence("relu") == "relu"
