"""analysis: numbers checked against values worked out by hand from a tiny run written here.

The run (see make_run): six cases, 2 train steps per epoch, 3 epochs, one test row per epoch.

    case   group seed state    test acc by epoch   train acc by epoch (2 steps each)
    a-s1   a     1    done     .50 .70 .65         [.5 .6] [.7 .8] [.9 .7]
    a-s2   a     2    done     .55 .60 .80         [.5 .5] [.6 .7] [.8 1.]
    b-s1   b     1    done     .60 .80 .90         [.4 .6] [.7 .7] [.95 .85]
    b-s2   b     2    done     .40 .85 .70         [.3 .5] [.6 .8] [.75 .85]
    c-s1   c     1    failed   .30                 [.2 .4] [.5]      (died in epoch 1)
    d-s1   d     1    pending  (no metrics)
    e-s3   e     3    done     .60 .70 .75         [.5 .5] [.6 .6] [.7 .7]

Train step k (global, 0-based) ends at wall_time 1000 + 2k; the test row of epoch e ends at
1003 + 4e (one second after the epoch's last step). cost = 1 - accuracy (train), and
1.05 - accuracy (test). lr of step k = .01 (epoch + 1) + .001 (k mod 2).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from matplotlib.figure import Figure

import analysis
from analysis import (
    against_baseline,
    epoch_summary,
    factor_table,
    load,
    markdown_table,
    per_case,
    plot_curves,
    plot_decision_boundary,
    plot_layer_stats,
    plot_update_counts,
    plot_weight_histograms,
    reference_comparison,
    seed_summary,
    update_counts,
    write_report,
)

T_975_1 = 12.706204736174707  # t distribution, 97.5 % quantile, 1 degree of freedom (tables: 12.706)

CASES = {
    # name: (case_id, group, seed, state, schedule, augment, test acc, train acc per epoch)
    "a-s1": ("c0a1", "a", 1, "done", "standard", False, [.50, .70, .65], [[.5, .6], [.7, .8], [.9, .7]]),
    "a-s2": ("c0a2", "a", 2, "done", "standard", False, [.55, .60, .80], [[.5, .5], [.6, .7], [.8, 1.0]]),
    "b-s1": ("c0b1", "b", 1, "done", "unfair-back", True, [.60, .80, .90], [[.4, .6], [.7, .7], [.95, .85]]),
    "b-s2": ("c0b2", "b", 2, "done", "unfair-back", True, [.40, .85, .70], [[.3, .5], [.6, .8], [.75, .85]]),
    "c-s1": ("c0c1", "c", 1, "failed", "unfair-back", False, [.30], [[.2, .4], [.5]]),
    "d-s1": ("c0d1", "d", 1, "pending", "standard", True, [], []),
    "e-s3": ("c0e3", "e", 3, "done", "standard", False, [.60, .70, .75], [[.5, .5], [.6, .6], [.7, .7]]),
}
ID = {name: spec[0] for name, spec in CASES.items()}


def _metric_rows(schedule: str, test_acc: list, train_acc: list) -> list[dict]:
    rows, step = [], 0
    for epoch, batch_accuracies in enumerate(train_acc):
        for accuracy in batch_accuracies:
            # unfair-back: layer l1 is updated on even steps only, l2 twice every step.
            updates = [1, 1] if schedule == "standard" else ([1, 2] if step % 2 == 0 else [0, 2])
            rows.append({
                "split": "train", "epoch": epoch, "step": step, "cost": 1 - accuracy, "accuracy": accuracy,
                "lr": 0.01 * (epoch + 1) + 0.001 * (step % 2), "stages": 1, "layer_updates": sum(updates),
                "forward_passes": 1, "examples": 10, "examples_per_sec": 5.0, "wall_time": 1000.0 + 2 * step,
                "updates": json.dumps(updates), "layers": json.dumps(["l1", "l2"]),
            })
            step += 1
        if epoch < len(test_acc):
            rows.append({
                "split": "test", "epoch": epoch, "step": step, "cost": 1.05 - test_acc[epoch],
                "accuracy": test_acc[epoch], "wall_time": 1003.0 + 4 * epoch,
            })
    return rows


METRICS_TYPES = pa.schema([
    ("split", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()), ("cost", pa.float64()),
    ("accuracy", pa.float64()), ("lr", pa.float64()), ("stages", pa.int64()), ("layer_updates", pa.int64()),
    ("forward_passes", pa.int64()), ("examples", pa.int64()), ("examples_per_sec", pa.float64()),
    ("wall_time", pa.float64()), ("updates", pa.string()), ("layers", pa.string()),
])


def make_run(root: Path, suite: str = "toy", ids: dict | None = None, with_metrics: bool = True) -> Path:
    """Write the run of the module docstring as the driver would (hive-partitioned Parquet)."""
    ids = ids or ID
    root.mkdir(parents=True)
    (root / "ledger").mkdir()
    manifest = {"suite": suite, "bplab_version": "0.1.0", "git_commit": "abc1234", "git_dirty": False,
                "versions": {"python": "3.11", "tensorflow": "2.21"}, "data_fingerprints": {"cifar10": "f00d"},
                "created_at": "2026-01-01T00:00:00Z", "reference": "unfair"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    case_rows = []
    for name, (_, group, seed, state, schedule, augment, test_acc, train_acc) in CASES.items():
        case_id = ids[name]
        case_rows.append({"case_id": case_id, "name": name, "group": group, "seed": seed, "model": "mlp",
                          "width": 1.0, "schedule": schedule, "engine": "manual", "augment": augment,
                          "optimizer": "adam", "lr": 1e-4, "batch_size": 10, "epochs": 3, "data.name": "moons",
                          "quirks": "[]"})
        ledger = {"case_id": case_id, "name": name, "state": state, "epoch": len(test_acc), "step": 0,
                  "commit_seq": 1, "attempts": 1, "node": "n1", "gpu": None, "latest": {"test_accuracy": None},
                  "updated_at": "2026-01-01T00:00:00Z",
                  "reason_class": "oom" if state == "failed" else None,
                  "reason": "CUDA out of memory" if state == "failed" else None, "diverged_step": None}
        (root / "ledger" / f"{case_id}.json").write_text(json.dumps(ledger))
        rows = _metric_rows(schedule, test_acc, train_acc)
        if rows and with_metrics:
            folder = root / "metrics" / f"case_id={case_id}"
            folder.mkdir(parents=True)
            # two commits: epoch 0, then the rest
            first = [r for r in rows if r["epoch"] == 0]
            rest = [r for r in rows if r["epoch"] > 0]
            for number, part in enumerate((first, rest), start=1):
                if part:
                    pq.write_table(pa.Table.from_pylist(part, schema=METRICS_TYPES),
                                   folder / f"part-{number:06d}.parquet")
        if state == "done" and with_metrics:
            folder = root / "weights" / f"case_id={case_id}"
            folder.mkdir(parents=True)
            for phase, scale in (("before", 0.05), ("after", 0.2)):
                hist = [{"phase": phase, "layer": layer, "param": param, "bin": b, "left": scale * (b - 2),
                         "right": scale * (b - 1), "count": [1, 5, 5, 1][b]}
                        for layer in ("l1", "l2") for param in ("w", "b") for b in range(4)]
                pq.write_table(pa.Table.from_pylist(hist), folder / f"part-{phase}.parquet")
    pq.write_table(pa.Table.from_pylist(case_rows), root / "cases.parquet")
    if with_metrics:
        folder = root / "layer_stats" / f"case_id={ids['a-s1']}"
        folder.mkdir(parents=True)
        stats_rows = [{"step": s, "epoch": s // 2, "layer": layer, "quantity": q, "mean": 0.1 * s, "std": 0.05,
                       "min": -1.0, "max": 1.0, "hist": "[1,2,1]", "edges": "[-1,0,0.5,1]"}
                      for s in (0, 2, 4) for layer in ("l1", "l2") for q in ("weights", "act")]
        pq.write_table(pa.Table.from_pylist(stats_rows), folder / "part-000001.parquet")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "toy")


@pytest.fixture(scope="module")
def data(run):
    return load(run)


@pytest.fixture(scope="module")
def table(data):
    return per_case(data.metrics, data.cases, target_accuracy=0.75)


def row(frame: pd.DataFrame, name: str) -> pd.Series:
    rows = frame[frame["name"] == name]
    assert len(rows) == 1, f"{name}: {len(rows)} rows"
    return rows.iloc[0]


# ---- load -----------------------------------------------------------------------------------


def test_load_reads_every_table(data):
    assert set(data.cases["case_id"]) == set(ID.values())
    assert data.manifest["suite"] == "toy"
    # 6 train rows + 3 test rows per complete case; c: 3 train + 1 test; d: none.
    assert len(data.metrics) == 4 * 9 + 9 + 4
    assert set(data.metrics["case_id"].astype(str)) == set(ID.values()) - {ID["d-s1"]}
    assert all(isinstance(c, str) for c in data.metrics["case_id"].cat.categories)
    assert data.cases["case_id"].map(type).eq(str).all()
    assert len(data.ledger) == len(CASES)
    assert "latest.test_accuracy" in data.ledger
    assert len(data.weights) == 5 * 2 * 2 * 2 * 4  # done cases x phases x layers x params x bins
    assert len(data.layer_stats) == 12


def test_unfinished_cases_are_kept_and_flagged(data, table):
    states = data.cases.set_index("name")["state"]
    assert states["c-s1"] == "failed" and states["d-s1"] == "pending"
    assert not data.cases.set_index("name").loc[["c-s1", "d-s1"], "complete"].any()
    assert data.cases.set_index("name").loc[["a-s1", "b-s2"], "complete"].all()
    assert set(data.not_done["name"]) == {"c-s1", "d-s1"}
    assert row(data.not_done, "c-s1")["reason_class"] == "oom"
    # in the per-case table too, with no numbers for the pending case
    assert row(table, "c-s1")["state"] == "failed" and not row(table, "c-s1")["complete"]
    assert row(table, "d-s1")["state"] == "pending" and math.isnan(row(table, "d-s1")["final_test_acc"])
    assert row(table, "d-s1")["epochs"] == 0
    assert len(table) == len(CASES)


def test_pyarrow_dataset_and_pandas_read_the_same_rows(run, data):
    order = ["case_id", "split", "step"]

    def tidy(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        for column in frame.columns:
            if isinstance(frame[column].dtype, pd.CategoricalDtype) or frame[column].dtype == object:
                frame[column] = frame[column].astype(str)
        return frame.sort_values(order).reset_index(drop=True)[sorted(frame.columns)]

    by_pandas = tidy(pd.read_parquet(run / "metrics"))
    by_dataset = tidy(ds.dataset(run / "metrics", format="parquet", partitioning="hive").to_table().to_pandas())
    # load adds the case name and group and gives list columns as tuples (this run stores JSON)
    ours = data.metrics.drop(columns=["name", "group"])
    ours = tidy(ours.assign(**{c: ours[c].astype(object).map(lambda v: json.dumps(list(v)) if isinstance(v, tuple) else v) for c in ("updates", "layers")}))
    assert len(ours) == len(by_pandas) == len(by_dataset) == 49
    pd.testing.assert_frame_equal(ours, by_pandas, check_dtype=False)
    pd.testing.assert_frame_equal(ours, by_dataset, check_dtype=False)


def test_load_from_a_file_uri_and_with_few_columns(run, data):
    from_uri = load(run.resolve().as_uri())
    assert len(from_uri.metrics) == len(data.metrics)
    assert from_uri.manifest == data.manifest
    few = load(str(run), metrics_columns=analysis.PER_CASE_COLUMNS, splits=["test"], weights=False)
    assert set(few.metrics.columns) == {"case_id", "name", "group", *analysis.PER_CASE_COLUMNS}
    assert set(few.metrics["split"].astype(str)) == {"test"} and len(few.metrics) == 5 * 3 + 1
    assert few.weights.empty and "count" in few.weights


def test_tables_from_the_reduced_columns_agree(run, data, table):
    lean = load(run, metrics_columns=analysis.PER_CASE_COLUMNS, weights=False, layer_stats=False)
    pd.testing.assert_frame_equal(per_case(lean.metrics, lean.cases, target_accuracy=0.75), table)
    medium = load(run, metrics_columns=analysis.TABLE_COLUMNS, weights=False, layer_stats=False)
    pd.testing.assert_frame_equal(epoch_summary(medium.metrics), epoch_summary(data.metrics))
    assert epoch_summary(lean.metrics)["lr"].isna().all()  # no lr column read: NaN, not an error


def test_all_digit_case_ids_stay_strings(tmp_path):
    ids = {name: f"00{i}" for i, name in enumerate(CASES)}  # pandas' own reader would make these ints
    data = load(make_run(tmp_path / "digits", ids=ids))
    assert set(data.metrics["case_id"].astype(str)) == set(ids.values()) - {ids["d-s1"]}
    table = per_case(data.metrics, data.cases)
    assert row(table, "a-s1")["case_id"] == "000"
    assert row(table, "a-s1")["final_test_acc"] == pytest.approx(0.65)


def test_a_run_without_metrics_gives_empty_frames(tmp_path):
    data = load(make_run(tmp_path / "fresh", with_metrics=False))
    assert data.metrics.empty and {"case_id", "split", "epoch", "step", "accuracy"} <= set(data.metrics.columns)
    assert data.weights.empty and data.layer_stats.empty
    table = per_case(data.metrics, data.cases)
    assert len(table) == len(CASES) and table["final_test_acc"].isna().all()
    assert epoch_summary(data.metrics).empty


def test_a_part_with_all_null_columns(tmp_path):
    """A commit holding only test rows stores the train-only columns as type null."""
    root = make_run(tmp_path / "nulls")
    folder = root / "metrics" / f"case_id={ID['a-s1']}"
    pq.write_table(pa.Table.from_pylist([{"split": "test", "epoch": 3, "step": 8, "cost": 0.1, "accuracy": 0.95,
                                          "lr": None, "examples": None, "wall_time": 1020.0, "updates": None}]),
                   folder / "part-000000.parquet")  # sorts first: its schema would be taken as the dataset's
    data = load(root)
    assert pa.types.is_null(pq.read_schema(folder / "part-000000.parquet").field("lr").type)
    assert data.metrics["lr"].notna().sum() == 4 * 6 + 3 + 6
    assert row(per_case(data.metrics, data.cases), "a-s1")["final_test_acc"] == pytest.approx(0.95)


def test_load_two_runs_together(tmp_path, run):
    other = make_run(tmp_path / "other", suite="toy-2")
    data = load([run, other])
    assert list(data.manifests) == ["toy", "other"]
    assert data.metrics["run"].nunique() == 2 and len(data.metrics) == 2 * 49
    assert len(data.cases) == 2 * len(CASES)
    # case ids repeat across the runs; (run, case_id) is the key
    table = per_case(data.metrics, data.cases)
    assert len(table) == 2 * len(CASES)
    assert table.groupby("run").size().to_dict() == {"toy": len(CASES), "other": len(CASES)}
    assert row(table[table["run"] == "other"], "b-s2")["best_test_acc"] == pytest.approx(0.85)
    seeds = seed_summary(table)
    assert len(seeds) == 2 * 5 and {"run", "group"} <= set(seeds.columns)
    labelled = load({"first": run, "second": other})
    assert labelled.runs == ["first", "second"]


@pytest.mark.timeout(60)
def test_boundary_grids_are_read_on_first_access(tmp_path, monkeypatch):
    """load leaves the decision-boundary grids on disk until data.boundary is read; then it
    gives the committed grids (written here with pyarrow alone), also for two runs together."""
    load_module = importlib.import_module("analysis.load")  # (analysis.load is also the function)

    runs = [make_run(tmp_path / "one"), make_run(tmp_path / "two", suite="toy-2")]
    grids = {}
    for number, root in enumerate(runs):
        for name in ("a-s1", "b-s2"):
            x = np.linspace(-1.0, 1.0, 5)
            p1 = (x + 1.0) / (2.0 + number)
            grids[(root.name, ID[name])] = p1
            folder = root / "boundary" / f"case_id={ID[name]}"
            folder.mkdir(parents=True)
            pq.write_table(pa.table({"x0": x, "x1": -x, "p1": p1, "label": (p1 >= 0.5).astype(np.int64)}),
                           folder / "part-final.parquet")
    read = []
    real = load_module._read_dataset
    monkeypatch.setattr(load_module, "_read_dataset", lambda run, kind, *a, **k: read.append(kind) or real(run, kind, *a, **k))

    one = load(runs[0])
    assert "boundary" not in read and "metrics" in read
    grid = one.boundary
    assert read.count("boundary") == 1
    assert one.boundary is grid and read.count("boundary") == 1  # read once, then kept
    assert list(grid.columns[:3]) == ["case_id", "name", "group"]
    for case_id, rows in grid.groupby("case_id", observed=True):
        np.testing.assert_allclose(rows["p1"].to_numpy(), grids[("one", str(case_id))])
        np.testing.assert_allclose(rows["x1"].to_numpy(), -np.linspace(-1.0, 1.0, 5))
    assert set(grid["name"].astype(str)) == {"a-s1", "b-s2"}

    read.clear()
    both = load(runs)
    assert "boundary" not in read
    assert both.dataset("boundary").groupby(["run", "case_id"], observed=True).size().to_dict() == {
        (label, ID[name]): 5 for label in ("one", "two") for name in ("a-s1", "b-s2")}
    for (label, case_id), rows in both.boundary.groupby(["run", "case_id"], observed=True):
        np.testing.assert_allclose(rows["p1"].to_numpy(), grids[(label, str(case_id))])
    assert load(runs[0], datasets=[]).boundary.empty  # not asked for: empty, with the columns
    assert list(load(runs[0], datasets=[]).boundary.columns) == ["case_id", "x0", "x1", "p1", "label"]


# ---- tables ---------------------------------------------------------------------------------


def test_per_case_numbers(table):
    expected = {
        # name: final test, best test, best epoch (numbered from 1), final train, gap, epochs to .75
        "a-s1": (.65, .70, 2, (.9 + .7) / 2, .80 - .65, math.nan),
        "a-s2": (.80, .80, 3, (.8 + 1.0) / 2, .90 - .80, 3),
        "b-s1": (.90, .90, 3, (.95 + .85) / 2, .90 - .90, 2),
        "b-s2": (.70, .85, 2, (.75 + .85) / 2, .80 - .70, 2),
        "c-s1": (.30, .30, 1, .5, .5 - .3, math.nan),
        "e-s3": (.75, .75, 3, .7, .7 - .75, 3),
    }
    for name, (final, best, best_epoch, train, gap, to_target) in expected.items():
        got = row(table, name)
        assert got["final_test_acc"] == pytest.approx(final), name
        assert got["best_test_acc"] == pytest.approx(best), name
        assert got["best_epoch"] == best_epoch, name
        assert got["final_train_acc"] == pytest.approx(train), name
        assert got["gap"] == pytest.approx(gap, abs=1e-12), name
        assert got["epochs_to_target"] == pytest.approx(to_target, nan_ok=True), name
    # 6 steps ending 2 s apart: 5 intervals in 10 s; the last test row ends at 1011
    done = row(table, "a-s1")
    assert done["steps"] == 6 and done["steps_per_sec"] == pytest.approx(5 / 10)
    assert done["examples_per_sec"] == pytest.approx(5 / 10 * 10)
    assert done["wall_seconds"] == pytest.approx(1011 - 1000)
    assert done["epochs"] == 3 and done["final_test_cost"] == pytest.approx(1.05 - .65)
    failed = row(table, "c-s1")  # steps 0, 1, 2 at 1000, 1002, 1004
    assert failed["steps"] == 3 and failed["steps_per_sec"] == pytest.approx(2 / 4)
    assert failed["epochs"] == 1 and failed["last_epoch"] == 2  # train rows in its second epoch


def test_per_case_with_a_ledger_overrides_state(data):
    ledger = data.ledger.copy()
    ledger.loc[ledger["name"] == "a-s1", "state"] = "diverged"
    table = per_case(data.metrics, data.cases.drop(columns=["state", "complete"]), ledger=ledger)
    assert row(table, "a-s1")["state"] == "diverged" and not row(table, "a-s1")["complete"]
    assert row(table, "a-s2")["state"] == "done"


def test_epoch_summary_numbers(data):
    epochs = epoch_summary(data.metrics, data.cases)  # epochs numbered from 1: stored epoch + 1
    one = epochs[(epochs["name"] == "a-s1") & (epochs["epoch"] == 2)].iloc[0]
    assert one["train_accuracy"] == pytest.approx((.7 + .8) / 2)
    assert one["train_cost"] == pytest.approx(1 - (.7 + .8) / 2)
    assert one["test_accuracy"] == pytest.approx(.70) and one["test_cost"] == pytest.approx(1.05 - .70)
    assert one["lr"] == pytest.approx(.02 + .001)  # the epoch's last step (odd)
    assert one["steps"] == 2 and one["step"] == 4
    assert one["wall_seconds"] == pytest.approx(1007 - 1003)  # end of epoch 2 - end of epoch 1
    first = epochs[(epochs["name"] == "a-s1") & (epochs["epoch"] == 1)].iloc[0]
    assert first["wall_seconds"] == pytest.approx(1003 - 1000)
    last = epochs[(epochs["name"] == "a-s1") & (epochs["epoch"] == 3)].iloc[0]
    assert last["elapsed"] == pytest.approx(1011 - 1000)
    assert {"group", "seed", "schedule"} <= set(epochs.columns)
    assert len(epochs[epochs["name"] == "c-s1"]) == 2  # epoch 2 has train rows but no test row
    assert math.isnan(epochs[(epochs["name"] == "c-s1") & (epochs["epoch"] == 2)].iloc[0]["test_accuracy"])


def test_seed_summary_mean_and_ci(table):
    seeds = seed_summary(table).set_index("group")
    # group a, final test .65 and .80
    mean = (.65 + .80) / 2
    sd = math.sqrt(((.65 - mean) ** 2 + (.80 - mean) ** 2) / (2 - 1))
    assert sd == pytest.approx(0.0707 * 1.5, rel=1e-3)  # = .106
    assert seeds.loc["a", "n"] == 2
    assert seeds.loc["a", "final_test_acc_mean"] == pytest.approx(.725)
    assert seeds.loc["a", "final_test_acc_sd"] == pytest.approx(sd)
    assert seeds.loc["a", "final_test_acc_ci95"] == pytest.approx(T_975_1 * sd / math.sqrt(2))
    # a worked example: .8 and .9 -> mean .85, sd .0707, half-width 12.706 * .0707 / sqrt 2
    assert seeds.loc["b", "final_train_acc_mean"] == pytest.approx(.85)
    assert seeds.loc["b", "final_train_acc_sd"] == pytest.approx(0.070711, rel=1e-4)
    assert seeds.loc["b", "final_train_acc_ci95"] == pytest.approx(12.706 * 0.070711 / math.sqrt(2), rel=1e-4)
    assert seeds.loc["b", "best_test_acc_mean"] == pytest.approx((.90 + .85) / 2)
    # one seed: no interval; no complete case: n = 0, still listed
    assert seeds.loc["e", "n"] == 1 and math.isnan(seeds.loc["e", "final_test_acc_ci95"])
    assert seeds.loc["c", "n"] == 0 and math.isnan(seeds.loc["c", "final_test_acc_mean"])
    assert seeds.loc["d", "n"] == 0


def test_against_baseline_pairs_by_seed(table, data):
    result = against_baseline(table, data.cases, baseline="a").set_index("group")
    differences = [.90 - .65, .70 - .80]  # b - a at seeds 1 and 2
    mean = sum(differences) / 2
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 1)
    assert result.loc["b", "n_pairs"] == 2
    assert result.loc["b", "diff_mean"] == pytest.approx(.075)
    assert result.loc["b", "diff_ci95"] == pytest.approx(T_975_1 * sd / math.sqrt(2))
    assert result.loc["b", "baseline_mean"] == pytest.approx(.725)
    # e has seed 3, which the baseline lacks: no pair
    assert result.loc["e", "n_pairs"] == 0 and math.isnan(result.loc["e", "diff_mean"])
    assert "a" not in result.index
    # a failed case is left out by default, paired when asked for
    assert result.loc["c", "n_pairs"] == 0
    detail = against_baseline(table, data.cases, baseline="a", complete_only=False, detail=True)
    assert row(detail, "c-s1")["diff"] == pytest.approx(.30 - .65)
    assert math.isnan(row(detail, "e-s3")["diff"]) and math.isnan(row(detail, "d-s1")["diff"])
    # a case name as baseline: pairs with its seed only
    by_case = against_baseline(table, data.cases, baseline="a-s1").set_index("group")
    assert by_case.loc["b", "n_pairs"] == 1 and by_case.loc["b", "diff_mean"] == pytest.approx(.25)
    assert math.isnan(by_case.loc["b", "diff_ci95"])
    with pytest.raises(ValueError, match="neither a group nor a case"):
        against_baseline(table, data.cases, baseline="zzz")


def test_factor_table(table, data):
    pivot = factor_table(table, data.cases, rows="schedule", columns="augment")
    assert pivot.loc["standard", False] == pytest.approx((.65 + .80 + .75) / 3)
    assert pivot.loc["unfair-back", True] == pytest.approx((.90 + .70) / 2)
    assert math.isnan(pivot.loc["unfair-back", False])  # only the failed case c
    best = factor_table(table, data.cases, value="best_test_acc")
    assert best.loc["unfair-back", True] == pytest.approx((.90 + .85) / 2)


def test_reference_comparison(table):
    comparison = reference_comparison(table, "unfair").set_index("case")
    assert list(comparison.index) == ["a", "b", "c", "d", "e", "f"]
    assert comparison.loc["a", "source_final_test"] == pytest.approx(.8333)
    assert comparison.loc["a", "run_final_test"] == pytest.approx(.725)
    assert comparison.loc["a", "diff"] == pytest.approx(.725 - .8333)
    assert comparison.loc["a", "source_best_test"] == pytest.approx(.8388)
    assert comparison.loc["a", "run_train"] == pytest.approx((.8 + .9) / 2)
    assert math.isnan(comparison.loc["b", "source_best_test"])
    assert math.isnan(comparison.loc["f", "run_final_test"]) and comparison.loc["f", "n"] == 0
    assert comparison.loc["c", "state"] == "failed"
    expected = ["source_final_test", "run_final_test", "diff", "source_best_test", "run_best_test", "source_train",
                "run_train"]
    assert list(comparison.columns[:7]) == expected
    assert reference_comparison(table, "adversarial")["source_best_test"].tolist() == [.9941, .7351, .7419]
    assert reference_comparison(table, "dcn")["source_final_test"].tolist() == [.9869]
    with pytest.raises(KeyError):
        reference_comparison(table, "nope")


def test_update_counts(data):
    counts = update_counts(data.metrics, data.cases)
    b = counts[counts["name"] == "b-s1"].set_index("layer")["mean_updates"]
    assert b["l1"] == pytest.approx(0.5) and b["l2"] == pytest.approx(2.0)  # [1,2] and [0,2] alternate
    a = counts[counts["name"] == "a-s1"].set_index("layer")
    assert a["mean_updates"].tolist() == [1.0, 1.0] and a["steps"].tolist() == [6, 6]
    assert counts[counts["name"] == "c-s1"]["steps"].tolist() == [3, 3]  # steps 0, 1, 2: l1 = 2/3
    assert counts[counts["name"] == "c-s1"]["mean_updates"].tolist() == pytest.approx([2 / 3, 2.0])
    assert counts[counts["name"] == "b-s1"]["layer_index"].tolist() == [0, 1]


def test_aggregate_matches_pandas_groupby():
    """The numpy grouped pass behind the tables agrees with pandas, nulls included."""
    from analysis.groupby import aggregate

    rng = np.random.default_rng(0)
    n = 5000
    frame = pd.DataFrame({
        "case_id": pd.Categorical(rng.choice(["x", "y", "z"], n)),
        "split": rng.choice(["train", "test"], n),
        "epoch": rng.integers(0, 4, n),
        "value": np.where(rng.random(n) < 0.2, np.nan, rng.random(n)),
        "step": np.arange(n),
    })
    where = (frame["split"] == "train").to_numpy()
    specs = {"mean": ("value", "mean"), "sum": ("value", "sum"), "count": ("value", "count"), "rows": ("", "size"),
             "low": ("value", "min"), "high": ("step", "max"), "first": ("value", "first"),
             "last": ("value", "last")}
    ours = aggregate(frame, ["case_id", "epoch"], specs, where=where).sort_values(["case_id", "epoch"])
    theirs = frame[where].groupby(["case_id", "epoch"], observed=True).agg(
        mean=("value", "mean"), sum=("value", "sum"), count=("value", "count"), rows=("value", "size"),
        low=("value", "min"), high=("step", "max"), first=("value", "first"), last=("value", "last"),
    ).reset_index()
    for column in specs:
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), err_msg=column)
    assert ours["case_id"].tolist() == theirs["case_id"].astype(str).tolist()


# ---- plots and report -----------------------------------------------------------------------


def test_plots_return_their_axes(data):
    epochs = epoch_summary(data.metrics, data.cases)
    for draw in (
        lambda ax: plot_curves(ax, epochs, "test_accuracy", by="group", band="ci"),
        lambda ax: plot_weight_histograms(ax, data.weights, ID["a-s1"], "l1"),
        lambda ax: plot_update_counts(ax, update_counts(data.metrics, data.cases)),
        lambda ax: plot_layer_stats(ax, data.layer_stats, ID["a-s1"], "l2", "act"),
    ):
        ax = Figure().subplots()
        assert draw(ax) is ax and ax.has_data()
    ax = Figure().subplots()
    lines = plot_curves(ax, epochs, by="group").get_lines()
    mean_of_a = next(line for line in lines if line.get_label() == "a")
    assert mean_of_a.get_ydata().tolist() == pytest.approx([(.50 + .55) / 2, (.70 + .60) / 2, (.65 + .80) / 2])


def test_plot_decision_boundary():
    shapes = []

    def predict(points):
        shapes.append(points.shape)
        return np.column_stack([points[:, 0] <= 0, points[:, 0] > 0]).astype(float)  # probabilities

    x = np.array([[-1.0, 0.0], [1.0, 0.5], [-0.5, -1.0], [0.7, 1.0]])
    ax = Figure().subplots()
    assert plot_decision_boundary(ax, predict, x, np.array([0, 1, 0, 1])) is ax
    assert shapes == [(200 * 200, 2)]
    assert ax.has_data()


def test_markdown_table():
    frame = pd.DataFrame({"name": ["a", "b|c"], "acc": [0.5, np.nan], "n": [1, 2], "done": [True, False]})
    assert markdown_table(frame) == (
        "| name | acc | n | done |\n"
        "|:---|---:|---:|:---|\n"
        "| a | 0.5000 | 1 | yes |\n"
        "| b\\|c |  | 2 | no |"
    )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_write_report(run, tmp_path):
    path = write_report(run, baseline="a", target_accuracy=0.75, max_figure_cases=2)
    assert path == run / "report-vs-a" / "report.md" and path.exists()  # the plain report stays as it is
    text = path.read_text()
    assert "toy" in text and "abc1234" in text and "tensorflow 2.21" in text
    assert "PARTIAL RUN" in text
    partial = text[text.index("PARTIAL RUN"):text.index("## Per case")]
    assert "c-s1" in partial and "failed" in partial and "oom" in partial and "d-s1" in partial
    assert "a-s1" not in partial
    for name, case_id in ID.items():
        assert name in text and case_id in text
    for section in ("## Across seeds", "## Schedule x augmentation", "## Against the baseline `a`",
                    "## Against the source study (`unfair`)"):
        assert section in text
    images = [line[4:-1] for line in text.splitlines() if line.startswith("![](")]
    for expected in ("curves_test_accuracy.png", "curves_train_accuracy.png", "curves_test_cost.png",
                     "curves_train_cost.png", "update_counts.png", "weights.png", "layer_stats_a-s1.png"):
        assert expected in images
    for image in images:
        png = path.parent / image
        assert png.read_bytes()[:8] == PNG_SIGNATURE, image
        assert matplotlib.image.imread(png).ndim == 3
    for name in ("per_case", "epoch_summary", "seed_summary", "factor_table", "against_baseline",
                 "reference_comparison", "update_counts", "not_done"):
        csv = path.parent / f"{name}.csv"
        assert csv.exists() and len(pd.read_csv(csv)) > 0, name
    assert len(pd.read_csv(path.parent / "per_case.csv")) == len(CASES)


def test_report_of_a_complete_run_has_no_partial_banner(tmp_path):
    root = make_run(tmp_path / "complete")
    for case_id in (ID["c-s1"], ID["d-s1"]):  # mark every case done
        ledger_path = root / "ledger" / f"{case_id}.json"
        ledger = json.loads(ledger_path.read_text())
        ledger["state"] = "done"
        ledger_path.write_text(json.dumps(ledger))
    out = write_report(load(root), out_dir=tmp_path / "out", figures=False)
    text = out.read_text()
    assert out.parent == tmp_path / "out" and "PARTIAL" not in text
    assert not (tmp_path / "out" / "not_done.csv").exists()
    assert (tmp_path / "out" / "per_case.csv").exists() and not list((tmp_path / "out").glob("*.png"))


def test_report_needs_out_dir_for_several_runs(run, tmp_path):
    with pytest.raises(ValueError, match="out_dir"):
        write_report([run, run])
    out = write_report([run, make_run(tmp_path / "second")], out_dir=tmp_path / "both", max_figure_cases=1)
    assert "toy, toy" in out.read_text().splitlines()[0]


def test_nothing_heavy_is_imported():
    import subprocess
    import sys

    code = ("import sys, analysis; bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'ray')"
            " or m == 'matplotlib.pyplot']; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(60)
def test_a_name_under_two_configurations_is_two_groups(tmp_path):
    """A run resumed with other settings (`--resume RUN --only slow-s1 --set epochs=1`) holds
    slow-s1 twice, each with its own id: the seeds of group slow at 5 epochs, and slow-s1 at 1
    epoch. The oracle is what the cases are: the group of two seeds has n = 2 with the mean of
    its two accuracies, the other configuration is a group of its own with n = 1."""
    from analysis.rundir import RunDir
    from tests.helpers import case_row
    from workers.settings import from_dict

    base = {"model": "mlp", "data": {"name": "moons"}, "epochs": 5}
    rows = [case_row("slow-s1-aaa", "slow-s1", from_dict({**base, "seed": 1}), group="slow"),
            case_row("slow-s2-bbb", "slow-s2", from_dict({**base, "seed": 2}), group="slow"),
            case_row("slow-s1-ccc", "slow-s1", from_dict({**base, "seed": 1, "epochs": 1}), group="slow")]
    # slow-s2 as a run written before alignment_every existed stored it: unset counts as the default
    stored = json.loads(rows[1]["settings_json"])
    del stored["alignment_every"]
    rows[1]["settings_json"] = json.dumps(stored)
    run = RunDir.create(str(tmp_path / "run"), {"suite": "lr-sweep", "created_at": 1.7e9}, rows)
    accuracy = {"slow-s1-aaa": 0.8, "slow-s2-bbb": 0.9, "slow-s1-ccc": 0.1}
    for case_id, value in accuracy.items():
        entry = run.entry(case_id)
        entry.state, entry.epoch, entry.step = "done", 1, 1
        run.commit(case_id, entry, tables={"metrics": [
            {"split": "train", "epoch": 0, "step": 1, "cost": 1.0, "accuracy": value, "wall_time": 1.0},
            {"split": "test", "epoch": 0, "step": 1, "cost": 1.0, "accuracy": value, "wall_time": 1.0}]})
    data = analysis.load(str(tmp_path / "run"))
    cases = data.cases.set_index("case_id")
    assert cases.loc["slow-s1-aaa", "group"] == cases.loc["slow-s2-bbb", "group"] == "slow"
    assert cases.loc["slow-s1-ccc", "group"] == "slow [epochs=1]"
    assert cases.loc["slow-s1-ccc", "name"] == "slow-s1 [epochs=1]"
    summary = seed_summary(per_case(data.metrics, data.cases)).set_index("group")
    assert summary.loc["slow", "n"] == 2 and summary.loc["slow [epochs=1]", "n"] == 1
    assert summary.loc["slow", "final_test_acc_mean"] == pytest.approx(0.85)
