"""Plots: each function draws on a matplotlib `ax` it is given and returns it.

No pyplot here (no global figure state, no backend choice): make an axes with
`matplotlib.figure.Figure().subplots()` and save with `fig.savefig(path)`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.labels import as_sequence, is_number, setting_text
from analysis.stats import ci_half_width

_LEGEND_LIMIT = 20  # more lines than this: no legend (it would cover the plot)


def _labels_of(table: pd.DataFrame, by: str | Sequence[str]) -> pd.Series:
    """One label per row: the `by` value(s), prefixed by the run when there are several."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in table]
    if missing:
        raise ValueError(f"column(s) {missing} not in the table; pass cases to the table function to add settings")
    if "run" in table and "run" not in by and "label" not in by:  # (labels.setting_labels names the run)
        by = ["run", *by]
    parts = [table[c].astype(str) for c in by]
    label = parts[0]
    for part in parts[1:]:
        label = label + " / " + part
    return label


_RUN_STYLES = ("-", "--", ":", "-.")


def _run_style(table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """Line style of a curve: one per run when several runs are drawn together."""
    if "run" not in table or rows.empty:
        return "-"
    runs = list(dict.fromkeys(table["run"].astype(str)))
    return _RUN_STYLES[runs.index(str(rows["run"].iloc[0])) % len(_RUN_STYLES)]


def _many_colors(n: int) -> np.ndarray:
    """n RGBA colours along viridis: lines too many to tell apart by a legend, told apart by order."""
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 0.95, max(n, 1)))[:n]


def _finish_legend(ax, n_lines: int) -> None:
    if 0 < n_lines <= _LEGEND_LIMIT:
        ax.legend(fontsize="small")


