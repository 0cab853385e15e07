"""Tests for analysis.rundir: the run directory (ledger, Parquet logs, checkpoints, recovery)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from analysis.rundir import LedgerEntry, RunDir, StorageError

MANIFEST = {"suite": "demo", "created_by": "test", "options": {"seeds": [1, 2], "resume": False}}
CASES = [
    {"case_id": "aaa111", "name": "standard-s1", "schedule": "standard", "lr": 0.1, "seed": 1},
    {"case_id": "bbb222", "name": "unfair-s1", "schedule": "unfair-back", "lr": 0.05, "seed": 1, "dilation": 2},
]


def make_run(tmp_path: Path, cases=CASES) -> tuple[RunDir, Path]:
    root = tmp_path / "run"
    return RunDir.create(str(root), MANIFEST, cases), root


def train_row(epoch, step, lr=0.1, **extra):
    row = {"split": "train", "epoch": epoch, "step": step, "cost": 1.0 / (step + 1), "accuracy": 0.5,
           "lr": lr, "stages": 1, "layer_updates": 3, "forward_passes": 2, "examples": 32,
           "examples_per_sec": 1000.0, "wall_time": 0.01 * step}
    row.update(extra)
    return row


def test_create_open_manifest_round_trip(tmp_path):
    run, root = make_run(tmp_path)
    assert (root / "manifest.json").is_file() and (root / "cases.parquet").is_file()
    again = RunDir.open(str(root))
    assert again.is_run()
    assert again.manifest() == {**MANIFEST, "format_version": 2} and again.format_version() == 2
    cases = again.cases()
    assert list(cases["case_id"]) == ["aaa111", "bbb222"]
    assert list(cases["name"]) == ["standard-s1", "unfair-s1"]
    assert cases["lr"].tolist() == [0.1, 0.05]
    assert pd.isna(cases.loc[0, "dilation"]) and cases.loc[1, "dilation"] == 2
    ledger = again.ledger()
    assert set(ledger) == {"aaa111", "bbb222"}
    assert all(e.state == "pending" and e.commit_seq == 0 and e.checkpoint is None for e in ledger.values())
    assert again.entry("bbb222").name == "unfair-s1"


def test_open_plain_folder_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(StorageError) as err:
        RunDir.open(str(folder))
    message = str(err.value)
    assert "\n" not in message
    assert message == f"{folder} is not a bplab run directory (no manifest.json)"
    assert not RunDir(str(folder)).is_run()
    with pytest.raises(StorageError, match="not a bplab run directory"):
        RunDir.open(str(tmp_path / "missing"))


def test_create_over_existing_run_is_refused_and_run_untouched(tmp_path):
    run, root = make_run(tmp_path)
    entry = run.entry("aaa111")
    run.commit("aaa111", dataclasses_replace(entry, state="running"), checkpoint=b"ckpt", tables={"metrics": [train_row(0, 1)]})
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(StorageError, match="already holds a run") as err:
        RunDir.create(str(root), {"suite": "other"}, [{"case_id": "ccc333", "name": "x"}])
    assert "\n" not in str(err.value)
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_create_refuses_a_foreign_non_empty_folder(tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(StorageError, match="not empty"):
        RunDir.create(str(folder), MANIFEST, CASES)
    assert sorted(os.listdir(folder)) == ["thesis.tex"]


def test_commits_read_whole_with_pandas_and_pyarrow(tmp_path):
    run, root = make_run(tmp_path)
    a = run.entry("aaa111")
    # first file in path order: test rows, lr None in every row and an int accuracy,
    # which would fix lr as a null column (and accuracy as int) without the schema anchor
    test_rows = [{"split": "test", "epoch": 0, "step": 10, "cost": 0.7, "accuracy": 1, "lr": None},
                 {"split": "test", "epoch": 0, "step": 10, "cost": 0.8, "accuracy": 0, "lr": None, "examples": 100}]
    a = run.commit("aaa111", a, tables={"metrics": test_rows})
    a = run.commit("aaa111", a, tables={"metrics": [train_row(1, 11), train_row(1, 12, lr=0.05)]})
    b = run.entry("bbb222")
    # a later file brings a new column (sg_loss) and a row without lr
    b_rows = [train_row(0, 1, sg_loss=0.3), {"split": "train", "epoch": 0, "step": 2, "cost": 0.5, "accuracy": 0.25}]
    b = run.commit("bbb222", b, tables={"metrics": b_rows})
    assert (a.commit_seq, b.commit_seq) == (2, 1)

    expected = ([dict(r, case_id="aaa111") for r in test_rows]
                + [dict(train_row(1, 11), case_id="aaa111"), dict(train_row(1, 12, lr=0.05), case_id="aaa111")]
                + [dict(r, case_id="bbb222") for r in b_rows])

    df = pd.read_parquet(root / "metrics")
    assert len(df) == len(expected) == 6
    assert isinstance(df["case_id"].dtype, pd.CategoricalDtype)
    assert df["step"].dtype == "int64" and df["epoch"].dtype == "int64"
    assert df["lr"].dtype == "float64" and df["accuracy"].dtype == "float64"
    assert "sg_loss" in df.columns
    got = _normalise_records(df)
    assert got == _normalise_records(pd.DataFrame(expected)[df.columns])

    table = ds.dataset(str(root / "metrics"), partitioning="hive").to_table()
    assert _normalise_records(table.to_pandas()[df.columns]) == got

    # the partition key is not stored inside the files
    part = root / "metrics" / "case_id=aaa111" / "part-000001.parquet"
    assert "case_id" not in pq.read_schema(part).names


def test_rows_may_carry_their_own_case_id_only_if_it_matches(tmp_path):
    run, root = make_run(tmp_path)
    a = run.entry("aaa111")
    a = run.commit("aaa111", a, tables={"metrics": [dict(train_row(0, 1), case_id="aaa111")]})
    assert "case_id" not in pq.read_schema(root / "metrics" / "case_id=aaa111" / "part-000001.parquet").names
    assert pd.read_parquet(root / "metrics")["case_id"].tolist() == ["aaa111"]
    with pytest.raises(StorageError, match="case bbb222"):
        run.commit("aaa111", a, tables={"metrics": [dict(train_row(0, 2), case_id="bbb222")]})
    assert run.entry("aaa111").commit_seq == 1


def test_type_conflict_is_refused(tmp_path):
    run, _ = make_run(tmp_path)
    a = run.commit("aaa111", run.entry("aaa111"), tables={"metrics": [train_row(0, 1)]})
    with pytest.raises(StorageError, match="'split'"):
        run.commit("aaa111", a, tables={"metrics": [train_row(0, 2, split=3)]})
    with pytest.raises(StorageError, match="mixes value types"):
        run.commit("aaa111", a, tables={"metrics": [train_row(0, 2, note="x"), train_row(0, 3, note=1.5)]})
    assert run.entry("aaa111").commit_seq == 1


def test_crash_before_ledger_write_is_recovered(tmp_path):
    run, root = make_run(tmp_path)
    a = run.entry("aaa111")
    a = dataclasses_replace(a, state="running", attempts=1)
    a = run.write_entry(a)
    a = run.commit("aaa111", a, checkpoint=b"committed-1",
                   tables={"metrics": [train_row(0, 1)], "layer_stats": [{"layer": "dense1", "grad_norm": 0.1, "step": 1}]})
    # a driver that dies after writing the files of commit 2 but before its ledger write
    metrics_dir = root / "metrics" / "case_id=aaa111"
    stats_dir = root / "layer_stats" / "case_id=aaa111"
    ckpt_dir = root / "checkpoints" / "aaa111"
    (metrics_dir / "part-000002.parquet").write_bytes((metrics_dir / "part-000001.parquet").read_bytes())
    (stats_dir / "part-000002.parquet").write_bytes((stats_dir / "part-000001.parquet").read_bytes())
    (ckpt_dir / "ckpt-000002.npz").write_bytes(b"uncommitted-2")
    (metrics_dir / ".part-000003.parquet.tmp-deadbeef").write_bytes(b"half a parquet file")
    (root / "ledger" / ".aaa111.json.tmp-0badf00d").write_text("{")
    # while the leftovers are there, a reader sees duplicate rows: that's what recover fixes
    assert len(pd.read_parquet(root / "metrics")) == 2

    notes = RunDir.open(str(root)).recover()
    assert any("part-000002" in n for n in notes) and any("ckpt-000002" in n for n in notes)
    assert any("temporary" in n for n in notes)
    assert any("pending" in n for n in notes)
    assert sorted(os.listdir(metrics_dir)) == ["part-000001.parquet"]
    assert sorted(os.listdir(stats_dir)) == ["part-000001.parquet"]
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-000001.npz"]
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]

    run = RunDir.open(str(root))
    entry = run.entry("aaa111")
    assert entry.state == "pending" and entry.commit_seq == 1
    assert run.load_checkpoint("aaa111") == b"committed-1"
    assert len(pd.read_parquet(root / "metrics")) == 1
    assert len(pd.read_parquet(root / "layer_stats")) == 1
    # the resumed case commits seq 2 again, exactly once
    run.commit("aaa111", entry, checkpoint=b"committed-2", tables={"metrics": [train_row(0, 2)]})
    assert pd.read_parquet(root / "metrics")["step"].tolist() == [1, 2]
    assert run.recover() == []


def test_two_checkpoint_generations_are_kept(tmp_path):
    run, root = make_run(tmp_path)
    ckpt_dir = root / "checkpoints" / "aaa111"
    a = run.commit("aaa111", run.entry("aaa111"), checkpoint=b"one", tables={"metrics": [train_row(0, 1)]})
    assert run.load_checkpoint("aaa111") == b"one"
    a = run.commit("aaa111", a, tables={"metrics": [train_row(0, 2)]})  # a commit without a checkpoint keeps the old one
    assert a.checkpoint == "checkpoints/aaa111/ckpt-000001.npz"
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-000001.npz"]
    a = run.commit("aaa111", a, checkpoint=b"three", tables={"metrics": [train_row(0, 3)]})
    assert a.checkpoint == "checkpoints/aaa111/ckpt-000003.npz" and a.commit_seq == 3
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-000001.npz", "ckpt-000003.npz"]  # latest and the one before
    a = run.commit("aaa111", a, checkpoint=b"four", tables={"metrics": [train_row(0, 4)]})
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-000003.npz", "ckpt-000004.npz"]
    assert [g["commit_seq"] for g in a.checkpoints] == [4, 3]
    assert RunDir.open(str(root)).load_checkpoint("aaa111") == b"four"
    assert run.load_checkpoint("bbb222") is None


def test_stale_or_duplicate_commit_is_refused(tmp_path):
    run, root = make_run(tmp_path)
    first = run.entry("aaa111")
    run.commit("aaa111", first, checkpoint=b"one", tables={"metrics": [train_row(0, 1)]})
    with pytest.raises(StorageError, match="duplicate or stale"):
        run.commit("aaa111", first, checkpoint=b"one", tables={"metrics": [train_row(0, 1)]})
    with pytest.raises(StorageError, match="only commit"):
        run.write_entry(dataclasses_replace(first, state="failed", reason_class="oom"))
    assert len(pd.read_parquet(root / "metrics")) == 1
    assert run.entry("aaa111").commit_seq == 1
    # a fresh RunDir (no cache) refuses it too
    with pytest.raises(StorageError, match="duplicate or stale"):
        RunDir.open(str(root)).commit("aaa111", first, tables={"metrics": [train_row(0, 1)]})


def test_write_entry_validates_and_is_atomic(tmp_path):
    run, root = make_run(tmp_path)
    e = run.entry("bbb222")
    with pytest.raises(StorageError, match="unknown state"):
        run.write_entry(dataclasses_replace(e, state="exploded"))
    with pytest.raises(StorageError, match="failure class"):
        run.write_entry(dataclasses_replace(e, state="failed", reason_class="cosmic_ray"))
    with pytest.raises(StorageError, match="no case"):
        run.write_entry(LedgerEntry(case_id="zzz999", name="ghost"))
    written = run.write_entry(dataclasses_replace(e, state="failed", reason_class="oom", reason="OOM on GPU 0",
                                                  info={"tf": "2.21"}, latest={"test_accuracy": float("nan")}))
    assert written.updated_at > 0
    back = RunDir.open(str(root)).entry("bbb222")
    assert (back.state, back.reason_class, back.info) == ("failed", "oom", {"tf": "2.21"})
    assert back.latest["test_accuracy"] != back.latest["test_accuracy"]  # NaN survives
    assert json.loads((root / "ledger" / "bbb222.json").read_text().replace("NaN", "null"))["state"] == "failed"
    assert not [p for p in (root / "ledger").iterdir() if ".tmp-" in p.name]


def test_file_uri_works_like_a_path(tmp_path):
    root = tmp_path / "uri run"
    uri = (root).as_uri()  # file:///.../uri%20run
    run = RunDir.create(uri, MANIFEST, CASES)
    assert run.filesystem.type_name == "local"
    assert run.root == str(root)
    run.commit("aaa111", run.entry("aaa111"), checkpoint=b"ckpt", tables={"metrics": [train_row(0, 1)]})
    by_path = RunDir.open(str(root))
    assert by_path.manifest() == {**MANIFEST, "format_version": 2}
    assert by_path.load_checkpoint("aaa111") == b"ckpt"
    assert len(pd.read_parquet(root / "metrics")) == 1
    by_uri = RunDir.open(uri)
    assert by_uri.entry("aaa111").commit_seq == 1
    fs, path = pafs.FileSystem.from_uri(uri)
    assert len(pd.read_parquet(by_uri.path("metrics"), filesystem=by_uri.filesystem)) == 1
    assert path == by_uri.root


def test_object_store_mode_and_mock_filesystem():
    fs, _ = pafs.FileSystem.from_uri("mock:///")
    run = RunDir.create("bucket/run", MANIFEST, CASES, filesystem=fs, atomic_rename=False)
    a = run.commit("aaa111", run.entry("aaa111"), checkpoint=b"one", tables={"metrics": [train_row(0, 1)]})
    run.commit("aaa111", a, checkpoint=b"two", tables={"metrics": [train_row(0, 2, lr=None)]})
    again = RunDir.open("bucket/run", filesystem=fs)
    assert again.load_checkpoint("aaa111") == b"two"
    files = [i.path for i in fs.get_file_info(pafs.FileSelector("bucket/run", recursive=True))]
    assert not [f for f in files if ".tmp-" in f]
    assert "bucket/run/checkpoints/aaa111/ckpt-000001.npz" in files  # the generation before the latest
    assert not [f for f in files if "/.staged-" in f]  # every committed part is published
    df = pd.read_parquet(again.path("metrics"), filesystem=fs)
    assert df["step"].tolist() == [1, 2]


def test_add_cases_keeps_existing_entries_untouched(tmp_path):
    run, root = make_run(tmp_path)
    a = run.write_entry(dataclasses_replace(run.entry("aaa111"), state="running", attempts=1, node="n1"))
    a = run.commit("aaa111", dataclasses_replace(a, state="done", epoch=1, step=1), checkpoint=b"one",
                   tables={"metrics": [train_row(0, 1)]})
    ledger_bytes = (root / "ledger" / "aaa111.json").read_bytes()
    new = [{"case_id": "aaa111", "name": "renamed?", "schedule": "other"},  # existing id: ignored
           {"case_id": "ccc333", "name": "dilated-s2", "schedule": "dilated", "lr": 0.1, "seed": 2,
            "layers": [784, 100, 10]}]
    assert run.add_cases(new) == ["ccc333"]
    assert (root / "ledger" / "aaa111.json").read_bytes() == ledger_bytes
    reopened = RunDir.open(str(root))
    ledger = reopened.ledger()
    assert ledger["aaa111"] == a and ledger["aaa111"].state == "done"
    assert ledger["ccc333"].state == "pending" and ledger["ccc333"].commit_seq == 0
    cases = reopened.cases().set_index("case_id")
    assert list(cases.index) == ["aaa111", "bbb222", "ccc333"]
    assert cases.loc["aaa111", "name"] == "standard-s1" and cases.loc["aaa111", "schedule"] == "standard"
    assert list(cases.loc["ccc333", "layers"]) == [784, 100, 10]
    assert reopened.add_cases(new) == []
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_histograms_and_layer_stats_are_datasets(tmp_path):
    run, root = make_run(tmp_path)
    for case_id in ("aaa111", "bbb222"):
        for phase in ("before", "after"):
            run.write_histograms(case_id, phase, [{"phase": phase, "layer": "dense1", "bin": i, "count": 10 * i,
                                                   "edge": 0.1 * i} for i in range(3)])
    run.write_histograms("aaa111", "after", [{"phase": "after", "layer": "dense1", "bin": 0, "count": 1, "edge": 0.0}])
    df = pd.read_parquet(root / "weights")
    assert len(df) == 3 + 3 + 3 + 1
    assert sorted(os.listdir(root / "weights" / "case_id=aaa111")) == ["part-after.parquet", "part-before.parquet"]
    with pytest.raises(StorageError, match="phase"):
        run.write_histograms("aaa111", "../evil", [])


def test_boundary_columns_store_what_rows_store(tmp_path):
    """The trainer sends the decision-boundary grid as columns; the stored table must be the
    one the row form gives (pyarrow's own inference from the row dicts is the oracle)."""
    import numpy as np

    run, root = make_run(tmp_path)
    grid = np.linspace(-1, 1, 6, dtype=np.float32)
    p1 = np.array([0.1, 0.4, 0.5, 0.6, 0.9, 1.0], dtype=np.float32)
    run.write_boundary("aaa111", {"x0": grid, "x1": grid[::-1], "p1": p1, "label": (p1 >= 0.5).astype(np.int64)})
    run.write_boundary("bbb222", [{"x0": float(a), "x1": float(b), "p1": float(p), "label": int(p >= 0.5)}
                                  for a, b, p in zip(grid, grid[::-1], p1)])
    columns = pq.read_table(root / "boundary" / "case_id=aaa111")
    rows = pq.read_table(root / "boundary" / "case_id=bbb222")
    assert columns.schema == rows.schema, (columns.schema, rows.schema)
    assert columns.to_pylist() == rows.to_pylist()
    assert columns.column("label").to_pylist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(StorageError, match="has 2 values"):
        run.write_boundary("aaa111", {"x0": grid, "x1": grid[:2]})
    with pytest.raises(StorageError, match="another case"):
        run.write_boundary("aaa111", {"case_id": ["bbb222"] * 6, "x0": grid})
    assert pq.read_table(root / "boundary" / "case_id=aaa111").num_rows == 6  # a refused write changed nothing


def test_bad_case_ids_are_refused(tmp_path):
    with pytest.raises(StorageError, match="bad case id"):
        RunDir.create(str(tmp_path / "r"), MANIFEST, [{"case_id": "../x", "name": "x"}])
    with pytest.raises(StorageError, match="twice"):
        RunDir.create(str(tmp_path / "r"), MANIFEST, [CASES[0], CASES[0]])
    assert not (tmp_path / "r" / "manifest.json").exists()


def dataclasses_replace(entry, **changes):
    import dataclasses

    return dataclasses.replace(entry, **changes)


def _normalise_records(df: pd.DataFrame) -> list[tuple]:
    df = df.copy()
    df["case_id"] = df["case_id"].astype(str)
    df = df.sort_values(["case_id", "step", "split", "cost"]).reset_index(drop=True)
    return [tuple(None if pd.isna(v) else (float(v) if isinstance(v, (int, float)) else v) for v in row)
            for row in df.itertuples(index=False)]


@pytest.mark.timeout(60)
def test_any_registered_dataset_commits_exactly_once_as_rows_columns_or_a_table(tmp_path):
    """One commit carries metrics as columns, layer_stats as rows and alignment as a pyarrow
    Table; all three are read back as written (pyarrow, pandas and analysis.load), and the
    commit is refused a second time like any other."""
    import numpy as np
    import pyarrow as pa

    from analysis import load

    run, root = make_run(tmp_path)
    steps = np.arange(4)
    metrics = {"split": ["train"] * 4, "epoch": np.zeros(4, np.int32), "step": steps, "cost": 1.0 / (steps + 1)}
    stats = [{"step": 3, "layer": "l1", "quantity": "weights", "mean": 0.25}]
    alignment = pa.table({"step": pa.array([0, 0, 3, 3], pa.int32()), "layer": ["l1", "l2", "l1", "l2"],
                          "unit": [0, 1, 0, 1], "quantity": ["signal_cosine"] * 4, "value": [0.5, 0.25, 0.75, 1.0]})
    entry = run.entry("aaa111")
    new = run.commit("aaa111", entry, tables={"metrics": metrics, "layer_stats": stats, "alignment": alignment})
    assert new.commit_seq == 1 and new.parts == {"metrics": {"1": 4}, "layer_stats": {"1": 1}, "alignment": {"1": 4}}
    with pytest.raises(StorageError, match="duplicate or stale"):
        run.commit("aaa111", entry, tables={"alignment": alignment})
    with pytest.raises(StorageError, match="not a committed dataset"):
        run.commit("aaa111", new, tables={"boundary": stats})
    raw = pq.read_table(root / "alignment" / "case_id=aaa111" / "part-000001.parquet")
    assert raw.column("value").to_pylist() == [0.5, 0.25, 0.75, 1.0] and raw.schema.field("step").type == pa.int64()
    assert pd.read_parquet(root / "metrics")["cost"].tolist() == [1.0, 0.5, 1 / 3, 0.25]

    data = load(root)
    assert list(data.alignment.columns[:3]) == ["case_id", "name", "group"]
    assert data.alignment["name"].astype(str).unique().tolist() == ["standard-s1"]
    assert data.alignment.sort_values(["step", "unit"])["value"].tolist() == [0.5, 0.25, 0.75, 1.0]
    assert data.alignment["step"].dtype == np.int64 and isinstance(data.alignment["layer"].dtype, pd.CategoricalDtype)
    assert data.alignment["unit"].dtype == np.int64
    assert data.layer_stats["mean"].tolist() == [0.25] and data.metrics["step"].tolist() == [0, 1, 2, 3]
    # a case with no alignment rows yet, and an empty run, give the documented columns
    assert set(load(root, datasets=[]).alignment.columns) >= {"case_id", "step", "layer", "unit", "quantity", "value"}
