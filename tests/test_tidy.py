"""Tidy data: list columns stored as Parquet lists, a typed cases table, older runs still read.

The run here is real: a tiny MLP trained in-process by workers.trainer, its reports committed
with analysis.rundir.RunDir as the driver commits them (no Ray). Every check reads the files
back with plain pyarrow and plain pandas, not only with analysis.load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.rundir import LedgerEntry, RunDir
from tests.helpers import SETTINGS, case_rows, commit_report, train_reports


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two cases: mlp-wide (hidden 8,4; quirk on) and mlp-narrow (hidden 8; data.classes set)."""
    root = tmp_path_factory.mktemp("tidy") / "run"
    cases = {"mlp-wide": {**SETTINGS, "quirks": ["celu_derivative_two"]},
             "mlp-narrow": {**SETTINGS, "hidden": [8], "data": {"name": "moons", "samples": 200, "classes": [0, 1]}}}
    run = RunDir.create(str(root), {"suite": "tidy"}, case_rows(cases))
    for case_id, values in zip(run.case_ids(), cases.values()):
        for report in train_reports(values):
            commit_report(run, case_id, report)
    return root


@pytest.mark.timeout(240)
def test_updates_and_layers_are_lists_in_parquet(trained):
    table = pq.read_table(trained / "metrics" / "case_id=c0")
    assert table.schema.field("updates").type == pa.list_(pa.int64())
    assert table.schema.field("layers").type == pa.list_(pa.string())
    train = table.filter(pa.compute.equal(table["split"], "train")).to_pylist()
    assert len(train) == 6
    # mlp with hidden (8, 4): three dense units, each updated once per standard step
    assert all(row["updates"] == [1, 1, 1] for row in train)
    assert all(len(row["layers"]) == 3 and all(isinstance(n, str) for n in row["layers"]) for row in train)
    assert all(row["layer_updates"] == sum(row["updates"]) for row in train)
    # plain pandas: one list per row, no JSON to parse
    frame = pd.read_parquet(trained / "metrics")
    updates = frame.loc[frame["split"] == "train", "updates"]
    assert updates.map(lambda v: list(v)).map(len).tolist() == [3] * 6 + [2] * 6


@pytest.mark.timeout(240)
def test_cases_table_is_typed(trained):
    schema = pq.read_schema(trained / "cases.parquet")
    assert schema.field("hidden").type == pa.list_(pa.int64())
    assert schema.field("quirks").type == pa.list_(pa.string())
    assert schema.field("data.classes").type == pa.list_(pa.int64())
    # None in every case: a null of the setting's type, not float64
    assert schema.field("data.path").type == pa.string()
    assert schema.field("data.train_size").type == pa.int64()
    assert schema.field("lr").type == pa.float64() and schema.field("augment").type == pa.bool_()
    rows = {row["name"]: row for row in pq.read_table(trained / "cases.parquet").to_pylist()}
    assert rows["mlp-wide"]["hidden"] == [8, 4] and rows["mlp-narrow"]["hidden"] == [8]
    assert rows["mlp-wide"]["quirks"] == ["celu_derivative_two"] and rows["mlp-narrow"]["quirks"] == []
    assert rows["mlp-wide"]["data.classes"] is None and rows["mlp-narrow"]["data.classes"] == [0, 1]
    assert rows["mlp-wide"]["data.path"] is None and rows["mlp-wide"]["data.train_size"] is None
    frame = pd.read_parquet(trained / "cases.parquet").set_index("name")
    assert list(frame.at["mlp-wide", "hidden"]) == [8, 4]
    assert frame["data.path"].isna().all()


