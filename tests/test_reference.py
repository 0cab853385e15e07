"""Reports compare with the source study only like with like: the official data (by the
published digests of the raw files) and the settings the source fixed, unchanged."""

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reference import reference_comparison
from jobs import plan as plan_module, suites
from workers import data as data_module
from workers.data import load_dataset
from workers.settings import DataSpec

FILES = {"train-images-idx3-ubyte.gz": (3, 60), "train-labels-idx1-ubyte.gz": (1, 60),
         "t10k-images-idx3-ubyte.gz": (3, 20), "t10k-labels-idx1-ubyte.gz": (1, 20)}


def write_mnist_format(folder: Path) -> dict:
    """Another 28x28 10-class set in the MNIST file format; returns {file name: md5}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    digests = {}
    for name, (ndim, count) in FILES.items():
        if ndim == 3:
            header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
            body = rng.integers(0, 256, size=count * 28 * 28, dtype=np.uint8).tobytes()
        else:
            header = (0x801).to_bytes(4, "big") + count.to_bytes(4, "big")
            body = (np.arange(count) % 10).astype(np.uint8).tobytes()
        raw = gzip.compress(header + body, mtime=0)
        (folder / name).write_bytes(raw)
        digests[name] = hashlib.md5(raw).hexdigest()
    return digests


@pytest.fixture
def official_double(monkeypatch, tmp_path):
    """A folder whose files the loader takes for the official MNIST (a test double of the digests)."""
    folder = tmp_path / "mnist"
    digests = write_mnist_format(folder)
    monkeypatch.setitem(data_module.OFFICIAL_DIGESTS, "mnist", {n: f"md5:{d}" for n, d in digests.items()})
    return folder


def planned_cases(folder: Path, overrides=()):
    suite = suites.select(suites.load_suite("dcn", [f"data.path={folder}", *overrides]), ["dcn"])
    datasets = plan_module.load_data(suite.cases)
    planned = plan_module.make_plan(suite, datasets, cpus_per_case=1, gpus_per_case=0)
    return pd.DataFrame([p.row() for p in planned])


def per_case_of(cases: pd.DataFrame, accuracy=0.9) -> pd.DataFrame:
    return pd.DataFrame({"case_id": cases["case_id"], "name": cases["name"], "group": cases["group"],
                         "final_test_acc": accuracy, "best_test_acc": accuracy, "final_train_acc": accuracy,
                         "state": "done"})


@pytest.mark.timeout(60)
def test_other_data_in_the_mnist_format_is_recorded_as_not_official(tmp_path):
    folder = tmp_path / "other"
    digests = write_mnist_format(folder)
    loaded = load_dataset(DataSpec(name="mnist", path=str(folder)))
    identity = loaded.identity
    assert identity["official"] is False
    assert identity["files"] == {n: f"md5:{d}" for n, d in digests.items()}  # hashlib is the oracle
    assert "train-images-idx3-ubyte.gz" in identity["reason"] and "not the official" in identity["reason"]
    assert loaded.summary()["official"] is False
    cases = planned_cases(folder)
    assert cases.loc[0, "data_official"] == False  # noqa: E712 (a numpy bool)
    assert cases.loc[0, "data_digest"] == identity["digest"]
    comparison = reference_comparison(per_case_of(cases), "dcn", cases).set_index("case")
    assert comparison.loc["dcn", "comparable"] == False  # noqa: E712
    assert "data differs" in comparison.loc["dcn", "why_not"] and identity["digest"] in comparison.loc["dcn", "why_not"]
    assert math.isnan(comparison.loc["dcn", "diff"])
    assert comparison.loc["dcn", "source_final_test"] == pytest.approx(0.9869)  # the source figure stays


@pytest.mark.timeout(60)
def test_a_set_source_fixed_setting_makes_it_not_comparable(official_double):
    cases = planned_cases(official_double, ["lr=0.001"])
    assert bool(cases.loc[0, "data_official"])
    comparison = reference_comparison(per_case_of(cases), "dcn", cases, overrides=["lr=0.001"]).set_index("case")
    why = comparison.loc["dcn", "why_not"]
    assert not comparison.loc["dcn", "comparable"] and math.isnan(comparison.loc["dcn", "diff"])
    assert "lr=0.001 (source 0.0001) by --set lr=0.001" in why and "data differs" not in why


@pytest.mark.timeout(60)
def test_official_data_and_the_source_settings_give_the_diff(official_double):
    cases = planned_cases(official_double)
    comparison = reference_comparison(per_case_of(cases, 0.9769), "dcn", cases).set_index("case")
    assert comparison.loc["dcn", "comparable"] and comparison.loc["dcn", "why_not"] == ""
    assert comparison.loc["dcn", "diff"] == pytest.approx(0.9769 - 0.9869)


@pytest.mark.timeout(30)
def test_embedded_sets_are_trivially_official():
    assert load_dataset(DataSpec(name="digits")).identity["official"] is True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_on_other_mnist_format_data_reports_not_comparable(tmp_path):
    folder = tmp_path / "other"
    write_mnist_format(folder)
    run = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "jobs", "run", "dcn", "--only", "dcn", "--out", str(run),
                           "--progress-every", "0", "--set", f"data.path={folder}", "--set", "steps_per_epoch=2",
                           "--set", "epochs=1", "--set", "layer_stats_every=0"],
                          env=env, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data_sets"][0]["official"] is False
    assert pd.read_parquet(run / "cases.parquet")["data_official"].tolist() == [False]
    text = (run / "report" / "report.md").read_text()
    section = text[text.index("## Against the source study"):]
    section = section[:section.index("\n## ", 5)] if "\n## " in section[5:] else section
    assert "not comparable" in section and "data differs" in section and "epochs=1 (source 5) by --set epochs=1" in section
    comparison = pd.read_csv(run / "report" / "reference_comparison.csv")
    assert comparison["diff"].isna().all()
    per_case = pd.read_csv(run / "report" / "per_case.csv")
    assert per_case["data_official"].tolist() == [False]


@pytest.mark.timeout(60)
def test_the_feedback_suite_is_compared_like_with_like_with_akrouts_repository(official_double):
    """feedback's bp, fa and kp groups (five seeds each) as planned keep every setting the
    repository fixed; kp-wd does not count as kp; the error-signal angles come from the
    alignment rows of the hidden unit at the last measured epoch."""
    suite = suites.load_suite("feedback", [f"data.path={official_double}"])
    planned = plan_module.make_plan(suite, plan_module.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)
    cases = pd.DataFrame([p.row() for p in planned])
    table = per_case_of(cases, 0.97)
    fa_ids = cases.loc[cases["group"] == "fa", "case_id"].tolist()
    alignment = pd.DataFrame([
        {"case_id": case_id, "epoch": epoch, "step": epoch * 10, "unit": unit, "layer": f"l{unit + 1}",
         "quantity": quantity, "value": value}
        for n, case_id in enumerate(fa_ids)
        for epoch, hidden_angle in ((398, 80.0), (399, 30.0 + n))
        for unit, quantity, value in ((0, "error_angle", hidden_angle), (1, "error_angle", 0.0), (1, "signal_angle", 0.0))])
    comparison = reference_comparison(table, "feedback", cases, alignment=alignment).set_index("case")
    assert list(comparison.index) == ["bp", "fa", "kp"]
    assert comparison["comparable"].all(), comparison["why_not"].tolist()
    assert (comparison["n"] == 5).all()
    assert comparison.loc["kp", "diff"] == pytest.approx(0.97 - 0.9845)
    assert comparison.loc["fa", "source_error_angle"] == pytest.approx(34.91)
    assert comparison.loc["fa", "run_error_angle"] == pytest.approx(32.0)  # mean of 30..34: the last epoch, hidden unit only
    assert math.isnan(comparison.loc["kp", "run_error_angle"]) and math.isnan(comparison.loc["bp", "source_error_angle"])
    changed = planned_cases_of_feedback(official_double, ["fa.feedback_init=xavier"])
    why = reference_comparison(per_case_of(changed), "feedback", changed).set_index("case").loc["fa", "why_not"]
    assert "feedback_init" in why


def planned_cases_of_feedback(folder: Path, overrides=()):
    suite = suites.select(suites.load_suite("feedback", [f"data.path={folder}", *overrides]), ["fa"])
    planned = plan_module.make_plan(suite, plan_module.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)
    return pd.DataFrame([p.row() for p in planned])
