# Long module: write_report with the figure builders only it calls.
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

from analysis.load import TABLE_COLUMNS, RunData, _run_labels, case_keys, load, local_path
from analysis.plots import (
    plot_boundary_grid,
    plot_curves,
    plot_layer_stats,
    plot_step_curves,
    plot_update_counts,
    plot_weight_histograms,
)
from analysis.tables import (
    COLLAPSE_MARGIN,
    against_baseline,
    epoch_summary,
    factor_table,
    flag_cases,
    per_case,
    reference_comparison,
    seed_summary,
    setting_labels,
    step_curves,
    update_counts,
    varying_settings,
)


class ReportError(ValueError):
    """A report that cannot be written as asked (e.g. a baseline no run has); one line."""

# The metrics columns the report reads (skips forward_passes, stages, ...).
REPORT_COLUMNS = (*TABLE_COLUMNS, "updates", "layers")

_PER_CASE_SHOWN = [
    "run", "case_id", "name", "group", "seed", "state", "flag", "epochs", "final_test_acc", "best_test_acc",
    "best_epoch", "final_train_acc", "gap", "epochs_to_target", "steps_per_sec", "wall_seconds",
    "data.name", "data_official", "data_digest",  # which data each case trained on
]
WEIGHT_CASES_PER_FIGURE = 8  # rows (cases) of one weights figure; more cases: more figures


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


def lost_workers(ledger: pd.DataFrame) -> pd.DataFrame:
    """One row per worker or node a case lost (the ledger entries' `losses`), oldest first."""
    columns = [*(["run"] if "run" in ledger else []), "name", "attempt", "reason_class", "node_id", "at", "step",
               "back_after_s", "counted"]
    rows = []
    if "losses" in ledger:
        for record in ledger.to_dict("records"):
            for loss in record.get("losses") if isinstance(record.get("losses"), list) else []:
                back = loss.get("resumed_at")
                rows.append({**({"run": record["run"]} if "run" in record else {}), "name": record.get("name"),
                             "attempt": loss.get("attempt"), "reason_class": loss.get("reason_class"),
                             "node_id": loss.get("node_id"),
                             "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(loss.get("at", 0))),
                             "step": loss.get("step"), "back_after_s": back - loss["at"] if back else None,
                             "counted": loss.get("counted", True)})
    return pd.DataFrame(rows, columns=columns)


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


def _save(fig, out_dir: Path, name: str, title_inches: float = 0.35, bottom_inches: float = 0.55) -> str:
    # Fixed margins, in inches: tight_layout measures every tick label and doubled the
    # report's time.
    width, height = fig.get_size_inches()
    if bottom_inches > 0.55:  # room for a legend below: the figure grows, the axes keep their size
        height += bottom_inches - 0.55
        fig.set_size_inches(width, height)
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=bottom_inches / height,
                        top=1 - title_inches / height, wspace=0.35, hspace=0.6)
    fig.savefig(out_dir / name, dpi=80)
    return name


def _legend_below(fig, ax, n_lines: int) -> float:
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


_LEGEND_ROWS_LIMIT = 20


