"""The run report: report.md with tables and PNG figures, plus every table as CSV.

The report is a list of sections (SECTIONS), written in order. A section is a function

    def section(ctx: ReportContext) -> Section | None

It reads what it needs from `ctx`: ctx.data (the loaded runs, analysis.load.RunData),
ctx.out_dir (where files go), ctx.options (ReportOptions: baseline, reference, ...) and the
tables every section shares, each computed once on first use (ctx.table: the per-case table;
ctx.epochs, ctx.groups: the per-group table with 95 % intervals, ctx.settings, ctx.labels,
ctx.flags, ctx.many, ...). It returns a Section (its heading, its markdown lines, the tables it
adds as CSV and the figures it saved in ctx.out_dir) or None, which leaves nothing in the
report, not even a heading. Adding a section is one function and one entry in SECTIONS:

    def alignment_section(ctx):
        table = ...  # from ctx.data
        if not len(table):
            return None
        return Section("Alignment", [markdown_table(table)], csvs={"alignment": table})

Section, ReportContext and markdown_table live in analysis.report_context, so a section kept in
its own module (analysis/alignment.py) imports them from there, and this module imports the
section: no circle. Figures work the same way, listed in analysis.figures.FIGURES and shown
under "Figures".
ctx.progress("what") reports what is being drawn (a line on the terminal of `bplab run`
and `bplab report` once the report has taken more than a few seconds).

Many cases (more than MANY_CASES; below it nothing changes): the report reads groups (the
cases that differ only by seed). The per-case table goes to per_case.csv only and the report
shows the per-group table with 95 % intervals; per-case figures draw the first seed of each
group (or an evenly spaced sample of the groups, named in the report); curve bands are the 95 %
interval of the mean over seeds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.alignment import report_section as alignment_section
from analysis.figures import FIGURES, Figures, safe_name
from analysis.flags import COLLAPSE_MARGIN
from analysis.labels import setting_text
from analysis.load import TABLE_COLUMNS, RunData, _run_labels, load, local_path
from analysis.reference import reference_comparison
from analysis.report_context import (  # noqa: F401  (Progress, ReportError, ...: the report's API too)
    MANY_CASES,
    PER_CASE_DATASETS,
    Progress,
    ReportContext,
    ReportError,
    ReportOptions,
    Section,
    markdown_table,
)
from analysis.rundir import DATASETS, RunDir
from analysis.stats import against_baseline, factor_table

# The metrics columns the report reads (skips forward_passes, stages, ...).
REPORT_COLUMNS = (*TABLE_COLUMNS, "updates", "layers")

_PER_CASE_SHOWN = [
    "run", "case_id", "name", "group", "seed", "state", "flag", "epochs", "final_test_acc", "best_test_acc",
    "best_epoch", "final_train_acc", "gap", "epochs_to_target", "steps_per_sec", "wall_seconds",
    "data.name", "data_official", "data_digest",  # which data each case trained on
]
ROWS_SHOWN = 200  # longer tables: the first rows in the report, all of them in the CSV
ROWS_SHOWN_MANY = 50  # lists of cases (not done, flagged) when there are many cases


# ---- tables only the report builds -----------------------------------------------------------


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




# ---- the sections ----------------------------------------------------------------------------


def header_section(ctx: ReportContext) -> Section:
    """The title, where the runs come from, how many cases in which state, what differs."""
    data, table = ctx.data, ctx.table
    title = ", ".join(str(m.get("suite", "?")) for m in data.manifests.values()) or "run"
    lines = [f"# bplab report: {title}", "", *_header(data), ""]
    counts = table["state"].value_counts()
    lines.append(f"{len(table)} cases: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + ".")
    if ctx.settings:
        lines.append("Settings that differ between cases: " + ", ".join(f"`{c}`" for c in ctx.settings)
                     + " (in the tables and in every legend).")
    return Section(None, lines)


def partial_section(ctx: ReportContext) -> Section | None:
    """The cases that are not done, under a banner."""
    table = ctx.table
    not_done = table[~table["complete"]]
    if not len(not_done):
        return None
    shown = [c for c in [*ctx.keys, "name", "state", "reason_class", "reason", "epochs"] if c in not_done]
    interrupted = [f"> {line}" for line in ctx.interrupted_lines()]  # no driver alive: how to continue
    return Section(None, [
        f"> **PARTIAL RUN**: {len(not_done)} of {len(table)} cases are not done. Their numbers are "
        "incomplete; seed summaries, factor and baseline tables leave them out.",
        *([">", *interrupted] if interrupted else []), "",
        markdown_table(not_done[shown], max_rows=ROWS_SHOWN_MANY if ctx.many else None)],
        csvs={"not_done": not_done[shown]})


_DEFINITIONS = ("Epochs are numbered from 1 (epoch 1 = the first pass over the training set), here, in the CSVs "
                "and in the figures. final = last epoch logged; train accuracy = mean over the last epoch's batches; "
                "gap = train - test; steps/s = (train steps - 1) / wall-time span of the train steps; "
                "flag: see below.")


def per_case_section(ctx: ReportContext) -> Section:
    """The per-case table (every case in per_case.csv); with many cases the report shows the
    per-group table with 95 % intervals instead."""
    table, keys, settings = ctx.table, ctx.keys, ctx.settings
    flags = ctx.flags
    shown_table = table.merge(flags[[*keys, "flag"]], on=keys, how="left") if len(flags) else table.assign(flag="")
    shown_table["flag"] = shown_table["flag"].fillna("")
    # a setting named like a result column (epochs: planned vs logged) is shown as "epochs (setting)"
    setting_columns = {c: f"{c} (setting)" if c in shown_table else c for c in settings}
    if settings:
        shown_table = shown_table.merge(ctx.case_settings.rename(columns=setting_columns), on=keys, how="left")
    # settings_json (every setting as JSON) is in cases.parquet: repeated on every epoch row it
    # was most of the CSV's bytes
    csvs = {"per_case": shown_table, "epoch_summary": ctx.epochs.drop(columns=["settings_json"], errors="ignore")}
    if ctx.many:
        groups = ctx.groups
        csvs["per_group"] = groups
        return Section("Per group", [
            f"{len(table)} cases in {len(groups)} groups (a group: the cases that differ only by seed). Every case is "
            f"in [per_case.csv](per_case.csv); per group: cases, n (done cases, the ones summarised), and the mean "
            f"with its 95 % t interval (mean ± t(0.975, n-1) · sd / √n; none for n < 2) of the final test accuracy, "
            f"the best test accuracy and the final train accuracy. " + _DEFINITIONS, "",
            markdown_table(_interval_view(groups, ctx.group_columns, ctx.group_settings), max_rows=ROWS_SHOWN)],
            csvs=csvs)
    columns = [c for c in _PER_CASE_SHOWN if c in shown_table]
    at = columns.index("seed") + 1 if "seed" in columns else len(columns)
    columns[at:at] = [setting_columns[c] for c in settings]
    return Section("Per case", [_DEFINITIONS, "", markdown_table(shown_table[columns], max_rows=ROWS_SHOWN)],
                   csvs=csvs)


def _interval_view(groups: pd.DataFrame, by: list[str], settings: list[str]) -> pd.DataFrame:
    """The per-group table as the report shows it: mean and "low – high" per summary column."""
    view = groups[[*by, *settings, "cases", "n"]].copy()
    for column in settings:
        view[column] = view[column].map(setting_text)
    for column, name in (("final_test_acc", "final test acc"), ("best_test_acc", "best test acc"),
                         ("final_train_acc", "final train acc")):
        if f"{column}_mean" not in groups:
            continue
        view[name] = groups[f"{column}_mean"]
        low, high = groups[f"{column}_low"], groups[f"{column}_high"]
        view[f"{name} 95 % interval"] = [f"{a:.4f} – {b:.4f}" if np.isfinite(a) and np.isfinite(b) else ""
                                         for a, b in zip(low, high)]
    return view


def flags_section(ctx: ReportContext) -> Section:
    flags = ctx.flags
    lines = [f"diverged: the loss became non-finite (the case stopped there). collapsed: the best test accuracy "
             f"was at least chance + (1 - chance) / 2 and the final one is at most chance + {COLLAPSE_MARGIN:g} "
             f"(chance = 1 / number of classes).", ""]
    if not len(flags):
        return Section("Diverged or collapsed", [*lines, "None."])
    lines.append(markdown_table(flags, max_rows=ROWS_SHOWN_MANY if ctx.many else None))
    return Section("Diverged or collapsed", lines, csvs={"flagged": flags})


def lost_workers_section(ctx: ReportContext) -> Section | None:
    """The workers and nodes cases lost (the ledger's `losses`)."""
    losses = lost_workers(ctx.data.ledger)
    if not len(losses):
        return None
    return Section("Lost workers and nodes", [
        "Each worker a case lost: node_lost once the GCS declared its node dead, worker_died when the "
        "node lived on. An attempt resumed from its last commit (step); one that had not started its "
        "case used no retry. back after = seconds until the case ran again.", "",
        markdown_table(losses, float_format="{:.0f}", max_rows=ROWS_SHOWN)], csvs={"lost_workers": losses})


def seeds_section(ctx: ReportContext) -> Section | None:
    """Mean, sd and 95 % interval over the seeds of each group (with many cases the per-group
    table already shows them: the CSV only)."""
    if not ctx.several_seeds:
        return None
    if ctx.many:
        return Section(None, csvs={"seed_summary": ctx.seeds})
    return Section("Across seeds", [
        "Mean, sample sd and half-width of the 95 % t interval over the done cases of each group.", "",
        markdown_table(ctx.seeds, max_rows=ROWS_SHOWN)], csvs={"seed_summary": ctx.seeds})


def factor_section(ctx: ReportContext) -> Section | None:
    cases = ctx.cases
    if not (all(c in cases for c in ("schedule", "augment")) and cases["schedule"].nunique() > 1
            and cases["augment"].nunique() > 1):
        return None
    flat = _flatten_pivot(factor_table(ctx.table, cases, rows="schedule", columns="augment"))
    return Section("Schedule x augmentation", ["Mean final test accuracy of the done cases.", "",
                                               markdown_table(flat)], csvs={"factor_table": flat})


def baseline_section(ctx: ReportContext) -> Section | None:
    baseline = ctx.options.baseline
    if baseline is None:
        return None
    table, name = ctx.table, ctx.baseline_name
    differences = against_baseline(table, ctx.cases, name, baseline_run=ctx.baseline_run)
    differences["baseline"] = baseline  # as given: RUN:CASE keeps its run
    each_run = ("run" in table and ctx.baseline_run is None
                and table.loc[(table["group"] == name) | (table["name"] == name), "run"].nunique() > 1)
    return Section(f"Against the baseline `{baseline}`", [
        "Final test accuracy minus the baseline's at the same seed; mean and 95 % t half-width over seeds."
        + (" Each run is compared with its own baseline." if each_run else ""), "",
        markdown_table(differences, max_rows=ROWS_SHOWN)], csvs={"against_baseline": differences})


def reference_section(ctx: ReportContext) -> Section | None:
    reference = ctx.options.reference or ctx.data.manifest.get("reference")
    if not reference:
        return None
    title = f"Against the source study (`{reference}`)"
    try:
        comparison = reference_comparison(ctx.table, reference, ctx.cases,
                                          overrides=ctx.data.manifest.get("overrides") or (),
                                          alignment=getattr(ctx.data, "alignment", None))
    except KeyError as error:
        return Section(title, [f"No reference table: {error}"])
    shown = comparison.copy()
    if "comparable" in shown:
        shown["comparable"] = shown["comparable"].map(lambda ok: "yes" if ok else "not comparable")
    return Section(title, [
        "Source figures from docs/experiments.md; run values are means over seeds; diff = run - source, "
        "given only where like is compared with like: the official data set and every setting the "
        "source fixed unchanged. Otherwise the row is marked not comparable, with the reasons.", "",
        markdown_table(shown)], csvs={"reference_comparison": comparison})


def updates_table_section(ctx: ReportContext) -> Section | None:
    """Layer updates per step (the CSV; the figure is analysis.figures.update_figure)."""
    return Section(None, csvs={"update_counts": ctx.updates}) if len(ctx.updates) else None


def figures_section(ctx: ReportContext) -> Section | None:
    """Every figure of analysis.figures.FIGURES, with what was left out and why."""
    if not ctx.options.figures:
        return None
    made = Figures()
    for draw in FIGURES:
        result = draw(ctx)
        if result is not None:
            made.drawn += result.drawn
            made.skipped += result.skipped
            made.notes += result.notes
    if ctx.many and any(name.startswith(("weights", "decision_boundaries")) for _, name in made.drawn):
        groups = len(ctx.table.drop_duplicates(ctx.group_columns))
        which = "the first seed of each group" if len(ctx.sample) == groups else \
            f"the first seed of {len(ctx.sample)} of the {groups} groups, evenly spaced in group order"
        made.notes.insert(0, f"With {len(ctx.table)} cases, per-case figures (weights, decision boundaries) show "
                             f"{which}: " + ", ".join(label.split(": ")[0] for _, label in ctx.sample) + ".")
    if not (made.drawn or made.skipped or made.notes):
        return None
    lines = [f"- {note}" for note in made.notes] + [f"- not drawn, no information: {reason}." for reason in made.skipped]
    return Section("Figures", lines, figures=made.drawn)


# The report, in order. A section is a function (ctx) -> Section | None (module docstring).
SECTIONS: list[Callable[[ReportContext], Section | None]] = [
    header_section,
    partial_section,
    per_case_section,
    flags_section,
    lost_workers_section,
    seeds_section,
    factor_section,
    baseline_section,
    reference_section,
    updates_table_section,
    alignment_section,
    figures_section,
]


# ---- writing it --------------------------------------------------------------------------------


def render(sections: Iterable[Section]) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """The markdown lines and the CSV tables of `sections` (None entries leave nothing)."""
    md: list[str] = []
    csvs: dict[str, pd.DataFrame] = {}
    for section in sections:
        if section is None:
            continue
        if section.title:
            md += [f"## {section.title}", ""]
        md += section.lines
        if section.lines and section.lines[-1] != "":
            md.append("")
        for caption, name in section.figures:
            md += [f"### {caption}", "", f"![]({name})", ""]
        csvs.update(section.csvs)
    return md, csvs


def write_report(
    run: str | os.PathLike | Iterable[str | os.PathLike] | RunData,
    out_dir: str | os.PathLike | None = None,
    baseline: str | None = None,
    target_accuracy: float | None = None,
    reference: str | None = None,
    max_figure_cases: int | None = 4,
    figures: bool = True,
    many_cases: int = MANY_CASES,
    progress: Callable[[str], None] | None = None,
    sections: Sequence[Callable[[ReportContext], Section | None]] | None = None,
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
        weight histograms are drawn for every case (with many cases: the module docstring).
    figures: False writes the tables only (no PNGs; much faster).
    many_cases: more cases than this and the report reads groups (module docstring).
    progress: called with what is being drawn (e.g. Progress(sys.stderr)).
    sections: default SECTIONS.
    """
    loaded = isinstance(run, RunData)
    # weights, layer statistics and decision boundaries: read per case, for the cases the figures draw
    data = run if loaded else load(run, metrics_columns=REPORT_COLUMNS, weights=False, layer_stats=False,
                                   datasets=[d for d in DATASETS if d not in PER_CASE_DATASETS])
    options = ReportOptions(baseline=baseline, target_accuracy=target_accuracy, reference=reference,
                            max_figure_cases=max_figure_cases, figures=figures, many_cases=many_cases)
    # a bad baseline: ReportError here, before anything is written
    ctx = ReportContext(data, options, progress=progress, per_case_files=not loaded)
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
    ctx.out_dir = out_dir

    md, csvs = render(section(ctx) for section in (SECTIONS if sections is None else sections))
    ctx.progress(f"writing {len(csvs)} tables as CSV")
    for name, frame in csvs.items():
        frame.to_csv(out_dir / f"{name}.csv", index=False)
    md += ["## Files", "", "Tables as CSV: " + ", ".join(f"[{n}.csv]({n}.csv)" for n in csvs) + "."]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


# ---- helpers -----------------------------------------------------------------------------------


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


def default_report_dir(runs: Sequence[str | os.PathLike], baseline: str | None = None) -> Path:
    """Where `bplab report` writes when --out is not given: RUN/report for one local run
    (RUN/report-vs-BASELINE with a baseline, so the plain report is never replaced), else
    reports/RUN1+RUN2... (with -vs-BASELINE) under the current folder."""
    suffix = f"-vs-{safe_name(baseline)}" if baseline else ""
    runs = list(runs)
    folder = local_path(runs[0]) if len(runs) == 1 else None
    if folder is not None:
        return folder / Path(RunDir(folder).report_folder(suffix)).name  # as given (relative stays relative)
    name = "+".join(safe_name(label) for label in _run_labels(runs))
    if len(name) > 100:  # long lists of runs: a short, stable name
        import hashlib

        name = name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return Path("reports") / f"{name}{suffix}"
