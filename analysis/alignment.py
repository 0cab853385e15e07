"""How far each layer's update is from the true gradient (RUN/alignment, setting alignment_every).

Pure functions over `analysis.load(run).alignment` (one row per case x measured step x unit x
quantity; the quantities are defined in workers/alignment.py): a table per group and layer, a
plot that takes an `ax`, `section` (the report's part: its markdown, tables and figures, or
None when no case measured alignment) and `report_section`, its entry in the report's list.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import _figure, _save
from analysis.labels import setting_text
from analysis.load import case_keys
from analysis.report_context import ReportContext, Section, markdown_table
from analysis.stats import ci_half_width

SKIPPED = ("No case measured alignment (`alignment_every: 0`, the default), so this report cannot say how far "
           "each layer's update was from the true gradient.")
TABLE_QUANTITIES = ("signal_angle", "signal_norm_ratio", "update_cosine", "error_angle")


def _keys(frame: pd.DataFrame) -> list[str]:
    return case_keys(frame)


def _group_keys(frame: pd.DataFrame) -> list[str]:
    return [*(["run"] if "run" in frame else []), "group"]


def last_epoch_means(alignment: pd.DataFrame, quantities=TABLE_QUANTITIES) -> pd.DataFrame:
    """Per case, layer and quantity: the mean over the measured steps of the case's last
    measured epoch (NaN values, e.g. a cosine with a zero gradient, left out)."""
    keys = _keys(alignment)
    rows = alignment[alignment["quantity"].astype(str).isin(quantities)]
    if not len(rows):
        return pd.DataFrame(columns=[*keys, "name", "group", "unit", "layer", "quantity", "epoch", "value"])
    rows = rows.assign(**{k: rows[k].astype(str) for k in [*keys, "name", "group", "layer", "quantity"] if k in rows})
    last = rows.groupby(keys, observed=True)["epoch"].transform("max")
    rows = rows[rows["epoch"] == last]
    by = [*keys, *[c for c in ("name", "group") if c in rows], "unit", "layer", "quantity", "epoch"]
    return rows.groupby(by, observed=True, sort=True)["value"].mean().reset_index()


def layer_table(alignment: pd.DataFrame, quantities=("signal_angle", "signal_norm_ratio"), level: float = 0.95) -> pd.DataFrame:
    """Per group and layer: n (cases, i.e. seeds) and, per quantity, the mean over seeds of
    each case's last-epoch mean, and the half-width of its `level` t interval (NaN for one seed)."""
    means = last_epoch_means(alignment, quantities)
    group = _group_keys(means) if "group" in means else _keys(means)
    by = [*group, "unit", "layer"]
    out = None
    for quantity in quantities:
        values = means[means["quantity"] == quantity].groupby(by, sort=True)["value"]
        part = pd.DataFrame({"n": values.count(), f"{quantity}_mean": values.mean(),
                             f"{quantity}_ci95": ci_half_width(values.std(ddof=1).to_numpy(), values.count().to_numpy(), level)})
        if out is None:
            out = part
        else:
            out = out.join(part.drop(columns="n"), how="outer")
    if out is None:
        return pd.DataFrame(columns=by)
    return out.reset_index().sort_values([*group, "unit"]).reset_index(drop=True)


def angle_vs_accuracy(alignment: pd.DataFrame, per_case: pd.DataFrame, quantity: str = "signal_angle") -> pd.DataFrame:
    """Per case: its mean `quantity` over layers in its last measured epoch, next to its
    final test accuracy (from tables.per_case)."""
    keys = _keys(alignment)
    means = last_epoch_means(alignment, (quantity,))
    per_layer = means.groupby([*keys, *[c for c in ("name", "group") if c in means]], sort=True)["value"].mean()
    out = per_layer.rename(f"mean_{quantity}").reset_index()
    accuracy = per_case[[*keys, "final_test_acc"]].assign(**{k: per_case[k].astype(str) for k in keys})
    return out.merge(accuracy, on=keys, how="left")


