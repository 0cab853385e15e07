"""The report explains itself, runs sit side by side, the report and runs commands' edges.

Most tests write small run directories by hand (as the driver would) and check the report
against values worked out here; one slow test runs `bplab run` twice on a tiny two-lr suite
and reports the two runs together.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import analysis.figures as figures_module
import analysis.report as report_module
from analysis import load, per_case
from analysis.plots import plot_weight_histograms, rebin, shared_bins
from analysis.runs import format_runs, list_runs
from analysis.flags import flag_cases
from analysis.labels import setting_labels, varying_settings
from analysis.tables import display_epoch, step_curves
from jobs.cli import build_parser, main
from tests.helpers import TWO_LR, bplab, write_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def capture_figures(monkeypatch):
    """Every figure the report saves: {file name: (legend texts, axes titles)}."""
    seen = {}
    original_save = figures_module._save

    def save(fig, out_dir, name, **kwargs):
        texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        texts += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        seen[name] = (texts, [ax.get_title() for ax in fig.axes])
        return original_save(fig, out_dir, name, **kwargs)

    monkeypatch.setattr(figures_module, "_save", save)
    return seen


@pytest.mark.timeout(120)
def test_a_two_lr_sweep_names_lr_in_tables_and_legends(tmp_path, capture_figures):
    run = write_run(tmp_path / "sweep", TWO_LR)
    path = report_module.write_report(run)
    text = path.read_text()
    assert "Settings that differ between cases: `lr`" in text
    header = next(line for line in text.splitlines() if line.startswith("| case_id | name |"))
    assert "| lr |" in header and "| model |" not in header  # only what differs
    table = pd.read_csv(path.parent / "per_case.csv")
    assert dict(zip(table["name"], table["lr"])) == {"slow": 0.001, "fast": 0.002}
    curves = [name for name in capture_figures if name.startswith("curves_")]
    assert len(curves) == 4
    for name in curves:
        legend, _ = capture_figures[name]
        assert sorted(legend) == ["fast: lr=0.002", "slow: lr=0.001"], name
    # one seed per group: no band and no word of one
    assert not any("band" in title for _, titles in capture_figures.values() for title in titles)
    # standard schedule everywhere: the update-count figure says nothing, so it is not drawn
    assert "update_counts.png" not in capture_figures and "layer updates per step: 1 for every layer" in text
    assert (path.parent / "weights.png").exists()


@pytest.mark.timeout(60)
def test_varying_settings_and_labels():
    cases = pd.DataFrame({"case_id": ["1", "2", "3"], "name": ["a", "b", "c"], "group": ["a", "b", "c"],
                          "seed": [1, 2, 3], "schedule": ["standard", "unfair-back", "standard"],
                          "augment": [False, False, True], "lr": [0.1, 0.1, 0.1], "hidden": [[8], [8], [8]],
                          "num_gpus": [0.0, 1.0, 0.0]})
    assert varying_settings(cases) == ["schedule", "augment"]
    assert varying_settings(cases, include_seed=True) == ["seed", "schedule", "augment"]
    assert setting_labels(cases, by="name").tolist() == [
        "a: schedule=standard augment=False", "b: schedule=unfair-back augment=False",
        "c: schedule=standard augment=True"]
    assert setting_labels(cases.assign(run=["r1", "r1", "r2"]), by="name")[2] == "r2/c: schedule=standard augment=True"


@pytest.mark.timeout(60)
def test_before_and_after_histograms_share_bins():
    # by hand: before [0,1) 2, [1,2) 2; after [0,4) 4 -> common grid [0, 2, 4] (2 bins: the most either has)
    before = pd.DataFrame({"bin": [0, 1], "left": [0.0, 1.0], "right": [1.0, 2.0], "count": [2, 2]})
    after = pd.DataFrame({"bin": [0], "left": [0.0], "right": [4.0], "count": [4]})
    edges, counts = shared_bins({"before": before, "after": after})
    assert edges.tolist() == [0.0, 2.0, 4.0]
    assert counts["before"].tolist() == [4.0, 0.0] and counts["after"].tolist() == [2.0, 2.0]
    assert rebin([1, 3], [0, 1, 2], [0, 0.5, 1, 1.5, 2]).tolist() == [0.5, 0.5, 1.5, 1.5]

    weights = pd.concat([before.assign(phase="before"), after.assign(phase="after")]).assign(
        case_id="x", layer="l1", param="w")
    ax = plot_weight_histograms(Figure().subplots(), weights, "x", "l1")
    patches = [p for p in ax.patches if type(p).__name__ == "StepPatch"]
    assert len(patches) == 4  # fill and outline of each phase
    for patch in patches:
        assert patch.get_data().edges.tolist() == [0.0, 2.0, 4.0]
    totals = sorted({float(np.sum(p.get_data().values)) for p in patches})
    assert totals == [4.0]  # the same weights before and after: the same total


def _constructed(rows: dict, data_name: str = "moons") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, cases) for test accuracies per epoch: name -> (accuracies, state)."""
    metrics, cases = [], []
    for name, (accuracies, state) in rows.items():
        cases.append({"case_id": name, "name": name, "group": name, "seed": 1, "state": state,
                      "data.name": data_name, "data.classes": None})
        for epoch, accuracy in enumerate(accuracies):
            metrics.append({"case_id": name, "split": "train", "epoch": epoch, "step": epoch, "cost": 0.5,
                            "accuracy": accuracy, "examples": 10, "wall_time": float(epoch)})
            metrics.append({"case_id": name, "split": "test", "epoch": epoch, "step": epoch + 1, "cost": 0.5,
                            "accuracy": accuracy, "examples": None, "wall_time": epoch + 0.5})
    return pd.DataFrame(metrics), pd.DataFrame(cases)