@pytest.mark.timeout(240)
def test_add_cases_keeps_the_types(trained, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    run = RunDir.open(str(copy))
    run.add_cases(case_rows({"x-a": SETTINGS, "x-b": SETTINGS, "x-c": {**SETTINGS, "hidden": [3, 3, 3]}})[2:])
    table = pq.read_table(copy / "cases.parquet")
    assert table.schema.field("hidden").type == pa.list_(pa.int64())
    assert table.column("hidden").to_pylist() == [[8, 4], [8], [3, 3, 3]]


@pytest.mark.timeout(240)
def test_load_joins_names_and_gives_tuples(trained):
    from analysis import load, update_counts

    data = load(trained)
    metrics = data.metrics
    assert list(metrics.columns[:3]) == ["case_id", "name", "group"]
    assert set(metrics["name"].astype(str)) == {"mlp-wide", "mlp-narrow"}
    assert (metrics["name"].astype(str) == metrics["case_id"].astype(str).map({"c0": "mlp-wide", "c1": "mlp-narrow"})).all()
    train = metrics[metrics["split"] == "train"]
    assert set(train["updates"]) == {(1, 1, 1), (1, 1)}
    cases = data.cases.set_index("name")
    assert cases.at["mlp-wide", "hidden"] == (8, 4) and cases.at["mlp-narrow", "data.classes"] == (0, 1)
    assert cases.groupby("hidden").size().to_dict() == {(8,): 1, (8, 4): 1}  # tuples group
    counts = update_counts(metrics, data.cases)
    assert counts.groupby("name")["mean_updates"].apply(list).to_dict() == {"mlp-narrow": [1.0, 1.0],
                                                                            "mlp-wide": [1.0, 1.0, 1.0]}
    # the README's one-liner: test accuracy per epoch per case name
    test = metrics[metrics["split"] == "test"]
    pivot = test.pivot_table(index="epoch", columns="name", values="accuracy", observed=True)
    raw = pd.read_parquet(trained / "metrics")
    expected = raw[(raw["split"] == "test") & (raw["case_id"].astype(str) == "c0")].sort_values("epoch")["accuracy"]
    assert pivot["mlp-wide"].tolist() == expected.tolist() and len(expected) == 2


@pytest.mark.timeout(120)
def test_older_runs_with_json_strings_still_load(tmp_path):
    """A run written before lists were lists: JSON strings and all-null float64 columns."""
    from analysis import load, update_counts

    root = tmp_path / "old"
    (root / "ledger").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    pq.write_table(pa.table({"case_id": ["k1"], "name": ["old"], "hidden": ["[50, 20]"], "quirks": ["[]"],
                             "data.path": pa.array([None], pa.float64()),
                             "data.train_size": pa.array([None], pa.float64())}), root / "cases.parquet")
    (root / "ledger" / "k1.json").write_text(json.dumps(LedgerEntry("k1", "old", state="done", commit_seq=1).to_dict()))
    (root / "metrics" / "case_id=k1").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"split": "train", "epoch": 0, "step": s, "cost": 1.0, "accuracy": 0.5, "updates": json.dumps([1, 2]),
         "layers": json.dumps(["a", "b"])} for s in range(3)]), root / "metrics" / "case_id=k1" / "part-000001.parquet")
    data = load(root)
    case = data.cases.iloc[0]
    assert case["hidden"] == (50, 20) and case["quirks"] == ()
    assert pd.isna(case["data.path"]) and pd.api.types.is_string_dtype(data.cases["data.path"])  # not float64
    assert pd.isna(case["data.train_size"])
    assert set(data.metrics["updates"]) == {(1, 2)} and set(data.metrics["layers"]) == {("a", "b")}
    counts = update_counts(data.metrics)
    assert counts["mean_updates"].tolist() == [1.0, 2.0] and counts["layer"].tolist() == ["a", "b"]


@pytest.mark.timeout(60)
def test_a_resumed_older_run_keeps_json_strings(tmp_path):
    """New list rows committed to a run whose schema stores updates as strings stay JSON."""
    run = RunDir.create(str(tmp_path / "run"), {}, [{"case_id": "k1", "name": "k"}])
    row = {"split": "train", "epoch": 0, "step": 0, "cost": 1.0}
    run.commit("k1", run.entry("k1"), tables={"metrics": [{**row, "updates": "[1, 1]"}]})
    run.commit("k1", run.entry("k1"), tables={"metrics": [{**row, "step": 1, "updates": [2, 2]}]})
    table = pq.read_table(tmp_path / "run" / "metrics")
    assert table.column("updates").to_pylist() == ["[1, 1]", "[2, 2]"]
    # a list column whose first commit held only empty lists takes the later element type
    run2 = RunDir.create(str(tmp_path / "run2"), {}, [{"case_id": "k1", "name": "k"}])
    run2.commit("k1", run2.entry("k1"), tables={"metrics": [{**row, "tags": []}]})
    run2.commit("k1", run2.entry("k1"), tables={"metrics": [{**row, "step": 1, "tags": ["x"]}]})
    frame = pd.read_parquet(tmp_path / "run2" / "metrics")
    assert [list(v) for v in frame.sort_values("step")["tags"]] == [[], ["x"]]
    assert np.all(pq.read_schema(tmp_path / "run2" / "metrics" / "0-schema.parquet").field("tags").type
                  == pa.list_(pa.string()))