def plot_layer_angles(ax, alignment: pd.DataFrame, quantity: str = "signal_angle"):
    """`quantity` per layer (one line each) over the measured steps of the cases in
    `alignment` (one group): the mean over seeds, and the band from the lowest to the
    highest seed where there are several."""
    rows = alignment[alignment["quantity"].astype(str) == quantity]
    keys = _keys(rows)
    layers = rows.drop_duplicates("unit").sort_values("unit")[["unit", "layer"]]
    for unit, layer in layers.itertuples(index=False):
        mine = rows[rows["unit"] == unit]
        per_step = mine.groupby("step")["value"]
        steps = np.asarray(list(per_step.groups), dtype=float)
        (line,) = ax.plot(steps, per_step.mean().to_numpy(dtype=float), label=str(layer), linewidth=1.2)
        if mine[keys].astype(str).drop_duplicates().shape[0] > 1:
            ax.fill_between(steps, per_step.min().to_numpy(dtype=float), per_step.max().to_numpy(dtype=float),
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if quantity.endswith("angle"):  # 0 to at least 1 degree: float32 round-off (1e-6) is not drawn as a signal
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
        values = rows["value"].to_numpy(dtype=float)
        if len(values) and np.nanmax(values) < 0.5:  # the lines lie on the axis: say what that means
            ax.text(0.5, 0.5, "every layer within 0.5 degrees\nof the true gradient at every step",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.3")
    ax.set_xlabel("step")
    ax.set_ylabel(quantity.replace("_", " ") + (" (degrees)" if quantity.endswith("angle") else ""))
    ax.grid(True, alpha=0.3)
    if len(layers):
        ax.legend(fontsize=6, ncol=2 if len(layers) > 5 else 1)
    return ax


def plot_angle_vs_accuracy(ax, table: pd.DataFrame, quantity: str = "signal_angle"):
    """One point per case (angle_vs_accuracy's table), coloured by group."""
    for group, rows in table.groupby("group" if "group" in table else "name", sort=True):
        ax.scatter(rows[f"mean_{quantity}"], rows["final_test_acc"], label=str(group), s=18)
    ax.set_xlabel(f"mean {quantity.replace('_', ' ')} over layers, last epoch (degrees)")
    ax.set_ylabel("final test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    return ax


TITLE = "Alignment with the true gradient"


def report_section(ctx: ReportContext) -> Section:
    """The report's entry (analysis.report.SECTIONS): `section`, or SKIPPED under the heading."""
    alignment = ctx.data.alignment
    part = section(alignment, ctx.table, ctx.cases, ctx.out_dir, figures=ctx.options.figures,
                   titles=group_titles(ctx.cases, ctx.group_settings))
    return part if part is not None else Section(TITLE, [SKIPPED])


def group_titles(cases: pd.DataFrame, settings: list[str]) -> dict[str, str]:
    """group -> the group and the settings that tell groups apart (`settings`, e.g. "fa:
    schedule=feedback-alignment"), as the report's other figures label them: a panel of the
    feedback suite is then not only "fa", nor one of moons only "h8-act_relu". A setting whose
    value differs within a group (a group pooled over runs made with other values) shows each
    value: "mid: lr=0.01|0.02"."""
    if cases is None or "group" not in cases or not len(cases):
        return {}
    settings = [c for c in settings if c in cases]
    titles = {}
    for group, rows in cases.groupby(cases["group"].astype(str), sort=False):
        parts = [f"{c}=" + "|".join(dict.fromkeys(rows[c].map(setting_text))) for c in settings]
        titles[group] = group + (": " + " ".join(parts) if parts else "")
    return titles


def section(alignment: pd.DataFrame, per_case: pd.DataFrame, cases: pd.DataFrame, out_dir: Path | None,
            figures: bool = True, titles: dict[str, str] | None = None) -> Section | None:
    """The alignment section (tables.per_case's `per_case`, the cases table), or None when no
    case measured alignment. Figures (PNG) go to `out_dir`, a panel per group titled by
    `titles` (group -> title; the group where it has none)."""
    if alignment is None or not len(alignment):
        return None
    out = Section(TITLE)
    measured = alignment[_keys(alignment)].astype(str).drop_duplicates()
    md = out.lines
    md += [f"{len(measured)} cases measured, every `alignment_every` steps, how far each layer's update was from the "
           "true gradient of the training loss at the parameters and batch the step started from "
           "(workers/alignment.py). signal: the gradient the schedule handed the optimiser for the layer, summed "
           "over the stages that updated it; angle in degrees (0: the true gradient's direction), norm ratio = "
           "|signal| / |true gradient|. Layers a schedule did not update in a step have no value there.", ""]
    table = layer_table(alignment)
    out.csvs["alignment_layers"] = table
    md += ["Mean over the measured steps of each case's last epoch, then mean over the seeds of each group and "
           "the half-width of its 95 % t interval (empty for one seed):", ""]
    md.append(markdown_table(table, max_rows=300))
    md.append("")
    groups = alignment["group"].astype(str) if "group" in alignment else alignment["name"].astype(str)
    schedules = cases["schedule"].astype(str).nunique() if "schedule" in cases else 1
    if schedules > 1:
        versus = angle_vs_accuracy(alignment, per_case)
        out.csvs["alignment_vs_accuracy"] = versus
        valid = versus.dropna(subset=["mean_signal_angle", "final_test_acc"])
        if len(valid) >= 3:
            r = float(np.corrcoef(valid["mean_signal_angle"], valid["final_test_acc"])[0, 1])
            md.append(f"Across the {len(valid)} cases, the Pearson correlation of the mean signal angle (over layers, "
                      f"last epoch) with the final test accuracy is {r:.2f}.")
            md.append("")
    if figures and out_dir is not None:
        labels = sorted(groups.unique())
        run_of = alignment["run"].astype(str) if "run" in alignment else None
        panels = [(label, alignment[groups == label]) for label in labels]
        columns = min(3, len(panels))
        rows_n = -(-len(panels) // columns)
        fig = _figure(figsize=(4.2 * columns, 3.2 * rows_n))
        axes = np.atleast_1d(fig.subplots(rows_n, columns, squeeze=False)).ravel()
        for ax, (label, rows) in zip(axes, panels):
            plot_layer_angles(ax, rows)
            title = (titles or {}).get(label, label)
            if run_of is not None:
                title += f" ({', '.join(sorted(run_of[groups == label].unique()))})"
            ax.set_title(textwrap.fill(title, 48, max_lines=2, placeholder=" ..."), fontsize=8)  # the room above
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        out.figures.append(("signal angle per layer over steps (seeds as a band)",
                            _save(fig, Path(out_dir), "alignment_angles.png")))
        if schedules > 1 and len(out.csvs.get("alignment_vs_accuracy", [])):
            fig = _figure(figsize=(5, 3.6))
            plot_angle_vs_accuracy(fig.subplots(), out.csvs["alignment_vs_accuracy"])
            out.figures.append(("signal angle vs final test accuracy, one point per case",
                                _save(fig, Path(out_dir), "alignment_vs_accuracy.png")))
    return out