@pytest.mark.timeout(60)
def test_collapse_and_divergence_flags():
    # moons: chance .5; collapsed = best >= .75 and final <= .55
    metrics, cases = _constructed({
        "deep": ([.6, .925, .7, .50], "done"),      # reached .925, back to chance: collapsed
        "edge": ([.75, .55], "done"),                # exactly on both limits: collapsed
        "learns": ([.6, .9, .88], "done"),           # fine
        "never": ([.5, .52, .5], "done"),            # never well above chance: not a collapse
        "dropped": ([.9, .56], "done"),              # fell, but not to chance
        "nan": ([.6, .7], "diverged"),               # the ledger says diverged
    })
    table = per_case(metrics, cases)
    flags = flag_cases(table, cases).set_index("name")
    assert flags["flag"].to_dict() == {"deep": "collapsed", "edge": "collapsed", "nan": "diverged"}
    assert flags.loc["deep", "best_test_acc"] == pytest.approx(.925)
    assert flags.loc["deep", "best_epoch"] == 2 and flags.loc["deep", "chance"] == pytest.approx(.5)
    # ten classes (digits): chance .1, collapsed = best >= .55 and final <= .15
    metrics, cases = _constructed({"w": ([.8, .52], "done"), "x": ([.6, .15], "done"), "y": ([.6, .16], "done"),
                                   "z": ([.54, .1], "done")}, data_name="digits")
    assert flag_cases(per_case(metrics, cases), cases)["name"].tolist() == ["x"]
    # data.classes keeps 2 of the 10 classes: chance .5, collapsed = best >= .75 and final <= .55
    cases["data.classes"] = "[0, 1]"
    assert flag_cases(per_case(metrics, cases), cases)["name"].tolist() == ["w"]


