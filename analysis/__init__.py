"""bplab analysis: read run directories, build comparison tables, plots and the report.

    from analysis import load, per_case, seed_summary, write_report
    data = load("runs/unfair")                     # or "s3://bucket/runs/unfair", or a list
    table = per_case(data.metrics, data.cases)
    write_report("runs/unfair", baseline="a")       # runs/unfair/report/report.md

No TensorFlow or Ray here, and nothing runs at import time. Note: the function `load`
shadows the module `analysis.load` as a package attribute; import module-level names
with `from analysis.load import ...`.
"""

from analysis.load import PER_CASE_COLUMNS, TABLE_COLUMNS, RunData, case_keys, load
from analysis.plots import (
    plot_curves,
    plot_decision_boundary,
    plot_layer_stats,
    plot_step_curves,
    plot_update_counts,
    plot_weight_histograms,
    shared_bins,
)
from analysis.flags import flag_cases
from analysis.labels import setting_labels, varying_settings
from analysis.reference import REFERENCES, reference_comparison, reference_table
from analysis.report import markdown_table, write_report
from analysis.stats import against_baseline, ci_half_width, factor_table, seed_summary
from analysis.tables import display_epoch, epoch_summary, per_case, step_curves, update_counts

__all__ = [
    "load", "RunData", "case_keys", "PER_CASE_COLUMNS", "TABLE_COLUMNS",
    "epoch_summary", "per_case", "seed_summary", "factor_table", "against_baseline", "reference_comparison",
    "update_counts", "ci_half_width", "display_epoch", "flag_cases", "step_curves", "varying_settings",
    "setting_labels",
    "plot_curves", "plot_weight_histograms", "plot_update_counts", "plot_layer_stats", "plot_decision_boundary",
    "plot_step_curves", "shared_bins",
    "write_report", "markdown_table", "REFERENCES", "reference_table",
]