def _curve_figures(epochs: pd.DataFrame, steps: dict[str, pd.DataFrame], out_dir: Path, seeds: bool,
                   skipped: list[str]) -> list[tuple[str, str]]:
    """Per-epoch curves of each metric (mean over seeds, min-max band when there are several
    seeds); the train metrics also per step, smoothed, in a panel next to it."""
    figures = []
    for metric in ("test_accuracy", "train_accuracy", "test_cost", "train_cost"):
        if metric not in epochs or epochs[metric].notna().sum() == 0:
            continue
        values = epochs[metric].dropna()
        per_step = steps.get(metric)
        if values.nunique() <= 1 and (per_step is None or per_step["value"].nunique() <= 1):
            skipped.append(f"{metric.replace('_', ' ')}: {values.iloc[0]:.4g} in every epoch of every case")
            continue
        # one step per epoch (full batch): the per-step curve would repeat the per-epoch one
        several_steps = "steps" in epochs and bool((epochs["steps"] > 1).any())
        panels = 2 if per_step is not None and len(per_step) and several_steps else 1
        fig = _figure(figsize=(6.5 * panels, 4.5))
        axes = np.atleast_1d(fig.subplots(1, panels, sharey=True, squeeze=False)).ravel()
        plot_curves(axes[0], epochs, metric=metric, by="label", band="minmax" if seeds else None)
        axes[0].set_title("per epoch" + (" (band: min-max over seeds)" if seeds else ""), fontsize="medium")
        if panels == 2:
            plot_step_curves(axes[1], per_step, by="label")
            axes[1].set_title("per step (smoothed: EMA; faint: raw mean over seeds)", fontsize="medium")
        n_lines = len(axes[0].get_lines())
        for ax in axes:
            if ax.get_legend():
                ax.get_legend().remove()
        bottom = _legend_below(fig, axes[0], n_lines)
        fig.suptitle(metric.replace("_", " "), fontsize="medium")
        figures.append((metric.replace("_", " "), _save(fig, out_dir, f"curves_{metric}.png", title_inches=0.6,
                                                         bottom_inches=0.55 + bottom)))
    return figures


def _weight_figures(weights: pd.DataFrame, cases: Sequence[tuple], keys: list[str],
                    out_dir: Path) -> list[tuple[str, str]]:
    """Weights before vs after training on shared bins: one row per case, one column per
    layer, WEIGHT_CASES_PER_FIGURE cases per figure (so every case gets one)."""
    w = weights[weights["param"].astype(str) == "w"]
    if w.empty:
        return []
    key_text = w[keys[0]].astype(str)
    for column in keys[1:]:
        key_text = key_text + "\x1f" + w[column].astype(str)
    by_case = {k: rows for k, rows in w.groupby(key_text.to_numpy(), sort=False)}
    drawn = [(key, label, by_case["\x1f".join(map(str, key))]) for key, label in cases
             if "\x1f".join(map(str, key)) in by_case]
    layers = sorted(set(w["layer"].astype(str)), key=_natural_key)
    figures = []
    pages = [drawn[i:i + WEIGHT_CASES_PER_FIGURE] for i in range(0, len(drawn), WEIGHT_CASES_PER_FIGURE)]
    for number, page in enumerate(pages, start=1):
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
        fig.savefig(out_dir / name, dpi=70)
        figures.append((caption, name))
    return figures


def _layer_stats_figures(layer_stats: pd.DataFrame, cases: Sequence[tuple], keys: list[str],
                         out_dir: Path, skipped: list[str] | None = None) -> list[tuple[str, str]]:
    figures = []
    for key, label in cases:
        mask = np.ones(len(layer_stats), dtype=bool)
        for column, value in zip(keys, key):
            mask &= (layer_stats[column].astype(str) == str(value)).to_numpy()
        rows = layer_stats[mask]
        if rows.empty:
            continue
        if skipped is not None and all(rows[c].nunique() <= 1 for c in ("mean", "std", "min", "max")):
            skipped.append(f"layer statistics of {label.split(': ')[0]}: constant over every step and layer")
            continue
        layers = sorted(set(rows["layer"].astype(str)), key=_natural_key)[:12]
        quantities = [q for q in ("weights", "biases", "feedback", "preact", "act") if q in set(rows["quantity"].astype(str))]
        fig = _figure(figsize=(3 * len(quantities), 2.2 * len(layers)))
        axes = fig.subplots(len(layers), len(quantities), squeeze=False)
        for i, layer in enumerate(layers):
            for j, quantity in enumerate(quantities):
                plot_layer_stats(axes[i, j], rows, key[-1], layer, quantity, run=key[0] if len(key) == 2 else None)
        fig.suptitle(f"layer statistics (mean ± std, min/max dotted): {label}", fontsize="medium")
        name = f"layer_stats_{_safe_name(label.split(': ')[0])}.png"  # the case, without its settings
        figures.append((f"layer statistics {label}", _save(fig, out_dir, name, title_inches=0.6)))
    return figures


