"""The report's figures: each a function `figure(ctx) -> Figures | None` listed in FIGURES.

A figure function reads what it needs from the report's context (analysis.report_context.ReportContext:
the loaded runs, the shared tables, the output folder, the options), saves its PNG files in
ctx.out_dir and returns their captions and names, with the figures it left out on purpose
(`skipped`: they would carry no information) and notes for the reader; None draws nothing.
The report's "Figures" section shows them in the order of FIGURES. Adding a figure is one
function and one entry in FIGURES.

Many cases (ctx.many: more than analysis.report_context.MANY_CASES): figures that draw cases one by one
(weights, layer statistics, decision boundaries) draw ctx.sample, the first seed of each group
(an evenly spaced sample of the groups when there are more than report_context.SAMPLE_CASES), and curve bands
are the 95 % interval of the mean over seeds, not the min-max of hundreds of them.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot, no global
backend state), so this works headless and in threads.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.labels import numeric_settings, setting_text
from analysis.plots import (
    plot_boundary_grid,
    plot_curves,
    plot_layer_stats,
    plot_parallel_coordinates,
    plot_step_curves,
    plot_update_counts,
    plot_weight_histograms,
    setting_axis,
)
from analysis.report_context import WEIGHT_CASES_PER_FIGURE, ReportContext
from analysis.tables import step_curves


BOUNDARY_PANELS = 15


@dataclass
class Figures:
    """What one figure function made: drawn (caption, file name in out_dir), skipped (what was
    left out as carrying no information, and why) and notes for the reader."""

    drawn: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- helpers ---------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "case"


def _natural_key(text: str):
    """l2 before l10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _figure(**kwargs):
    """A new matplotlib Figure (Agg canvas when saved; no pyplot state). matplotlib is
    imported here so that `import analysis` stays light."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, out_dir: Path, name: str, title_inches: float = 0.35, bottom_inches: float = 0.55,
          left_inches: float = 0.7) -> str:
    # Fixed margins, in inches: tight_layout measures every tick label and doubled the
    # report's time.
    width, height = fig.get_size_inches()
    if bottom_inches > 0.55:  # room for a legend below: the figure grows, the axes keep their size
        height += bottom_inches - 0.55
        fig.set_size_inches(width, height)
    fig.subplots_adjust(left=left_inches / width, right=1 - 0.15 / width, bottom=bottom_inches / height,
                        top=1 - title_inches / height, wspace=0.35, hspace=0.6)
    fig.savefig(out_dir / name, dpi=80)
    fig.clear()  # the artists go now, not when the collector gets to them
    return name


_LEGEND_ROWS_LIMIT = 20


def _legend_below(fig, ax) -> float:
    """A figure legend under the axes; returns the inches it needs at the bottom."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles or len(handles) > _LEGEND_ROWS_LIMIT:
        return 0.0
    width = fig.get_size_inches()[0]
    longest = max(len(label) for label in labels)
    columns = max(1, min(len(labels), int(width / (0.9 + 0.075 * longest))))
    rows = math.ceil(len(labels) / columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    return 0.22 * rows + 0.1


def _key_text(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One str per row joining `columns` (a hashable key for lookups across tables)."""
    text = frame[columns[0]].astype(str)
    for column in columns[1:]:
        text = text + "\x1f" + frame[column].astype(str)
    return text


# ---- curves ----------------------------------------------------------------------------------


def curve_figures(ctx: ReportContext) -> Figures | None:
    """Per-epoch curves of each metric (mean over the seeds of each group, with a band: the
    min-max over seeds, or with many cases the 95 % interval of the mean); the train
    metrics also per step, smoothed, in a panel next to it."""
    epochs = ctx.epochs
    if not len(epochs):
        return None
    keys = ctx.keys
    by_group = "group" in epochs
    group_columns = [*(["run"] if "run" in epochs else []), "group"] if by_group else keys
    rows = ctx.table.drop_duplicates(group_columns)
    labels = ctx.group_labels(rows, by="group" if by_group else "case_id")
    label_of = dict(zip(_key_text(rows, group_columns), labels))
    epochs = epochs.assign(label=_key_text(epochs, group_columns).map(label_of))
    steps = {}
    for metric in ("train_accuracy", "train_cost"):
        curve = step_curves(ctx.data.metrics, ctx.cases, metric=metric, by="group")
        if len(curve):
            step_columns = [*(["run"] if "run" in curve else []), "group"]
            steps[metric] = curve.assign(label=_key_text(curve, step_columns).map(label_of))
    band = ("ci" if ctx.many else "minmax") if ctx.several_seeds else None
    band_text = {"ci": " (band: 95 % interval of the mean over seeds)", "minmax": " (band: min-max over seeds)",
                 None: ""}[band]
    out = Figures()
    for metric in ("test_accuracy", "train_accuracy", "test_cost", "train_cost"):
        if metric not in epochs or epochs[metric].notna().sum() == 0:
            continue
        values = epochs[metric].dropna()
        per_step = steps.get(metric)
        if values.nunique() <= 1 and (per_step is None or per_step["value"].nunique() <= 1):
            out.skipped.append(f"{metric.replace('_', ' ')}: {values.iloc[0]:.4g} in every epoch of every case")
            continue
        ctx.progress(f"curves of {metric.replace('_', ' ')}")
        # one step per epoch (full batch): the per-step curve would repeat the per-epoch one
        several_steps = "steps" in epochs and bool((epochs["steps"] > 1).any())
        panels = 2 if per_step is not None and len(per_step) and several_steps else 1
        fig = _figure(figsize=(6.5 * panels, 4.5))
        axes = np.atleast_1d(fig.subplots(1, panels, sharey=True, squeeze=False)).ravel()
        plot_curves(axes[0], epochs, metric=metric, by="label", band=band)
        lines = len(label_of)
        axes[0].set_title("per epoch" + band_text + (f"\n{lines} groups, coloured in group order (no legend)"
                                                     if lines > _LEGEND_ROWS_LIMIT else ""), fontsize="medium")
        if panels == 2:
            plot_step_curves(axes[1], per_step, by="label")
            axes[1].set_title("per step (smoothed: EMA; faint: raw mean over seeds)", fontsize="medium")
        for ax in axes:
            if ax.get_legend():
                ax.get_legend().remove()
        bottom = _legend_below(fig, axes[0])
        fig.suptitle(metric.replace("_", " "), fontsize="medium")
        out.drawn.append((metric.replace("_", " "), _save(fig, ctx.out_dir, f"curves_{metric}.png", title_inches=0.6,
                                                          bottom_inches=0.55 + bottom)))
    return out


# ---- sweeps ----------------------------------------------------------------------------------


def sweep_figures(ctx: ReportContext) -> Figures | None:
    """A grid over numeric settings: the final test accuracy of each group (mean over seeds,
    95 % interval) against each varied setting, one line per combination of the other varied
    settings; and, with two or more varied settings, parallel coordinates of every varied
    setting and the final test accuracy, one line per done case."""
    groups = ctx.groups
    settings = ctx.group_settings
    numeric = numeric_settings(ctx.cases, settings)
    if not numeric or "final_test_acc_mean" not in groups or groups["final_test_acc_mean"].notna().sum() < 2:
        return None
    ctx.progress("sweep views")
    out = Figures()
    groups = groups[groups["final_test_acc_mean"].notna()]
    fig = _figure(figsize=(max(4.6 * len(numeric), 6.5), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(numeric), sharey=True, squeeze=False)).ravel()
    many_lines = False
    for ax, setting in zip(axes, numeric):
        x, axis = setting_axis(groups[setting])
        others = [s for s in settings if s != setting]
        if others:
            line_keys = groups[others].map(setting_text)
            line_label = [" ".join(f"{c}={v}" for c, v in zip(others, row)) for row in line_keys.itertuples(index=False)]
        else:
            line_label = [""] * len(groups)
        if "run" in groups:
            line_label = [f"{run}/{label}" if label else str(run) for run, label in zip(groups["run"], line_label)]
        mean = groups["final_test_acc_mean"].to_numpy(dtype=float)
        half = np.nan_to_num(groups["final_test_acc_ci95"].to_numpy(dtype=float))
        lines = pd.DataFrame({"label": line_label, "x": x, "mean": mean, "half": half})
        distinct = lines["label"].nunique()
        many_lines = many_lines or distinct > _LEGEND_ROWS_LIMIT
        for label, rows in lines.groupby("label", sort=True):
            rows = rows.sort_values("x")
            ax.plot(rows["x"], rows["mean"], marker="o", markersize=3, linewidth=1.2,
                    label=(label or "final test accuracy") if distinct <= _LEGEND_ROWS_LIMIT else None,
                    alpha=1.0 if distinct <= _LEGEND_ROWS_LIMIT else 0.5)
        bars = lines[lines["half"] > 0]
        if len(bars):
            ax.vlines(bars["x"], bars["mean"] - bars["half"], bars["mean"] + bars["half"], colors="0.3",
                      linewidth=0.8, alpha=0.6)
        if axis.get("log"):
            ax.set_xscale("log")
        if "ticks" in axis:
            ax.set_xticks(range(len(axis["ticks"])), axis["ticks"], rotation=30, fontsize="small")
        ax.set_xlabel(setting)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("final test accuracy")
    bottom = _legend_below(fig, axes[0]) if not many_lines else 0.0
    fig.suptitle("final test accuracy per group against each varied setting\n(mean over seeds; bars: 95 % interval)",
                 fontsize="medium")
    out.drawn.append(("final test accuracy against the varied settings",
                      _save(fig, ctx.out_dir, "sweep_settings.png", title_inches=0.75, bottom_inches=0.75 + bottom)))
    if len(settings) >= 2:
        done = ctx.table[ctx.table["complete"] & ctx.table["final_test_acc"].notna()]
        if len(done) >= 2:
            frame = done[[*ctx.keys, "final_test_acc"]].merge(ctx.case_settings[[*ctx.keys, *settings]],
                                                              on=ctx.keys, how="left")
            fig = _figure(figsize=(max(6.5, 1.6 * (len(settings) + 1) + 1.5), 4.5))
            ax = fig.subplots()
            plot_parallel_coordinates(ax, frame, [*settings, "final_test_acc"], color_by="final_test_acc")
            fig.suptitle(f"every varied setting and the final test accuracy: one line per done case ({len(done)})\n"
                         "colour: final test accuracy; (log): the setting spans a decade or more", fontsize="small")
            out.drawn.append(("parallel coordinates", _save(fig, ctx.out_dir, "parallel_coordinates.png",
                                                            title_inches=0.6, bottom_inches=0.7, left_inches=0.5)))
    return out


# ---- per-layer and per-case figures ----------------------------------------------------------


def update_figure(ctx: ReportContext) -> Figures | None:
    updates = ctx.updates
    if not len(updates):
        return None
    if updates["mean_updates"].round(9).nunique() <= 1:
        return Figures(skipped=[f"layer updates per step: {updates['mean_updates'].iloc[0]:g} for every layer "
                                "of every case"])
    ctx.progress("layer updates")
    fig = _figure(figsize=(8, 4))
    ax = fig.subplots()
    plot_update_counts(ax, updates, by="schedule" if "schedule" in updates else "group")
    ax.set_title("layer updates per step")
    return Figures(drawn=[("updates per layer", _save(fig, ctx.out_dir, "update_counts.png"))])


def weight_figures(ctx: ReportContext) -> Figures | None:
    """Weights before vs after training on shared bins: one row per case, one column per
    layer, WEIGHT_CASES_PER_FIGURE cases per figure: every case, or with many cases ctx.sample."""
    keys = ctx.keys
    logged = ctx.logged("weights")
    if not logged:
        return None
    cases = [(key, label) for key, label in (ctx.sample if ctx.many else ctx.figure_cases(None)) if key in logged]
    w = ctx.case_rows("weights", [key for key, _ in cases])
    if not len(w):
        return None
    w = w[w["param"].astype(str) == "w"]
    if w.empty:
        return None
    by_case = dict(tuple(w.groupby(_key_text(w, keys).to_numpy(), sort=False)))
    drawn = [(key, label, by_case["\x1f".join(key)]) for key, label in cases if "\x1f".join(key) in by_case]
    layers = sorted(set(w["layer"].astype(str)), key=_natural_key)
    out = Figures()
    pages = [drawn[i:i + WEIGHT_CASES_PER_FIGURE] for i in range(0, len(drawn), WEIGHT_CASES_PER_FIGURE)]
    for number, page in enumerate(pages, start=1):
        ctx.progress(f"weight histograms ({number} of {len(pages)})")
        fig = _figure(figsize=(max(2.2 * len(layers) + 0.8, 5.5), 1.7 * len(page) + 0.5))
        axes = fig.subplots(len(page), len(layers), squeeze=False)
        for i, (key, label, rows) in enumerate(page):
            present = set(rows["layer"].astype(str))
            for j, layer in enumerate(layers):
                ax = axes[i, j]
                if layer not in present:
                    ax.set_axis_off()
                    continue
                plot_weight_histograms(ax, rows, key[-1], layer, "w", run=key[0] if len(key) == 2 else None,
                                       legend=(i == 0 and j == 0), title=(i == 0))
                ax.set_xlabel("")
                ax.set_ylabel(label.split(": ")[0] if j == 0 else "", fontsize="small")  # settings: per-case table
        name = "weights.png" if len(pages) == 1 else f"weights_{number}.png"
        caption = "weights before vs after" + ("" if len(pages) == 1 else f" ({number} of {len(pages)})")
        fig.suptitle("weights before (blue) vs after (orange) training, same bins in each panel\n"
                     "rows: cases (counts), columns: layers", fontsize="small")
        width, height = fig.get_size_inches()
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.1 / width, bottom=0.35 / height,
                            top=1 - 0.8 / height, wspace=0.3, hspace=0.45)
        fig.savefig(ctx.out_dir / name, dpi=70)
        fig.clear()
        out.drawn.append((caption, name))
    return out


def layer_stats_figures(ctx: ReportContext) -> Figures | None:
    """Layer statistics over steps of at most options.max_figure_cases cases (one per group
    first): a figure each."""
    keys, table = ctx.keys, ctx.table
    logged = ctx.logged("layer_stats")
    if not logged:
        return None
    mask = np.array([key in logged for key in table[keys].astype(str).itertuples(index=False, name=None)], dtype=bool)
    limit = ctx.options.max_figure_cases
    chosen = ctx.figure_cases(limit, mask=mask)
    layer_stats = ctx.case_rows("layer_stats", [key for key, _ in chosen])
    by_case = dict(tuple(layer_stats.groupby(_key_text(layer_stats, keys).to_numpy(), sort=False))) \
        if len(layer_stats) else {}
    out = Figures()
    for key, label in chosen:
        ctx.progress(f"layer statistics of {label.split(': ')[0]}")
        rows = by_case.get("\x1f".join(key), layer_stats.iloc[:0])
        if rows.empty:
            continue
        if all(rows[c].nunique() <= 1 for c in ("mean", "std", "min", "max")):
            out.skipped.append(f"layer statistics of {label.split(': ')[0]}: constant over every step and layer")
            continue
        layers = sorted(set(rows["layer"].astype(str)), key=_natural_key)[:12]
        quantities = [q for q in ("weights", "biases", "feedback", "preact", "act") if q in set(rows["quantity"].astype(str))]
        fig = _figure(figsize=(3 * len(quantities), 2.2 * len(layers)))
        axes = fig.subplots(len(layers), len(quantities), squeeze=False)
        for i, layer in enumerate(layers):
            for j, quantity in enumerate(quantities):
                plot_layer_stats(axes[i, j], rows, key[-1], layer, quantity, run=key[0] if len(key) == 2 else None)
        fig.suptitle(f"layer statistics (mean ± std, min/max dotted): {label}", fontsize="medium")
        name = f"layer_stats_{safe_name(label.split(': ')[0])}.png"  # the case, without its settings
        out.drawn.append((f"layer statistics {label}", _save(fig, ctx.out_dir, name, title_inches=0.6)))
    if len(chosen) < mask.sum():
        out.notes.append(f"Layer statistics are drawn for {len(chosen)} of the {mask.sum()} cases that logged "
                         f"them (one per group first); every value is in RUN/layer_stats.")
    return out


def boundary_figures(ctx: ReportContext) -> Figures | None:
    """Decision boundaries of the 2-D classifiers (stored by the trainer at the end of a case):
    the first BOUNDARY_PANELS cases, or with many cases those of ctx.sample."""
    logged = ctx.logged("boundary")
    if not logged:
        return None
    table = ctx.table
    if ctx.many:
        chosen = {key for key, _ in ctx.sample}
        table = table[[key in chosen for key in table[ctx.keys].astype(str).itertuples(index=False, name=None)]]
    rows = [(row, tuple(str(getattr(row, k)) for k in ctx.keys)) for row in table.itertuples()]
    rows = [(row, key) for row, key in rows if key in logged]
    total = len(rows)
    rows = rows[:BOUNDARY_PANELS]  # only the grids drawn are read (14,400 rows a case)
    grid = ctx.case_rows("boundary", [key for _, key in rows])
    by_case = dict(tuple(grid.groupby(_key_text(grid, ctx.keys).to_numpy(), sort=False))) if len(grid) else {}
    panels = [(row, by_case["\x1f".join(key)]) for row, key in rows if "\x1f".join(key) in by_case]
    if not panels:
        return None
    out = Figures()
    if total > BOUNDARY_PANELS:
        out.notes.append(f"Decision boundaries are drawn for the first {BOUNDARY_PANELS} of the {total} "
                         "cases that stored one.")
    ctx.progress(f"decision boundaries ({len(panels)} cases)")
    columns = min(5, len(panels))
    lines = -(-len(panels) // columns)
    fig = _figure(figsize=(3.2 * columns, 3.0 * lines))
    axes = np.atleast_1d(fig.subplots(lines, columns)).ravel()
    settings_json = {}
    if "settings_json" in ctx.cases:
        settings_json = dict(zip(ctx.cases["case_id"].astype(str), ctx.cases["settings_json"]))
    points = {}
    for ax, (row, cells) in zip(axes, panels):
        x = y = None
        stored = settings_json.get(str(row.case_id))
        if stored:
            if stored not in points:
                try:  # the training points, regenerated from the case's data settings (moons: no files)
                    from workers import settings as settings_module
                    from workers.data import load_dataset

                    dataset = load_dataset(settings_module.from_json(json.loads(stored)).data)
                    points[stored] = (dataset.x_train, dataset.y_train)
                except Exception:  # the figure is still useful without the points
                    points[stored] = (None, None)
            x, y = points[stored]
        plot_boundary_grid(ax, cells, x, y)
        ax.set_title(str(row.name), fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("decision boundaries (p(class 1); black line p = 0.5)")
    out.drawn.append(("decision boundaries", _save(fig, ctx.out_dir, "decision_boundaries.png", title_inches=0.5)))
    return out


# The report's figures, in the order shown. A figure is a function (ctx) -> Figures | None.
FIGURES: list[Callable[[ReportContext], Figures | None]] = [
    curve_figures,
    sweep_figures,
    update_figure,
    weight_figures,
    layer_stats_figures,
    boundary_figures,
]
