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
    plot_update_counts,
    plot_weight_histograms,
)
from analysis.reference import REFERENCES, reference_table
from analysis.report import markdown_table, write_report
from analysis.tables import (
    against_baseline,
    ci_half_width,
    epoch_summary,
    factor_table,
    per_case,
    reference_comparison,
    seed_summary,
    update_counts,
)

__all__ = [
    "load", "RunData", "case_keys", "PER_CASE_COLUMNS", "TABLE_COLUMNS",
    "epoch_summary", "per_case", "seed_summary", "factor_table", "against_baseline", "reference_comparison",
    "update_counts", "ci_half_width",
    "plot_curves", "plot_weight_histograms", "plot_update_counts", "plot_layer_stats", "plot_decision_boundary",
    "write_report", "markdown_table", "REFERENCES", "reference_table",
]