@pytest.mark.timeout(60)
def test_epochs_are_numbered_from_one_everywhere(tmp_path):
    metrics, cases = _constructed({"a": ([.3, .9, .6], "done")})
    assert display_epoch(0) == 1
    table = per_case(metrics, cases, target_accuracy=.8)
    assert table.loc[0, "best_epoch"] == 2 and table.loc[0, "epochs_to_target"] == 2
    assert table.loc[0, "last_epoch"] == 3 and table.loc[0, "epochs"] == 3
    from analysis import epoch_summary

    assert epoch_summary(metrics, cases)["epoch"].tolist() == [1, 2, 3]
    # the per-step curve ends each epoch where the per-epoch curve puts it
    curve = step_curves(metrics, cases, metric="train_accuracy", smoothing=1)
    assert curve["epoch"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.timeout(60)
def test_step_curves_average_seeds_and_smooth():
    rows = []
    for case_id, offset in (("s1", 0.0), ("s2", 0.2)):
        for step, value in enumerate([0.0, 0.4, 0.8, 0.4]):  # 2 steps per epoch
            rows.append({"case_id": case_id, "split": "train", "epoch": step // 2, "step": step,
                         "cost": value + offset, "accuracy": 0.5})
    cases = pd.DataFrame({"case_id": ["s1", "s2"], "group": ["g", "g"]})
    curve = step_curves(pd.DataFrame(rows), cases, metric="train_cost", smoothing=3)
    assert curve["epoch"].tolist() == [0.5, 1.0, 1.5, 2.0]
    mean = np.array([0.1, 0.5, 0.9, 0.5])
    assert curve["value"].to_numpy() == pytest.approx(mean)
    # EMA, span 3 -> alpha .5, debiased: y_t = sum(.5^k x_{t-k}) / sum(.5^k)
    expected = [sum(0.5 ** k * mean[t - k] for k in range(t + 1)) / sum(0.5 ** k for k in range(t + 1))
                for t in range(4)]
    assert curve["smoothed"].to_numpy() == pytest.approx(expected)


@pytest.mark.timeout(120)
def test_report_with_a_baseline_keeps_the_plain_report(tmp_path):
    run = write_run(tmp_path / "sweep", TWO_LR)
    plain = report_module.write_report(run, figures=False)
    before = plain.read_text()
    assert main(["report", str(run), "--baseline", "slow"]) == 0
    assert plain.read_text() == before
    with_baseline = run / "report-vs-slow" / "report.md"
    assert "## Against the baseline `slow`" in with_baseline.read_text()


@pytest.mark.timeout(120)
def test_bad_baseline_and_bad_out_are_one_line_exit_2(tmp_path, capsys):
    run = write_run(tmp_path / "sweep", TWO_LR)
    capsys.readouterr()
    assert main(["report", str(run), "--baseline", "zz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zz" in err and "fast" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["cases.parquet", "ledger", "manifest.json", "metrics", "weights"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(run), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "regular file" in err
    assert blocker.read_text() == "x" and not (run / "report").exists()


@pytest.mark.timeout(120)
def test_two_runs_in_one_report_with_a_baseline_in_one_of_them(tmp_path, monkeypatch):
    first = write_run(tmp_path / "runs" / "one", TWO_LR)
    second = write_run(tmp_path / "runs" / "two", {
        "slow": {"settings": {"lr": 0.001}, "test": [.35, .45], "train": [[.2, .3], [.4, .5]]},
        "faster": {"settings": {"lr": 0.004, "epochs": 5}, "test": [.7, .9], "train": [[.4, .6], [.7, .9]]}})
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(first), str(second), "--baseline", "one:slow"]) == 0
    out = tmp_path / "reports" / "one+two-vs-one_slow"
    table = pd.read_csv(out / "per_case.csv")
    assert table["run"].tolist() == ["one", "one", "two", "two"]
    assert dict(zip(table["run"] + "/" + table["name"], table["lr"])) == {
        "one/fast": .002, "one/slow": .001, "two/faster": .004, "two/slow": .001}
    # the epochs setting (5 planned, stopped after 2) next to the epochs logged
    assert table["epochs (setting)"].tolist() == [2, 2, 2, 5] and table["epochs"].tolist() == [2, 2, 2, 2]
    text = (out / "report.md").read_text()
    assert "Settings that differ between cases: `lr`, `epochs`" in text
    diff = pd.read_csv(out / "against_baseline.csv").set_index(["run", "group"])["diff_mean"]
    # every case of both runs against one/slow (final .5), paired by seed
    assert diff.to_dict() == pytest.approx({("one", "fast"): .8 - .5, ("two", "faster"): .9 - .5,
                                            ("two", "slow"): .45 - .5})
    # "faster" is in one run only: a plain name is enough
    assert main(["report", str(first), str(second), "--baseline", "faster"]) == 0
    assert (tmp_path / "reports" / "one+two-vs-faster" / "report.md").exists()


@pytest.mark.timeout(60)
def test_runs_lists_good_and_damaged_runs(tmp_path, capsys):
    folder = tmp_path / "runs"
    write_run(folder / "good", TWO_LR, created=1.7e9)
    partial = write_run(folder / "partial", TWO_LR, created=1.7e9 + 10)
    (partial / "ledger" / "id001.json").write_text("{not json")
    (folder / "empty").mkdir()
    (folder / "broken").mkdir()
    (folder / "broken" / "manifest.json").write_text("[1, 2")
    (folder / "stray.txt").write_text("not a folder")
    assert main(["runs", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "suite", "created"]
    by_run = {line.split()[0]: line for line in lines[1:]}
    assert set(by_run) == {"good", "partial", "empty", "broken"}
    assert "2 done" in by_run["good"] and "2m00s" in by_run["good"] and "2023-11-14 22:13:20" in by_run["good"]
    assert "1 done" in by_run["partial"] and "1 unreadable ledger entry" in by_run["partial"]
    assert "not a run" in by_run["empty"] and "damaged manifest.json" in by_run["broken"]
    assert [i["run"] for i in list_runs(folder)][:2] == ["good", "partial"]
    assert format_runs([]) == "no runs"
    assert main(["runs", str(tmp_path / "nowhere")]) == 2


@pytest.mark.timeout(60)
def test_help_shows_defaults_and_cases_keeps_whole_words():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    run_help = sub["run"].format_help()
    assert "(default: 2)" in " ".join(run_help.split()) and "(default: 0)" in " ".join(run_help.split())
    assert "(default: runs)" in " ".join(sub["runs"].format_help().split())
    assert "(default: 1e-06)" in " ".join(sub["gradcheck"].format_help().split())
    assert "(default: None)" not in run_help
    from jobs import suites

    listing = subprocess.run([sys.executable, "-m", "jobs", "cases"], capture_output=True, text=True, timeout=60,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert listing.returncode == 0
    for line in listing.stdout.splitlines():
        name, _, _, shown = line.split(None, 3)
        words = suites.load_suite(name).description.split()
        shown_words = shown.removesuffix(" ...").split()
        assert shown_words == words[:len(shown_words)], line  # never a word cut in two


# ---- real runs -------------------------------------------------------------------------------

TINY_SUITE = """\
name: tiny-lr
description: two learning rates, a tiny MLP on digits
defaults: {model: mlp, hidden: [8], data: {name: digits, train_size: 200, test_size: 100}, batch_size: 20}
cases:
  low: {lr: 0.001}
  high: {lr: 0.01}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_runs_listed_and_reported_together(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_SUITE)

    def in_tmp(*args):
        return bplab(*args, cwd=tmp_path, timeout=420)

    for name, epochs in (("first", "1"), ("second", "2")):
        done = in_tmp("run", str(suite), "--out", f"runs/{name}", "--set", f"epochs={epochs}", "--set",
                      "steps_per_epoch=2", "--progress-every", "0")
        assert done.returncode == 0, done.stderr[-3000:]
    listing = in_tmp("runs")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert set(lines) == {"first", "second"} and all("2 done" in line and "tiny-lr" in line for line in lines.values())

    one = pd.read_csv(tmp_path / "runs" / "first" / "report" / "per_case.csv")
    assert dict(zip(one["name"], one["lr"])) == {"low": 0.001, "high": 0.01}

    both = in_tmp("report", "runs/first", "runs/second", "--baseline", "first:low")
    assert both.returncode == 0, both.stderr
    out = tmp_path / "reports" / "first+second-vs-first_low"
    table = pd.read_csv(out / "per_case.csv")
    assert sorted(zip(table["run"], table["name"], table["epochs"])) == [
        ("first", "high", 1), ("first", "low", 1), ("second", "high", 2), ("second", "low", 2)]
    assert {"lr", "epochs"} <= set(pd.read_csv(out / "per_case.csv").columns)
    text = (out / "report.md").read_text()
    assert "Settings that differ between cases: `lr`, `epochs`" in text or \
        "Settings that differ between cases: `epochs`, `lr`" in text
    raw = load(tmp_path / "runs" / "second").metrics
    final = raw[raw["split"] == "test"].sort_values("step").groupby("case_id", observed=True)["accuracy"].last()
    second = table[table["run"] == "second"]
    for row in second.itertuples():
        assert row.final_test_acc == pytest.approx(final[str(row.case_id)])
    bad = in_tmp("report", "runs/first", "--baseline", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and not (tmp_path / "runs/first/report-vs-nope").exists()
    assert math.isfinite(table["final_test_acc"].sum())