def _boundary_figures(data: RunData, table: pd.DataFrame, out_dir: Path, limit: int = 15,
                      notes: list[str] | None = None) -> list[tuple[str, str]]:
    """Decision boundaries of the 2-D classifiers (stored by the trainer at the end of a case)."""
    import json as json_module

    panels = []
    grid = data.boundary  # (every registered dataset is a frame of the RunData)
    keys = [k for k in ("run", "case_id") if k in grid and k in table]
    cells_of = {key: cells for key, cells in grid.groupby([grid[k].astype(str) for k in keys], observed=True,
                                                          sort=False)} if len(grid) else {}
    for row in table.itertuples():
        key = tuple(str(getattr(row, k)) for k in keys)
        cells = cells_of.get(key)
        if cells is not None and len(cells):
            panels.append((row, cells))
    if not panels:
        return []
    if len(panels) > limit and notes is not None:
        notes.append(f"Decision boundaries are drawn for the first {limit} of the {len(panels)} cases that stored one.")
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
                 "source_sha256", "source_files", "data_sets"}
        data_sets = [d for d in manifest.get("data_sets") or [] if isinstance(d, dict)]
        lines += [data_set_line(d) for d in data_sets]
        listed = {d.get("fingerprint") for d in data_sets}
        if data_sets and set((manifest.get("data_fingerprints") or {}).values()) <= listed:
            shown.add("data_fingerprints")  # each is on its data set's line
        for key, value in manifest.items():
            if key not in shown and value not in (None, "", [], {}):
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                lines.append(f"- {key.replace('_', ' ')}: {text if len(text) < 300 else text[:297] + '...'}")
    return lines


def data_set_line(summary: dict) -> str:
    """One header line for a data set of the manifest (workers.data.Dataset.summary()): name,
    official or not and why, its files' digest, the arrays' fingerprint, sizes and where it was read."""
    identity = summary.get("identity") if isinstance(summary.get("identity"), dict) else {}
    name = summary.get("name") or identity.get("name") or "?"
    official = summary.get("official", identity.get("official"))
    status = {True: "official", False: "not official"}.get(official, "not checked")
    reason = identity.get("reason")
    text = f"- data set **{name}**: {status}" + (f" ({reason})" if reason else "")
    digest = summary.get("files_digest") or identity.get("digest")
    if digest and digest != name:  # the embedded sets have no files: their 'digest' is their name
        text += f"; files digest `{digest}`"
    if summary.get("fingerprint"):
        text += f"; data fingerprint `{str(summary['fingerprint'])[:16]}`"
    sizes = []
    for part in ("train", "test"):
        shape = summary.get(f"x_{part}")
        if isinstance(shape, (list, tuple)) and shape:
            sizes.append(f"{part} {shape[0]}" + (f" x {'x'.join(map(str, shape[1:]))}" if len(shape) > 1 else ""))
    if summary.get("num_classes"):
        sizes.append(f"{summary['num_classes']} classes")
    if sizes:
        text += "; " + ", ".join(sizes)
    if summary.get("source") and summary.get("source") != reason:
        text += f"; from `{summary['source']}`"
    return text


def _flatten_pivot(pivot: pd.DataFrame) -> pd.DataFrame:
    flat = pivot.copy()
    flat.columns = [
        " / ".join(map(str, c)) if isinstance(c, tuple) else f"{pivot.columns.name}={c}" for c in flat.columns
    ]
    return flat.reset_index()


def _figure_cases(table: pd.DataFrame, labels: pd.Series, limit: int | None) -> list[tuple[tuple, str]]:
    """The cases to draw (all, or the first `limit`): one per group first (first seed), done
    cases first; each with its label (name and the settings that tell it apart)."""
    keys = case_keys(table)
    table = table.assign(_label=labels.to_numpy())
    if limit is None:  # every case, in table order (run, group, seed)
        chosen = table.sort_values([c for c in ("run", "group", "seed") if c in table], kind="stable")
    else:
        ordered = table.sort_values(["complete", "group", "seed"], ascending=[False, True, True], kind="stable")
        firsts = ordered.drop_duplicates("group" if "run" not in table else ["run", "group"])
        rest = ordered.drop(firsts.index)
        chosen = pd.concat([firsts, rest]).head(limit)
    return [(tuple(row[k] for k in keys), str(row["_label"])) for _, row in chosen.iterrows()]


