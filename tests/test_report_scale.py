"""The report at scale: many cases read as groups, sweep views, the list of sections.

Run directories are written here directly (as the driver leaves them, no training), with
final accuracies drawn from a seeded generator; every expected number is computed here from
those draws (scipy's t interval, log10 positions), never read back from the report's code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

import analysis.figures as figures_module
import analysis.report as report_module
from analysis.report import Progress, Section, write_report

METRICS_TYPES = pa.schema([
    ("split", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()), ("cost", pa.float64()),
    ("accuracy", pa.float64()), ("lr", pa.float64()), ("examples", pa.int64()), ("wall_time", pa.float64()),
    ("updates", pa.string()), ("layers", pa.string()),
])
EPOCHS = 3


def write_study(root: Path, groups: list[dict], seeds: int, rng_seed: int = 0,
                boundary: bool = True) -> dict[str, dict]:
    """A finished run directory: one case per group x seed, EPOCHS epochs of 2 train steps and a
    test row, weight histograms and (boundary) a decision-boundary grid per case. Returns, per
    case id, name, group, seed and the final test accuracy it was given."""
    rng = np.random.default_rng(rng_seed)
    root.mkdir(parents=True)
    (root / "ledger").mkdir()
    (root / "manifest.json").write_text(json.dumps({"suite": "scale", "created_at": 1.7e9}))
    rows, truth = [], {}
    for g, settings in enumerate(groups):
        group = "g" + "-".join(f"{k}{settings[k]}" for k in sorted(settings)).replace(" ", "")
        for seed in range(seeds):
            case_id = f"c{g:02d}s{seed}"
            name = f"{group}-s{seed}"
            tests = np.round(rng.uniform(0.5, 0.95, EPOCHS), 4)
            truth[case_id] = {"name": name, "group": group, "seed": seed, "final": float(tests[-1])}
            rows.append({"case_id": case_id, "name": name, "group": group, "seed": seed, "num_cpus": 1.0,
                         "num_gpus": 0.0, "model": "mlp", "data.name": "moons", "data.classes": None,
                         "epochs": EPOCHS, "lr": 0.01, "width": 1.0, "hidden": json.dumps([8]), **{
                             k: json.dumps(v) if isinstance(v, list) else v for k, v in settings.items()}})
            (root / "ledger" / f"{case_id}.json").write_text(json.dumps({
                "case_id": case_id, "name": name, "state": "done", "commit_seq": 1, "epoch": EPOCHS, "step": 0,
                "updated_at": 1.7e9, "reason_class": None, "reason": None}))
            metric_rows, step = [], 0
            for epoch in range(EPOCHS):
                for _ in range(2):
                    accuracy = float(rng.uniform(0.4, 0.9))
                    metric_rows.append({"split": "train", "epoch": epoch, "step": step, "cost": 1 - accuracy,
                                        "accuracy": accuracy, "lr": 0.01, "examples": 10, "wall_time": 1.7e9 + step,
                                        "updates": "[1, 1]", "layers": '["l1", "l2"]'})
                    step += 1
                metric_rows.append({"split": "test", "epoch": epoch, "step": step, "cost": 1 - tests[epoch],
                                    "accuracy": float(tests[epoch]), "wall_time": 1.7e9 + step + 0.5})
            folder = root / "metrics" / f"case_id={case_id}"
            folder.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(metric_rows, schema=METRICS_TYPES), folder / "part-000001.parquet")
            histograms = [{"phase": phase, "layer": layer, "param": "w", "bin": b, "left": scale * b,
                           "right": scale * (b + 1), "count": b + 1}
                          for phase, scale in (("before", 0.1), ("after", 0.3)) for layer in ("l1", "l2")
                          for b in range(4)]
            folder = root / "weights" / f"case_id={case_id}"
            folder.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(histograms), folder / "part-before.parquet")
            if not boundary:
                continue
            x0, x1 = np.meshgrid(np.linspace(-1, 1, 6), np.linspace(-1, 1, 6))
            p1 = 1 / (1 + np.exp(-(x0 + x1).ravel()))
            folder = root / "boundary" / f"case_id={case_id}"
            folder.mkdir(parents=True)
            pq.write_table(pa.table({"x0": x0.ravel(), "x1": x1.ravel(), "p1": p1, "label": (p1 >= .5).astype(int)}),
                           folder / "part-final.parquet")
    pq.write_table(pa.Table.from_pylist(rows), root / "cases.parquet")
    return truth


@pytest.fixture
def saved(monkeypatch):
    """Every figure the report saves through figures._save: {file name: Figure} (before saving)."""
    seen = {}
    original = figures_module._save

    def save(fig, out_dir, name, **kwargs):
        seen[name] = {"axes": [(ax.get_title(), ax.get_xscale(), [t.get_text() for t in ax.get_xticklabels()],
                                [c for c in ax.collections]) for ax in fig.axes],
                      "suptitle": fig._suptitle.get_text() if fig._suptitle else ""}
        for ax in fig.axes:  # the drawn data, before _save clears the figure
            for collection in ax.collections:
                collection._kept_segments = [np.asarray(s) for s in getattr(collection, "get_segments", list)()]
                collection._kept_array = collection.get_array()
        return original(fig, out_dir, name, **kwargs)

    monkeypatch.setattr(figures_module, "_save", save)
    return seen


def _table_rows(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first markdown table after `heading`."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return table[0], table[2:]


ACTIVATION_LR = [{"activation": a, "lr": lr} for a in ("relu", "tanh") for lr in (0.01, 0.1)]


@pytest.mark.timeout(120)
def test_many_cases_report_groups_with_intervals(tmp_path, saved):
    truth = write_study(tmp_path / "run", ACTIVATION_LR, seeds=5)  # 20 cases, above the 8 of one figure
    path = write_report(tmp_path / "run")
    text = path.read_text()
    assert "## Per group" in text and "## Per case" not in text and "## Across seeds" not in text

    # the per-case table: the CSV only, complete
    per_case = pd.read_csv(path.parent / "per_case.csv")
    assert sorted(per_case["case_id"]) == sorted(truth)
    assert dict(zip(per_case["case_id"], per_case["final_test_acc"])) == pytest.approx(
        {cid: t["final"] for cid, t in truth.items()})
    per_group = text[text.index("## Per group"):text.index("## Diverged")]
    assert not any(t["name"] in per_group for t in truth.values())  # no per-case rows

    # the per-group table: mean and 95 % t interval, worked out here with scipy
    finals = pd.DataFrame(truth.values()).groupby("group")["final"]
    expected = {}
    for group, values in finals:
        values = values.to_numpy()
        low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
        expected[group] = (values.mean(), low, high)
    header, rows = _table_rows(text, "## Per group")
    assert header[:5] == ["group", "lr", "activation", "cases", "n"]  # the varied settings, in the cases' order
    shown = {row[0]: dict(zip(header, row)) for row in rows}
    assert set(shown) == set(expected)
    for group, (mean, low, high) in expected.items():
        assert shown[group]["cases"] == "5" and shown[group]["n"] == "5"
        assert float(shown[group]["final test acc"]) == pytest.approx(mean, abs=5e-5)
        assert shown[group]["final test acc 95 % interval"] == f"{low:.4f} – {high:.4f}"
    groups = pd.read_csv(path.parent / "per_group.csv").set_index("group")
    for group, (mean, low, high) in expected.items():
        assert groups.loc[group, "final_test_acc_low"] == pytest.approx(low, rel=1e-9)
        assert groups.loc[group, "final_test_acc_high"] == pytest.approx(high, rel=1e-9)

    # figures: four curves, the two sweep views, one weights figure and one boundary figure of
    # the first seed of each of the 4 groups (the report names them); bands are the interval
    images = sorted(p.name for p in path.parent.glob("*.png"))
    assert images == sorted(["curves_test_accuracy.png", "curves_train_accuracy.png", "curves_test_cost.png",
                             "curves_train_cost.png", "sweep_settings.png", "parallel_coordinates.png",
                             "weights.png", "decision_boundaries.png"])
    firsts = sorted(t["name"] for t in truth.values() if t["seed"] == 0)
    note = next(line for line in text.splitlines() if line.startswith("- With 20 cases"))
    assert "the first seed of each group: " + ", ".join(firsts) + "." in note
    assert "95 % interval of the mean" in saved["curves_test_accuracy.png"]["axes"][0][0]
    assert "min-max" not in text


@pytest.mark.timeout(60)
def test_at_the_threshold_nothing_changes(tmp_path):
    write_study(tmp_path / "run", ACTIVATION_LR, seeds=2)  # 8 cases: as before
    text = write_report(tmp_path / "run", figures=False).read_text()
    assert "## Per case" in text and "## Across seeds" in text and "## Per group" not in text
    text = write_report(tmp_path / "run", out_dir=tmp_path / "low", figures=False, many_cases=7).read_text()
    assert "## Per group" in text and "## Per case" not in text


GRID = [{"lr": lr, "width": width, "hidden": hidden}
        for lr in (0.001, 0.01, 0.1) for width in (0.5, 1.0, 2.0) for hidden in ([4], [8, 8])]


@pytest.mark.timeout(120)
def test_sweep_views_and_the_named_sample(tmp_path, saved):
    truth = write_study(tmp_path / "run", GRID, seeds=1, boundary=False)  # 18 groups of one seed
    path = write_report(tmp_path / "run")
    text = path.read_text()
    assert (path.parent / "sweep_settings.png").exists() and (path.parent / "parallel_coordinates.png").exists()

    # final test accuracy against each varied setting: lr on a log axis (it spans two decades),
    # width linear, hidden sizes as ordered categories (the cases table's order: lr, width, hidden)
    axes = saved["sweep_settings.png"]["axes"]
    assert [ax[1] for ax in axes] == ["log", "linear", "linear"]
    assert axes[2][2] == ["[4]", "[8, 8]"]

    # parallel coordinates: one line per case through lr, width, hidden and final test accuracy,
    # at positions worked out here: log10 for lr, linear for width, category index for hidden
    (collection,) = [c for c in saved["parallel_coordinates.png"]["axes"][0][3]
                     if len(getattr(c, "_kept_segments", [])) == len(truth)]
    finals = np.array([t["final"] for t in truth.values()])
    expected = []
    for t, settings in zip(truth.values(), GRID):
        expected.append((
            (math.log10(settings["lr"]) - math.log10(0.001)) / 2,
            (settings["width"] - 0.5) / 1.5,
            0.0 if settings["hidden"] == [4] else 1.0,
            (t["final"] - finals.min()) / (finals.max() - finals.min()),
        ))
    drawn = sorted(tuple(np.round(segment[:, 1], 9)) for segment in collection._kept_segments)
    assert drawn == sorted(tuple(np.round(row, 9)) for row in expected)
    for segment in collection._kept_segments:
        assert segment[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert sorted(collection._kept_array.tolist()) == pytest.approx(sorted(finals))  # coloured by accuracy
    assert saved["parallel_coordinates.png"]["axes"][0][2] == ["lr (log)", "width", "hidden", "final_test_acc"]

    # 18 groups: per-case figures draw 16 of them, evenly spaced, and the report names them
    names = sorted(t["name"] for t in truth.values())  # group order
    sample = [names[i] for i in np.unique(np.linspace(0, 17, 16).round().astype(int))]
    note = next(line for line in text.splitlines() if line.startswith("- With 18 cases"))
    assert "the first seed of 16 of the 18 groups, evenly spaced in group order: " + ", ".join(sample) + "." in note
    assert (path.parent / "weights_1.png").exists() and (path.parent / "weights_2.png").exists()
    assert not (path.parent / "weights_3.png").exists()


@pytest.mark.timeout(60)
def test_sections_are_a_list_and_nothing_leaves_no_heading(tmp_path, monkeypatch):
    write_study(tmp_path / "run", ACTIVATION_LR[:2], seeds=1)
    plain = write_report(tmp_path / "run", out_dir=tmp_path / "plain", figures=False).read_text()
    assert "## Against the baseline" not in plain  # no baseline: that section returned nothing

    def nothing(ctx):
        return None

    def extra(ctx):
        table = ctx.table[["case_id", "final_test_acc"]]
        return Section("Extra", [f"{len(table)} cases seen."], csvs={"extra": table})

    at = report_module.SECTIONS.index(report_module.figures_section)
    monkeypatch.setattr(report_module, "SECTIONS",
                        [*report_module.SECTIONS[:at], nothing, extra, *report_module.SECTIONS[at:]])
    text = write_report(tmp_path / "run", out_dir=tmp_path / "more", figures=False).read_text()
    assert "## Extra\n\n2 cases seen.\n\n" in text and "[extra.csv](extra.csv)" in text
    assert len(pd.read_csv(tmp_path / "more" / "extra.csv")) == 2
    # without the extra section the report is what it was: the None section left no trace
    monkeypatch.setattr(report_module, "SECTIONS", [*report_module.SECTIONS[:at], nothing,
                                                    *report_module.SECTIONS[at + 2:]])
    again = write_report(tmp_path / "run", out_dir=tmp_path / "again", figures=False).read_text()
    assert again == plain


@pytest.mark.timeout(30)
def test_progress_speaks_only_after_a_few_seconds(capsys):
    now = [100.0]
    progress = Progress(after=3.0, clock=lambda: now[0])
    progress("curves")
    now[0] = 103.5
    progress("weights")
    err = capsys.readouterr().err
    assert err == "[bplab] report: weights (4 s so far)\n"