def plot_curves(ax, epoch_table: pd.DataFrame, metric: str = "test_accuracy", by: str | Sequence[str] = "group",
                band: str | None = "minmax"):
    """Mean of `metric` per epoch for each `by` value (seeds averaged), with a band over
    the cases of the group: band="minmax" (range), "ci" (95 % t interval) or None.

    x is the epoch, numbered from 1 (epochs completed). epoch_table comes from
    tables.epoch_summary(metrics, cases) (which adds group and the settings); by="label"
    with a column from labels.setting_labels names the settings in the legend.
    """
    table = epoch_table[epoch_table[metric].notna()] if metric in epoch_table else None
    if table is None:
        raise ValueError(f"metric {metric!r} not in the epoch table; columns: {', '.join(epoch_table.columns)}")
    from matplotlib.ticker import MaxNLocator  # here: keeps `import analysis` free of matplotlib

    if band not in ("minmax", "ci", None):
        raise ValueError(f"band must be 'minmax', 'ci' or None, not {band!r}")
    labels = _labels_of(table, by)
    # one grouped pass for every line (a groupby per line costs a millisecond each: hundreds of groups)
    stats = table.groupby([labels.rename("_label"), table["epoch"]], sort=True)[metric].agg(
        ["mean", "min", "max", "std", "count"])
    names = stats.index.get_level_values(0).to_numpy()
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]]) if len(names) else np.array([], dtype=int)
    bounds = list(zip(starts, [*starts[1:], len(names)]))
    many = len(bounds) > _LEGEND_LIMIT  # no legend: every line in one LineCollection, bands in one PolyCollection
    few_epochs = table["epoch"].nunique() <= 30  # then mark the points (a one-epoch case shows)
    x_all = stats.index.get_level_values(1).to_numpy(dtype=float)
    mean_all = stats["mean"].to_numpy(dtype=float)
    if band == "minmax":
        low_all, high_all = stats["min"].to_numpy(dtype=float), stats["max"].to_numpy(dtype=float)
    elif band == "ci":
        half = ci_half_width(stats["std"].to_numpy(dtype=float), stats["count"].to_numpy())
        low_all, high_all = mean_all - half, mean_all + half
    colors = _many_colors(len(bounds)) if many else None
    segments, polygons, polygon_colors = [], [], []
    label_values = labels.to_numpy()
    for index, (start, stop) in enumerate(bounds):
        x, mean = x_all[start:stop], mean_all[start:stop]
        if many:
            segments.append(np.column_stack([x, mean]))
            color = colors[index]
        else:
            label = names[start]
            style = _run_style(table, table[label_values == label].head(1)) if "run" in table else "-"
            (line,) = ax.plot(x, mean, style, label=str(label), linewidth=1.5,
                              marker="o" if few_epochs else None, markersize=3)
            color = line.get_color()
        if band is None:
            continue
        low, high = low_all[start:stop], high_all[start:stop]
        if not np.any(np.nan_to_num(high - low) > 0):
            continue
        if many:
            ok = np.isfinite(low) & np.isfinite(high)
            if ok.sum() >= 2:
                polygons.append(np.column_stack([np.r_[x[ok], x[ok][::-1]], np.r_[low[ok], high[ok][::-1]]]))
                polygon_colors.append(color)
        else:
            ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    if many:
        from matplotlib.collections import LineCollection, PolyCollection

        if polygons:
            ax.add_collection(PolyCollection(polygons, facecolors=polygon_colors, alpha=0.08, linewidths=0))
        ax.add_collection(LineCollection(segments, colors=colors, linewidths=0.9, alpha=0.8))
        ax.autoscale_view()
    n_lines = len(bounds)
    ax.set_xlabel("epoch (from 1)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, alpha=0.3)
    _finish_legend(ax, n_lines)
    return ax


def rebin(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """A histogram's counts moved onto other bin edges, each old bin's count spread evenly
    over its width (the values inside a bin are not stored). The total is kept for the part
    of the range the new edges cover."""
    counts = np.asarray(counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    assert len(edges) == len(counts) + 1, f"{len(counts)} counts need {len(counts) + 1} edges, got {len(edges)}"
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])  # count below each edge
    return np.diff(np.interp(np.asarray(new_edges, dtype=float), edges, cumulative))


def shared_bins(histograms: dict[str, pd.DataFrame], bins: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(edges, {name: counts}): the stored histograms (rows bin/left/right/count, each with its
    own edges) re-binned onto one grid of equal-width bins over their joint range, so that
    bars of the same height mean the same count per unit of value. bins: default the most
    bins any of them has."""
    spans = {}
    for name, hist in histograms.items():
        hist = hist.sort_values("bin")
        if len(hist):
            edges = np.append(hist["left"].to_numpy(dtype=float), hist["right"].to_numpy(dtype=float)[-1])
            spans[name] = (hist["count"].to_numpy(dtype=float), edges)
    if not spans:
        return np.array([]), {}
    low = min(edges[0] for _, edges in spans.values())
    high = max(edges[-1] for _, edges in spans.values())
    bins = bins or max(len(counts) for counts, _ in spans.values())
    if high <= low:
        high = low + 1.0
    grid = np.linspace(low, high, bins + 1)
    return grid, {name: rebin(counts, edges, grid) for name, (counts, edges) in spans.items()}


def plot_weight_histograms(ax, weights: pd.DataFrame, case_id: str, layer: str, param: str = "w",
                           run: str | None = None, legend: bool = True, title: bool = True):
    """Histogram of one layer's weights (param "w") or biases ("b") before vs after training,
    both on the same bins (shared_bins)."""
    rows = weights[(weights["case_id"].astype(str) == str(case_id)) & (weights["layer"].astype(str) == str(layer))
                   & (weights["param"].astype(str) == param)]
    if run is not None and "run" in rows:
        rows = rows[rows["run"].astype(str) == str(run)]
    phases = {phase: rows[rows["phase"].astype(str) == phase] for phase in ("before", "after")}
    edges, counts = shared_bins(phases)
    for phase, color in (("before", "tab:blue"), ("after", "tab:orange")):
        if phase not in counts:
            continue
        ax.stairs(counts[phase], edges, fill=True, alpha=0.4, color=color, label=phase)
        ax.stairs(counts[phase], edges, color=color, linewidth=1)
    if title:
        ax.set_title(f"{layer} {param}", fontsize="small")
    ax.set_xlabel("value", fontsize="small")
    ax.set_ylabel("count", fontsize="small")
    ax.tick_params(labelsize="x-small")
    if legend and counts:
        ax.legend(fontsize="x-small")
    return ax


def plot_step_curves(ax, step_table: pd.DataFrame, by: str | Sequence[str] = "group", raw: bool | None = None):
    """Per-step training curves from tables.step_curves: the smoothed mean per `by` value,
    over the faint unsmoothed one (raw: default when there are at most 6 curves).

    x is epochs completed (a step of epoch e, numbered from 1, lies in (e - 1, e]; the end of
    epoch e is at e, where plot_curves puts epoch e). The axis names the epochs, from 1: each
    label e stands under the middle of epoch e's steps, thin lines mark where epochs end."""
    labels = _labels_of(step_table, by)
    groups = list(step_table.groupby(labels, sort=True))
    raw = len(groups) <= 6 if raw is None else raw
    if len(groups) > _LEGEND_LIMIT:  # no legend: the smoothed lines in one LineCollection
        from matplotlib.collections import LineCollection

        segments = [np.column_stack([rows["epoch"].to_numpy(dtype=float), rows["smoothed"].to_numpy(dtype=float)])
                    for _, rows in groups]
        ax.add_collection(LineCollection(segments, colors=_many_colors(len(groups)), linewidths=0.9, alpha=0.8))
        ax.autoscale_view()
        groups = []
    for label, rows in groups:
        x = rows["epoch"].to_numpy(dtype=float)
        (line,) = ax.plot(x, rows["smoothed"].to_numpy(dtype=float), _run_style(step_table, rows), label=str(label),
                          linewidth=1.5)
        if raw:
            ax.plot(x, rows["value"].to_numpy(dtype=float), color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("epoch (from 1; per step)")
    _epoch_axis(ax, float(np.nanmax(step_table["epoch"].to_numpy(dtype=float))) if len(step_table) else 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    _finish_legend(ax, len(groups))  # none when drawn as one collection
    return ax


def _epoch_axis(ax, last: float, most_labels: int = 10, most_lines: int = 60) -> None:
    """An x axis in epochs completed, labelled by epoch number from 1: epoch e spans (e-1, e]
    and its label e stands at e - 0.5; epoch ends are minor ticks with grid lines (while
    there are at most `most_lines`)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    epochs = max(1, int(np.ceil(last - 1e-9)))
    numbers = [int(e) for e in MaxNLocator(nbins=most_labels, integer=True, min_n_ticks=1).tick_values(1, epochs)
               if 1 <= e <= epochs and float(e).is_integer()] or [1]
    if numbers[0] != 1:  # the first label is always epoch 1
        step = numbers[1] - numbers[0] if len(numbers) > 1 else numbers[0]
        numbers = [1, *numbers] if numbers[0] - 1 >= step / 2 else [1, *numbers[1:]]
    ax.set_xlim(0, epochs)
    ax.xaxis.set_major_locator(FixedLocator([e - 0.5 for e in numbers]))
    ax.set_xticklabels([str(e) for e in numbers])
    ax.tick_params(axis="x", which="major", length=0)
    if epochs <= most_lines:
        ax.xaxis.set_minor_locator(FixedLocator(list(range(epochs + 1))))
        ax.grid(True, axis="x", which="minor", alpha=0.3)
    else:
        ax.xaxis.set_minor_locator(NullLocator())


def plot_update_counts(ax, update_table: pd.DataFrame, by: str = "schedule"):
    """Grouped bars: mean updates per step of each layer (x), one bar per `by` value
    (schedule by default; falls back to group, then case_id, when the column is missing)."""
    if by not in update_table:
        by = next(c for c in ("group", "name", "case_id") if c in update_table)
    labels = _labels_of(update_table, by)
    table = update_table.assign(_label=labels.to_numpy())
    pivot = table.pivot_table(index=["layer_index", "layer"], columns="_label", values="mean_updates",
                              aggfunc="mean", observed=True).sort_index()
    n_layers, n_bars = pivot.shape
    width = 0.8 / max(n_bars, 1)
    x = np.arange(n_layers)
    for i, label in enumerate(pivot.columns):
        ax.bar(x + (i - (n_bars - 1) / 2) * width, pivot[label].to_numpy(), width, label=str(label))
    ax.set_xticks(x, [layer for _, layer in pivot.index])
    ax.set_xlabel("layer (bottom first)")
    ax.set_ylabel("updates per step")
    ax.grid(True, axis="y", alpha=0.3)
    _finish_legend(ax, n_bars)
    return ax


def plot_layer_stats(ax, layer_stats: pd.DataFrame, case_id: str, layer: str, quantity: str = "weights",
                     run: str | None = None):
    """Mean +- std of one layer's quantity (weights, biases, preact, act) over steps, with min and max dotted."""
    rows = layer_stats[(layer_stats["case_id"].astype(str) == str(case_id))
                       & (layer_stats["layer"].astype(str) == str(layer))
                       & (layer_stats["quantity"].astype(str) == quantity)]
    if run is not None and "run" in rows:
        rows = rows[rows["run"].astype(str) == str(run)]
    rows = rows.sort_values("step")
    step = rows["step"].to_numpy(dtype=float)
    mean, std = rows["mean"].to_numpy(dtype=float), rows["std"].to_numpy(dtype=float)
    (line,) = ax.plot(step, mean, label="mean")
    ax.fill_between(step, mean - std, mean + std, color=line.get_color(), alpha=0.25, linewidth=0, label="± std")
    ax.plot(step, rows["min"].to_numpy(dtype=float), ":", color=line.get_color(), linewidth=0.8, label="min/max")
    ax.plot(step, rows["max"].to_numpy(dtype=float), ":", color=line.get_color(), linewidth=0.8)
    ax.set_title(f"{layer} {quantity}", fontsize="small")
    ax.set_xlabel("step", fontsize="small")
    ax.tick_params(labelsize="x-small")
    return ax


def plot_decision_boundary(ax, predict_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
                           resolution: int = 200, margin: float = 0.5):
    """Predicted class over a resolution x resolution grid around 2-D points x (N, 2), with the points.

    predict_fn maps an (M, 2) array to class probabilities (M, K), a probability of class 1
    (M,) or labels (M,).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y)
    assert x.ndim == 2 and x.shape[1] == 2, f"x must be (N, 2), got {x.shape}"
    (x0_low, x1_low), (x0_high, x1_high) = x.min(axis=0) - margin, x.max(axis=0) + margin
    grid0, grid1 = np.meshgrid(np.linspace(x0_low, x0_high, resolution), np.linspace(x1_low, x1_high, resolution))
    points = np.column_stack([grid0.ravel(), grid1.ravel()])  # (resolution**2, 2)
    out = np.asarray(predict_fn(points))
    if out.ndim == 2 and out.shape[1] > 1:
        labels = out.argmax(axis=1)
    elif np.issubdtype(out.dtype, np.floating) and out.size and np.all((out >= 0) & (out <= 1)) \
            and not np.all(np.equal(np.mod(out, 1), 0)):
        labels = (out.reshape(-1) > 0.5).astype(int)
    else:
        labels = out.reshape(-1).astype(int)
    n_classes = int(max(labels.max(initial=0), np.max(y, initial=0)) + 1)
    levels = np.arange(n_classes + 1) - 0.5
    ax.contourf(grid0, grid1, labels.reshape(grid0.shape), levels=levels, cmap="coolwarm", alpha=0.3)
    ax.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", vmin=0, vmax=max(n_classes - 1, 1), s=12,
               edgecolors="k", linewidths=0.3)
    ax.set_xlim(x0_low, x0_high)
    ax.set_ylim(x1_low, x1_high)
    return ax


def plot_boundary_grid(ax, grid: pd.DataFrame, x: np.ndarray | None = None, y: np.ndarray | None = None):
    """Draw a stored decision-boundary grid (columns x0, x1, p1), and the data points if given."""
    table = grid.pivot_table(index="x1", columns="x0", values="p1")
    xs, ys = table.columns.to_numpy(dtype=float), table.index.to_numpy(dtype=float)
    ax.contourf(xs, ys, table.to_numpy(dtype=float), levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.6)
    ax.contour(xs, ys, table.to_numpy(dtype=float), levels=[0.5], colors="k", linewidths=1.0)
    if x is not None and y is not None:
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu_r", edgecolors="k", linewidths=0.3, s=10)
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    return ax


# ---- sweeps ----------------------------------------------------------------------------------


def _list_order(text: str):
    """Order of list settings on an axis: smallest total first, then fewer entries."""
    values = as_sequence(text)
    if isinstance(values, list) and all(is_number(v) for v in values):
        return (0, float(sum(values)), len(values), text)
    return (1, 0.0, 0, text)


def setting_axis(values: pd.Series | Sequence) -> tuple[np.ndarray, dict]:
    """Positions for a setting's values and how to label its axis: numbers as they are, with
    {"log": True} when every value is positive and they span a decade or more (max/min >= 10);
    anything else (lists such as hidden sizes, names) as ordered categories 0, 1, 2, ... with
    {"ticks": [their texts]}, lists by total size."""
    raw = [as_sequence(v) for v in values]
    if len(raw) and all(is_number(v) for v in raw):
        x = np.asarray(raw, dtype=float)
        return x, {"log": bool(np.all(x > 0) and x.max() / x.min() >= 10)}
    texts = [setting_text(v) for v in raw]
    order = sorted(set(texts), key=_list_order)
    position = {text: i for i, text in enumerate(order)}
    return np.array([position[text] for text in texts], dtype=float), {"ticks": order}


def parallel_positions(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """(positions, axes): each column of `frame` mapped onto [0, 1] for parallel coordinates.

    Numbers: (v - min) / (max - min), on log10(v) when setting_axis says log; categories: their
    position / (count - 1). A column with one value sits at 0.5. axes[column] has "log",
    "low"/"high" (numbers) or "ticks" (categories) for labelling.
    """
    positions, axes = {}, {}
    for column in columns:
        x, axis = setting_axis(frame[column])
        if "ticks" in axis:
            span = max(len(axis["ticks"]) - 1, 1)
            positions[column] = x / span if len(axis["ticks"]) > 1 else np.full(len(x), 0.5)
            axes[column] = {"log": False, "ticks": axis["ticks"]}
            continue
        t = np.log10(x) if axis["log"] else x
        low, high = float(np.nanmin(t)), float(np.nanmax(t))
        positions[column] = (t - low) / (high - low) if high > low else np.full(len(x), 0.5)
        axes[column] = {"log": axis["log"], "low": float(np.nanmin(x)), "high": float(np.nanmax(x)),
                        "values": sorted(set(x.tolist()))}
    return pd.DataFrame(positions, index=frame.index), axes


def plot_parallel_coordinates(ax, frame: pd.DataFrame, columns: Sequence[str], color_by: str | None = None,
                              cmap: str = "viridis"):
    """Parallel coordinates: one vertical axis per column (parallel_positions), one line per row
    of `frame`, all drawn as one LineCollection (fast for thousands of rows), coloured by
    `color_by` (the best on top)."""
    from matplotlib.collections import LineCollection

    columns = list(columns)
    positions, axes = parallel_positions(frame, columns)
    order = np.argsort(frame[color_by].to_numpy(dtype=float), kind="stable") if color_by else np.arange(len(frame))
    points = positions[columns].to_numpy(dtype=float)[order]
    x = np.arange(len(columns), dtype=float)
    segments = np.stack([np.broadcast_to(x, points.shape), points], axis=-1)  # (rows, columns, 2)
    lines = LineCollection(segments, linewidths=0.8, alpha=0.6 if len(frame) < 200 else 0.3, cmap=cmap)
    if color_by:
        lines.set_array(frame[color_by].to_numpy(dtype=float)[order])
    ax.add_collection(lines)
    for i, column in enumerate(columns):
        ax.axvline(i, color="0.2", linewidth=0.8)
        axis = axes[column]
        if "ticks" in axis:
            ticks = axis["ticks"]
            shown = ticks if len(ticks) <= 12 else ticks[::math.ceil(len(ticks) / 12)]
            marks = [(ticks.index(t) / max(len(ticks) - 1, 1) if len(ticks) > 1 else 0.5, t) for t in shown]
        else:
            values = axis["values"]
            if len(values) > 6:
                values = [values[0], values[len(values) // 2], values[-1]]
            low, high = axis["low"], axis["high"]
            scale = (lambda v: np.log10(v)) if axis["log"] else (lambda v: v)
            marks = [((scale(v) - scale(low)) / (scale(high) - scale(low)) if high > low else 0.5, f"{v:g}")
                     for v in values]
        for y, text in marks:
            ax.text(i + 0.04, y, text, fontsize=7, va="center", ha="left", color="0.15")
    ax.set_xlim(-0.2, len(columns) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(x, [c + (" (log)" if axes[c]["log"] else "") for c in columns], fontsize="small")
    ax.set_yticks([])
    return ax