def _parse_baseline(table: pd.DataFrame, baseline: str) -> tuple[str, str | None]:
    """(group or case name, run label or None) for --baseline CASE or RUN:CASE; ReportError
    (one line) when no run has it."""
    runs = [str(r) for r in dict.fromkeys(table["run"])] if "run" in table else []
    name, run = baseline, None
    if ":" in baseline:
        prefix, rest = baseline.rsplit(":", 1)
        if runs and prefix in runs:
            name, run = rest, prefix
        elif not runs:
            name = rest  # one run: RUN:CASE names it; the case must still be there
    rows = table if run is None else table[table["run"].astype(str) == run]
    if not (rows["group"].astype(str).eq(name).any() or rows["name"].astype(str).eq(name).any()):
        groups = sorted(set(rows["group"].dropna().astype(str)))
        where = f" in run {run}" if run else ""
        hint = f"; runs: {', '.join(runs)}" if runs and run is None and ":" in baseline else ""
        raise ReportError(f"--baseline {baseline}: no case or group {name!r}{where}; groups: "
                          f"{', '.join(groups) or 'none'}{hint}")
    return name, run


def default_report_dir(runs: Sequence[str | os.PathLike], baseline: str | None = None) -> Path:
    """Where `bplab report` writes when --out is not given: RUN/report for one local run
    (RUN/report-vs-BASELINE with a baseline, so the plain report is never replaced), else
    reports/RUN1+RUN2... (with -vs-BASELINE) under the current folder."""
    suffix = f"-vs-{_safe_name(baseline)}" if baseline else ""
    runs = list(runs)
    folder = local_path(runs[0]) if len(runs) == 1 else None
    if folder is not None:
        return folder / f"report{suffix}"
    name = "+".join(_safe_name(label) for label in _run_labels(runs))
    if len(name) > 100:  # long lists of runs: a short, stable name
        import hashlib

        name = name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return Path("reports") / f"{name}{suffix}"


