"""The compacted metrics cache: analysis.load gives the same rows with and without it,
ignores it once stale, and pandas.read_parquet(RUN/"metrics") never sees it."""

import pandas as pd

import analysis
from analysis.rundir import RunDir


def rows(start, count, epoch):
    out = [{"split": "train", "epoch": epoch, "step": start + i, "cost": 1.0 / (start + i + 1), "accuracy": 0.5,
            "lr": 0.1, "examples": 16, "wall_time": 100.0 + start + i} for i in range(count)]
    out.append({"split": "test", "epoch": epoch, "step": start + count, "cost": 0.3, "accuracy": 0.8 + epoch / 100,
                "lr": None, "wall_time": 200.0 + start})
    return out


def make_run(tmp_path):
    cases = [{"case_id": f"{name}-0123abcd", "name": name, "group": name, "seed": 1} for name in ("a", "b")]
    run = RunDir.create(str(tmp_path / "run"), {"suite": "t"}, cases)
    for case in cases:
        entry = run.entry(case["case_id"])
        for epoch in range(3):
            entry = run.commit(case["case_id"], entry, checkpoint=b"ckpt", tables={"metrics": rows(epoch * 5, 5, epoch)})
    return run, [c["case_id"] for c in cases]


def sorted_metrics(frame):
    frame = frame.copy()
    frame["case_id"] = frame["case_id"].astype(str)
    frame["split"] = frame["split"].astype(str)
    return frame.sort_values(["case_id", "step", "split"]).reset_index(drop=True)[
        ["case_id", "split", "epoch", "step", "cost", "accuracy", "lr", "wall_time"]]


def test_compacted_cache_gives_the_same_rows(tmp_path):
    run, (a, b) = make_run(tmp_path)
    before = sorted_metrics(analysis.load(run.location).metrics)
    assert run.compact_metrics(a) == f"metrics_compact/case_id={a}/upto-000003.parquet"
    cached = pd.read_parquet(tmp_path / "run" / "metrics_compact" / f"case_id={a}")
    assert list(cached["step"]) == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10, 11, 12, 13, 14, 15]  # commit order kept
    after = sorted_metrics(analysis.load(run.location).metrics)
    pd.testing.assert_frame_equal(before, after)
    assert len(after) == 2 * 18
    raw = pd.read_parquet(tmp_path / "run" / "metrics")  # the authoritative dataset is untouched
    assert len(raw) == 36


def test_a_stale_cache_is_ignored(tmp_path):
    run, (a, b) = make_run(tmp_path)
    run.compact_metrics(a)
    run.commit(a, run.entry(a), checkpoint=b"ckpt", tables={"metrics": rows(15, 5, 3)})  # a later commit: cache at 3, ledger at 4
    loaded = sorted_metrics(analysis.load(run.location).metrics)
    assert (loaded["case_id"] == a).sum() == 24
    assert loaded[loaded.case_id == a]["step"].max() == 20
    run.compact_metrics(a)  # refreshed: the old cache file is replaced
    files = sorted(p.name for p in (tmp_path / "run" / "metrics_compact" / f"case_id={a}").iterdir())
    assert files == ["upto-000004.parquet"]
    pd.testing.assert_frame_equal(loaded, sorted_metrics(analysis.load(run.location).metrics))


def test_every_case_compacted(tmp_path):
    run, ids = make_run(tmp_path)
    before = sorted_metrics(analysis.load(run.location).metrics)
    for case_id in ids:
        run.compact_metrics(case_id)
    pd.testing.assert_frame_equal(before, sorted_metrics(analysis.load(run.location).metrics))
