"""The run report: report.md with tables and PNG figures, plus every table as CSV.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot, no global
backend state), so this works headless and in threads.
"""

from __future__ import annotations

import json
import time
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.load import TABLE_COLUMNS, RunData, case_keys, load, local_path
from analysis.plots import plot_boundary_grid, plot_curves, plot_layer_stats, plot_update_counts, plot_weight_histograms
from analysis.tables import (
    against_baseline,
    epoch_summary,
    factor_table,
    per_case,
    reference_comparison,
    seed_summary,
    update_counts,
)

# The metrics columns the report reads (skips forward_passes, stages, ...).
REPORT_COLUMNS = (*TABLE_COLUMNS, "updates", "layers")

_PER_CASE_SHOWN = [
    "run", "case_id", "name", "group", "seed", "state", "epochs", "final_test_acc", "best_test_acc", "best_epoch",
    "final_train_acc", "gap", "epochs_to_target", "steps_per_sec", "wall_seconds",
    "data.name", "data_official", "data_digest",  # which data each case trained on
]


# ---- markdown -----------------------------------------------------------------------------


def _cell(value, float_format: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        text = float_format.format(value)
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4f}", index: bool = False,
                   max_rows: int | None = None) -> str:
    """A GitHub-flavoured markdown table (what DataFrame.to_markdown gives, without tabulate).

    Numbers are right-aligned; NaN and None are empty cells; '|' in text is escaped.
    max_rows: show only the first rows and say how many were left out.
    """
    if index:
        frame = frame.reset_index()
    columns = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    shown = frame if max_rows is None else frame.head(max_rows)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    # Float columns holding only whole numbers (counts with NaN for "none") print as integers.
    whole = {
        i for i, c in enumerate(frame.columns)
        if pd.api.types.is_float_dtype(frame[c]) and frame[c].notna().any()
        and bool(np.all(np.mod(frame[c].dropna().to_numpy(dtype=float), 1) == 0))
    }
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |",
             "|" + "|".join("---:" if is_number else ":---" for is_number in numeric) + "|"]
    for row in shown.itertuples(index=False, name=None):
        cells = [_cell(v, "{:.0f}" if i in whole else float_format) for i, v in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if max_rows is not None and len(frame) > max_rows:
        lines.append(f"\n*{len(frame) - max_rows} more rows in the CSV.*")
    return "\n".join(lines)


# ---- figures ------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "case"


def _natural_key(text: str):
    """l2 before l10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _figure(**kwargs):
    """A new matplotlib Figure (Agg canvas when saved; no pyplot state). matplotlib is
    imported here so that `import analysis` stays light."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, out_dir: Path, name: str, title_inches: float = 0.35) -> str:
    # Fixed margins, in inches: tight_layout measures every tick label and doubled the
    # report's time.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                        top=1 - title_inches / height, wspace=0.35, hspace=0.6)
    fig.savefig(out_dir / name, dpi=80)
    return name


def _curve_figures(epochs: pd.DataFrame, out_dir: Path, by: str) -> list[tuple[str, str]]:
    figures = []
    for metric in ("test_accuracy", "train_accuracy", "test_cost", "train_cost"):
        if metric not in epochs or epochs[metric].notna().sum() == 0:
            continue
        fig = _figure(figsize=(7, 4.5))
        ax = fig.subplots()
        plot_curves(ax, epochs, metric=metric, by=by, band="minmax")
        ax.set_title(f"{metric.replace('_', ' ')} by {by} (band: min-max over seeds)")
        figures.append((metric.replace("_", " "), _save(fig, out_dir, f"curves_{metric}.png")))
    return figures


def _weight_figures(
    weights: pd.DataFrame, cases: Sequence[tuple], keys: list[str], out_dir: Path
) -> list[tuple[str, str]]:
    figures = []
    for key, label in cases:
        mask = np.ones(len(weights), dtype=bool)
        for column, value in zip(keys, key):
            mask &= (weights[column].astype(str) == str(value)).to_numpy()
        rows = weights[mask & (weights["param"].astype(str) == "w").to_numpy()]
        layers = sorted(set(rows["layer"].astype(str)), key=_natural_key)
        if not layers:
            continue
        columns = min(len(layers), 5)
        grid_rows = math.ceil(len(layers) / columns)
        fig = _figure(figsize=(3 * columns, 2.4 * grid_rows))
        axes = np.atleast_1d(fig.subplots(grid_rows, columns, squeeze=False)).ravel()
        for ax, layer in zip(axes, layers):
            plot_weight_histograms(ax, rows, key[-1], layer, "w", run=key[0] if len(key) == 2 else None)
        for ax in axes[len(layers):]:
            ax.set_axis_off()
        fig.suptitle(f"weights before vs after: {label}", fontsize="medium")
        figures.append((f"weights {label}", _save(fig, out_dir, f"weights_{_safe_name(label)}.png", title_inches=0.6)))
    return figures


def _layer_stats_figures(layer_stats: pd.DataFrame, cases: Sequence[tuple], keys: list[str],
                         out_dir: Path) -> list[tuple[str, str]]:
    figures = []
    for key, label in cases:
        mask = np.ones(len(layer_stats), dtype=bool)
        for column, value in zip(keys, key):
            mask &= (layer_stats[column].astype(str) == str(value)).to_numpy()
        rows = layer_stats[mask]
        if rows.empty:
            continue
        layers = sorted(set(rows["layer"].astype(str)), key=_natural_key)[:12]
        quantities = [q for q in ("weights", "biases", "preact", "act") if q in set(rows["quantity"].astype(str))]
        fig = _figure(figsize=(3 * len(quantities), 2.2 * len(layers)))
        axes = fig.subplots(len(layers), len(quantities), squeeze=False)
        for i, layer in enumerate(layers):
            for j, quantity in enumerate(quantities):
                plot_layer_stats(axes[i, j], rows, key[-1], layer, quantity, run=key[0] if len(key) == 2 else None)
        fig.suptitle(f"layer statistics (mean ± std, min/max dotted): {label}", fontsize="medium")
        name = f"layer_stats_{_safe_name(label)}.png"
        figures.append((f"layer statistics {label}", _save(fig, out_dir, name, title_inches=0.6)))
    return figures


def _boundary_figures(data: RunData, table: pd.DataFrame, out_dir: Path, limit: int = 15) -> list[tuple[str, str]]:
    """Decision boundaries of the 2-D classifiers (stored by the trainer at the end of a case)."""
    import json as json_module

    from analysis.load import resolve

    panels = []
    for label, location in data.paths.items():
        filesystem, root = resolve(location)
        folder = f"{root}/boundary"
        if filesystem.get_file_info(folder).type.name != "Directory":
            continue
        grid = pd.read_parquet(folder, filesystem=filesystem)
        grid["case_id"] = grid["case_id"].astype(str)
        rows = table if "run" not in table else table[table["run"].astype(str) == label]
        for row in rows.itertuples():
            cells = grid[grid["case_id"] == str(row.case_id)]
            if len(cells):
                panels.append((row, cells))
    if not panels:
        return []
    panels = panels[:limit]
    columns = min(5, len(panels))
    lines = -(-len(panels) // columns)
    fig = _figure(figsize=(3.2 * columns, 3.0 * lines))
    axes = np.atleast_1d(fig.subplots(lines, columns)).ravel()
    settings_json = {}
    if "settings_json" in data.cases:
        settings_json = dict(zip(data.cases["case_id"].astype(str), data.cases["settings_json"]))
    points = {}
    for ax, (row, cells) in zip(axes, panels):
        x = y = None
        stored = settings_json.get(str(row.case_id))
        if stored:
            if stored not in points:
                try:  # the training points, regenerated from the case's data settings (moons: no files)
                    from workers import settings as settings_module
                    from workers.data import load_dataset

                    dataset = load_dataset(settings_module.from_json(json_module.loads(stored)).data)
                    points[stored] = (dataset.x_train, dataset.y_train)
                except Exception:  # the figure is still useful without the points
                    points[stored] = (None, None)
            x, y = points[stored]
        plot_boundary_grid(ax, cells, x, y)
        ax.set_title(str(row.name), fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("decision boundaries (p(class 1); black line p = 0.5)")
    return [("decision boundaries", _save(fig, out_dir, "decision_boundaries.png", title_inches=0.5))]


# ---- the report ---------------------------------------------------------------------------


def _header(data: RunData) -> list[str]:
    lines = []
    for label, manifest in data.manifests.items():
        suite = manifest.get("suite", "?")
        lines.append(f"- run: `{data.paths.get(label, label)}`" + (f" (label `{label}`)" if data.multi_run else ""))
        lines.append(f"- suite: **{suite}**")
        commit = manifest.get("git_commit") or "unknown"
        dirty = " (dirty: uncommitted changes)" if manifest.get("git_dirty") else ""
        code = f"source sha256 `{manifest['source_sha256'][:16]}` ({manifest.get('source_files')} files), " \
            if manifest.get("source_sha256") else ""
        lines.append(f"- bplab {manifest.get('bplab_version') or 'unknown'}, {code}git commit `{commit}`{dirty}")
        if manifest.get("created_at"):
            created = manifest["created_at"]
            if isinstance(created, (int, float)):  # the driver writes unix seconds
                created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))
            lines.append(f"- created: {created}")
        versions = manifest.get("versions") or {}
        if versions:
            lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        if manifest.get("command"):
            lines.append("- command: `" + " ".join(map(str, manifest["command"])) + "`")
        # the suite's full text stays in manifest.json; the description says what it is
        shown = {"suite", "git_commit", "git_dirty", "bplab_version", "created_at", "versions", "command", "suite_text",
                 "source_sha256", "source_files"}
        for key, value in manifest.items():
            if key not in shown and value not in (None, "", [], {}):
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                lines.append(f"- {key.replace('_', ' ')}: {text if len(text) < 300 else text[:297] + '...'}")
    return lines


def _flatten_pivot(pivot: pd.DataFrame) -> pd.DataFrame:
    flat = pivot.copy()
    flat.columns = [
        " / ".join(map(str, c)) if isinstance(c, tuple) else f"{pivot.columns.name}={c}" for c in flat.columns
    ]
    return flat.reset_index()


def _figure_cases(data: RunData, table: pd.DataFrame, limit: int) -> list[tuple[tuple, str]]:
    """Up to `limit` cases to draw: one per group first (first seed), done cases first."""
    keys = case_keys(table)
    ordered = table.sort_values(["complete", "group", "seed"], ascending=[False, True, True], kind="stable")
    firsts = ordered.drop_duplicates("group" if "run" not in table else ["run", "group"])
    rest = ordered.drop(firsts.index)
    chosen = pd.concat([firsts, rest]).head(limit)
    out = []
    for _, row in chosen.iterrows():
        label = str(row["name"]) if pd.notna(row["name"]) else str(row["case_id"])
        if "run" in keys:
            label = f"{row['run']}-{label}"
        out.append((tuple(row[k] for k in keys), label))
    return out


def write_report(
    run: str | os.PathLike | Iterable[str | os.PathLike] | RunData,
    out_dir: str | os.PathLike | None = None,
    baseline: str | None = None,
    target_accuracy: float | None = None,
    reference: str | None = None,
    max_figure_cases: int = 4,
    figures: bool = True,
) -> Path:
    """Write report.md, its PNG figures and every table as CSV; return the report's path.

    run: a run directory (path or pyarrow.fs URI), several, or an already loaded RunData.
    out_dir: default RUN/report for one run on the local filesystem; required otherwise.
    baseline: a group (or case) name: adds each group's seed-paired difference to it.
    target_accuracy: adds epochs_to_target to the per-case table.
    reference: a reference table name (analysis.reference); default manifest["reference"].
    max_figure_cases: weight and layer-statistics figures for at most this many cases.
    figures: False writes the tables only (no PNGs; much faster).
    """
    data = run if isinstance(run, RunData) else load(run, metrics_columns=REPORT_COLUMNS)
    if out_dir is None:
        folder = local_path(next(iter(data.paths.values()))) if len(data.paths) == 1 else None
        if folder is None:
            raise ValueError("write_report: give out_dir (the run is remote, or there are several runs)")
        out_dir = folder / "report"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cases = data.cases
    keys = case_keys(cases) if len(cases.columns) else case_keys(data.metrics)
    epochs = epoch_summary(data.metrics, cases)
    table = per_case(data.metrics, cases, target_accuracy=target_accuracy)
    csvs = {"per_case": table, "epoch_summary": epochs}

    title = ", ".join(str(m.get("suite", "?")) for m in data.manifests.values()) or "run"
    md = [f"# bplab report: {title}", ""]
    md += _header(data)
    md.append("")

    counts = table["state"].value_counts()
    md.append(f"{len(table)} cases: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + ".")
    md.append("")
    not_done = table[~table["complete"]]
    if len(not_done):
        md.append(f"> **PARTIAL RUN**: {len(not_done)} of {len(table)} cases are not done. Their numbers are "
                  "incomplete; seed summaries, factor and baseline tables leave them out.")
        md.append("")
        shown = [c for c in [*keys, "name", "state", "reason_class", "reason", "epochs"] if c in not_done]
        md.append(markdown_table(not_done[shown]))
        md.append("")
        csvs["not_done"] = not_done[shown]

    md += ["## Per case", ""]
    md.append("final = last epoch logged; train accuracy = mean over the last epoch's batches; gap = train - test; "
              "steps/s = (train steps - 1) / wall-time span of the train steps.")
    md.append("")
    md.append(markdown_table(table[[c for c in _PER_CASE_SHOWN if c in table]], max_rows=200))
    md.append("")

    group_sizes = table.groupby([*(["run"] if "run" in table else []), "group"]).size()
    if len(group_sizes) and group_sizes.max() >= 2:
        seeds = seed_summary(table)
        csvs["seed_summary"] = seeds
        md += ["## Across seeds", "",
               "Mean, sample sd and half-width of the 95 % t interval over the done cases of each group.", ""]
        md.append(markdown_table(seeds, max_rows=200))
        md.append("")

    if all(c in cases for c in ("schedule", "augment")) and cases["schedule"].nunique() > 1 \
            and cases["augment"].nunique() > 1:
        pivot = factor_table(table, cases, rows="schedule", columns="augment")
        csvs["factor_table"] = _flatten_pivot(pivot)
        md += ["## Schedule x augmentation", "", "Mean final test accuracy of the done cases.", ""]
        md.append(markdown_table(_flatten_pivot(pivot)))
        md.append("")

    if baseline is not None:
        differences = against_baseline(table, cases, baseline)
        csvs["against_baseline"] = differences
        md += [f"## Against the baseline `{baseline}`", "",
               "Final test accuracy minus the baseline's at the same seed; mean and 95 % t half-width over seeds.", ""]
        md.append(markdown_table(differences))
        md.append("")

    reference = reference or data.manifest.get("reference")
    if reference:
        md += [f"## Against the source study (`{reference}`)", ""]
        try:
            comparison = reference_comparison(table, reference, cases, overrides=data.manifest.get("overrides") or ())
        except KeyError as error:
            md += [f"No reference table: {error}", ""]
        else:
            csvs["reference_comparison"] = comparison
            md.append("Source figures from docs/experiments.md; run values are means over seeds; diff = run - source, "
                      "given only where like is compared with like: the official data set and every setting the "
                      "source fixed unchanged. Otherwise the row is marked not comparable, with the reasons.")
            md.append("")
            shown = comparison.copy()
            if "comparable" in shown:
                shown["comparable"] = shown["comparable"].map(lambda ok: "yes" if ok else "not comparable")
            md.append(markdown_table(shown))
            md.append("")

    drawn: list[tuple[str, str]] = []  # (caption, file name)
    by = "group" if "group" in epochs else "case_id"
    updates = update_counts(data.metrics, cases)
    if len(updates):
        csvs["update_counts"] = updates
    if figures and len(epochs):
        drawn += _curve_figures(epochs, out_dir, by)
    if figures and len(updates):
        fig = _figure(figsize=(8, 4))
        ax = fig.subplots()
        plot_update_counts(ax, updates, by="schedule" if "schedule" in updates else by)
        ax.set_title("layer updates per step")
        drawn.append(("updates per layer", _save(fig, out_dir, "update_counts.png")))
    chosen = _figure_cases(data, table, max_figure_cases) if figures else []
    if chosen and len(data.weights):
        drawn += _weight_figures(data.weights, chosen, keys, out_dir)
    if chosen and len(data.layer_stats):
        drawn += _layer_stats_figures(data.layer_stats, chosen, keys, out_dir)
    if figures:
        drawn += _boundary_figures(data, table, out_dir)
    if drawn:
        md += ["## Figures", ""]
        for caption, name in drawn:
            md += [f"### {caption}", "", f"![]({name})", ""]

    for name, frame in csvs.items():
        frame.to_csv(out_dir / f"{name}.csv", index=False)
    md += ["## Files", "", "Tables as CSV: " + ", ".join(f"[{n}.csv]({n}.csv)" for n in csvs) + "."]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