def write_report(
    run: str | os.PathLike | Iterable[str | os.PathLike] | RunData,
    out_dir: str | os.PathLike | None = None,
    baseline: str | None = None,
    target_accuracy: float | None = None,
    reference: str | None = None,
    max_figure_cases: int | None = 4,
    figures: bool = True,
) -> Path:
    """Write report.md, its PNG figures and every table as CSV; return the report's path.

    run: a run directory (path or pyarrow.fs URI), several, or an already loaded RunData.
    out_dir: default RUN/report (RUN/report-vs-BASELINE with a baseline) for one run on the
        local filesystem; required otherwise.
    baseline: a group (or case) name, or RUN:NAME for one in a given run of several: adds
        each group's seed-paired difference to it. ReportError, before anything is written,
        when no run has it.
    target_accuracy: adds epochs_to_target to the per-case table.
    reference: a reference table name (analysis.reference); default manifest["reference"].
    max_figure_cases: layer-statistics figures for at most this many cases (None: all);
        weight histograms are drawn for every case.
    figures: False writes the tables only (no PNGs; much faster).
    """
    data = run if isinstance(run, RunData) else load(run, metrics_columns=REPORT_COLUMNS)
    cases = data.cases
    keys = case_keys(cases) if len(cases.columns) else case_keys(data.metrics)
    epochs = epoch_summary(data.metrics, cases)
    table = per_case(data.metrics, cases, target_accuracy=target_accuracy)
    baseline_name = baseline_run = None
    if baseline is not None:
        baseline_name, baseline_run = _parse_baseline(table, baseline)
    if out_dir is None:
        folder = local_path(next(iter(data.paths.values()))) if len(data.paths) == 1 else None
        if folder is None:
            raise ValueError("write_report: give out_dir (the run is remote, or there are several runs)")
        out_dir = default_report_dir([folder], baseline)
    out_dir = Path(out_dir)
    blocked = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ReportError(f"cannot write the report to {out_dir}: {blocked} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)

    # What tells the cases apart: named in the per-case table and in every legend.
    settings = varying_settings(cases) if len(cases) else []
    labels = setting_labels(table, cases, by="name", settings=settings) if len(table) else pd.Series([], dtype=str)
    flags = flag_cases(table, cases) if len(table) else pd.DataFrame(columns=[*keys, "flag"])
    shown_table = table.merge(flags[[*keys, "flag"]], on=keys, how="left") if len(flags) else table.assign(flag="")
    shown_table["flag"] = shown_table["flag"].fillna("")
    # a setting named like a result column (epochs: planned vs logged) is shown as "epochs (setting)"
    setting_columns = {c: f"{c} (setting)" if c in shown_table else c for c in settings}
    if settings:
        shown_table = shown_table.merge(
            cases.assign(**{k: cases[k].astype(str) for k in keys})[[*keys, *settings]].drop_duplicates(keys)
            .rename(columns=setting_columns), on=keys, how="left")
    csvs = {"per_case": shown_table, "epoch_summary": epochs}

    title = ", ".join(str(m.get("suite", "?")) for m in data.manifests.values()) or "run"
    md = [f"# bplab report: {title}", ""]
    md += _header(data)
    md.append("")

    counts = table["state"].value_counts()
    md.append(f"{len(table)} cases: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + ".")
    if settings:
        md.append("Settings that differ between cases: " + ", ".join(f"`{c}`" for c in settings)
                  + " (in the tables and in every legend).")
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
    md.append("Epochs are numbered from 1 (epoch 1 = the first pass over the training set), here, in the CSVs "
              "and in the figures. final = last epoch logged; train accuracy = mean over the last epoch's batches; "
              "gap = train - test; steps/s = (train steps - 1) / wall-time span of the train steps; "
              "flag: see below.")
    md.append("")
    columns = [c for c in _PER_CASE_SHOWN if c in shown_table]
    at = columns.index("seed") + 1 if "seed" in columns else len(columns)
    columns[at:at] = [setting_columns[c] for c in settings]
    md.append(markdown_table(shown_table[columns], max_rows=200))
    md.append("")

    md += ["## Diverged or collapsed", ""]
    md.append(f"diverged: the loss became non-finite (the case stopped there). collapsed: the best test accuracy "
              f"was at least chance + (1 - chance) / 2 and the final one is at most chance + {COLLAPSE_MARGIN:g} "
              f"(chance = 1 / number of classes).")
    md.append("")
    if len(flags):
        csvs["flagged"] = flags
        md.append(markdown_table(flags))
    else:
        md.append("None.")
    md.append("")

    losses = lost_workers(data.ledger)
    if len(losses):
        csvs["lost_workers"] = losses
        md += ["## Lost workers and nodes", "",
               "Each worker a case lost: node_lost once the GCS declared its node dead, worker_died when the "
               "node lived on. An attempt resumed from its last commit (step); one that had not started its "
               "case used no retry. back after = seconds until the case ran again.", "",
               markdown_table(losses, float_format="{:.0f}"), ""]

    group_keys = [*(["run"] if "run" in table else []), "group"]
    group_sizes = table.groupby(group_keys).size()
    several_seeds = bool(len(group_sizes) and group_sizes.max() >= 2)
    if several_seeds:
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
        differences = against_baseline(table, cases, baseline_name, baseline_run=baseline_run)
        differences["baseline"] = baseline  # as given: RUN:CASE keeps its run
        csvs["against_baseline"] = differences
        md += [f"## Against the baseline `{baseline}`", "",
               "Final test accuracy minus the baseline's at the same seed; mean and 95 % t half-width over seeds."
               + (" Each run is compared with its own baseline." if "run" in table and baseline_run is None
                  and table.loc[(table["group"] == baseline_name) | (table["name"] == baseline_name), "run"].nunique() > 1
                  else ""), ""]
        md.append(markdown_table(differences))
        md.append("")

    reference = reference or data.manifest.get("reference")
    if reference:
        md += [f"## Against the source study (`{reference}`)", ""]
        try:
            comparison = reference_comparison(table, reference, cases, overrides=data.manifest.get("overrides") or (),
                                              alignment=getattr(data, "alignment", None))
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
    skipped: list[str] = []  # figures that would carry no information, and why
    notes: list[str] = []
    updates = update_counts(data.metrics, cases)
    if len(updates):
        csvs["update_counts"] = updates
    if figures and len(epochs):
        group_rows = epochs.drop_duplicates([*keys, "group"]) if "group" in epochs else epochs.drop_duplicates(keys)
        group_labels = setting_labels(group_rows, cases, by="group" if "group" in epochs else "case_id",
                                      settings=[c for c in settings if c != "seed"])
        label_of = dict(zip(group_rows[keys].astype(str).agg("\x1f".join, axis=1), group_labels))
        epochs_drawn = epochs.assign(label=epochs[keys].astype(str).agg("\x1f".join, axis=1).map(label_of))
        steps = {}
        for metric in ("train_accuracy", "train_cost"):
            curve = step_curves(data.metrics, cases, metric=metric, by="group")
            if len(curve):
                key_columns = [*(["run"] if "run" in curve else []), "group"]
                group_label = dict(zip(group_rows[key_columns].astype(str).agg("\x1f".join, axis=1), group_labels))
                steps[metric] = curve.assign(label=curve[key_columns].astype(str).agg("\x1f".join, axis=1)
                                             .map(group_label))
        drawn += _curve_figures(epochs_drawn, steps, out_dir, several_seeds, skipped)
    if figures and len(updates):
        if updates["mean_updates"].round(9).nunique() <= 1:
            skipped.append(f"layer updates per step: {updates['mean_updates'].iloc[0]:g} for every layer of every case")
        else:
            fig = _figure(figsize=(8, 4))
            ax = fig.subplots()
            plot_update_counts(ax, updates, by="schedule" if "schedule" in updates else "group")
            ax.set_title("layer updates per step")
            drawn.append(("updates per layer", _save(fig, out_dir, "update_counts.png")))
    if figures and len(data.weights):
        drawn += _weight_figures(data.weights, _figure_cases(table, labels, None), keys, out_dir)
    if figures and len(data.layer_stats):
        logged = set(_as_keys(data.layer_stats, keys).itertuples(index=False, name=None))
        mask = np.array([key in logged for key in table[keys].astype(str).itertuples(index=False, name=None)],
                        dtype=bool)
        chosen = _figure_cases(table[mask], pd.Series(labels.to_numpy()[mask]), max_figure_cases)
        drawn += _layer_stats_figures(data.layer_stats, chosen, keys, out_dir, skipped)
        if len(chosen) < mask.sum():
            notes.append(f"Layer statistics are drawn for {len(chosen)} of the {mask.sum()} cases that logged "
                         f"them (one per group first); every value is in RUN/layer_stats.")
    if figures:
        drawn += _boundary_figures(data, table, out_dir, notes=notes)
    if drawn or skipped or notes:
        md += ["## Figures", ""]
        md += [f"- {note}" for note in notes]
        md += [f"- not drawn, no information: {reason}." for reason in skipped]
        if notes or skipped:
            md.append("")
        for caption, name in drawn:
            md += [f"### {caption}", "", f"![]({name})", ""]

    for name, frame in csvs.items():
        frame.to_csv(out_dir / f"{name}.csv", index=False)
    md += ["## Files", "", "Tables as CSV: " + ", ".join(f"[{n}.csv]({n}.csv)" for n in csvs) + "."]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


def _as_keys(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The distinct case keys of a per-row frame, as str."""
    return frame[keys].astype(str).drop_duplicates()
