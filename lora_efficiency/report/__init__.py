"""The study's report: runs read back through the MLflow API, grouped by configuration, aggregated over seeds,
compared paired by seed (perplexity as log-scale ratios) with Holm-corrected tests of difference and of
equivalence within a declared margin, drawn, and written as report.md and a self-contained report.html.

    mlflow run . -e report --env-manager local -P experiment=study-quick

Call order: fetch_scope -> fetch_loss_curves, predict_peak_memory -> build_report -> write_report.

The modules follow the data flow: runs (MLflow runs -> RunData, Scope), stats (pure statistics over seeds),
findings (configurations, comparisons, anchors, Pareto fronts, budgets -> Report), render (report.md, report.html,
configurations.csv) and charts (the only module that draws); metrics names what is measured.
"""

from lora_efficiency.report.charts import chart_frontier, chart_loss_curves, chart_rank, draw_charts
from lora_efficiency.report.findings import (
    AnchorCheck,
    Comparison,
    Configuration,
    Finding,
    Recommendation,
    Report,
    budget_ladder,
    build_report,
    check_anchors,
    find_comparisons,
    group_configurations,
    plan_tests,
    recommend,
)
from lora_efficiency.report.metrics import EXACT_MATCH, METRICS, PEAK_MB, PERPLEXITY, QUALITY, MetricSpec
from lora_efficiency.report.render import comparison_rows, configuration_rows, write_report
from lora_efficiency.report.runs import (
    MemoryPoint,
    RunData,
    Scope,
    fetch_loss_curves,
    fetch_scope,
    predict_peak_memory,
    run_data,
)
from lora_efficiency.report.stats import Effect, Family, Judgement, Stat, cell, effect, holm, pareto_front, welch

__all__ = [
    "EXACT_MATCH",
    "METRICS",
    "PEAK_MB",
    "PERPLEXITY",
    "QUALITY",
    "AnchorCheck",
    "Comparison",
    "Configuration",
    "Effect",
    "Family",
    "Finding",
    "Judgement",
    "MemoryPoint",
    "MetricSpec",
    "Recommendation",
    "Report",
    "RunData",
    "Scope",
    "Stat",
    "budget_ladder",
    "build_report",
    "cell",
    "chart_frontier",
    "chart_loss_curves",
    "chart_rank",
    "check_anchors",
    "comparison_rows",
    "configuration_rows",
    "draw_charts",
    "effect",
    "fetch_loss_curves",
    "fetch_scope",
    "find_comparisons",
    "group_configurations",
    "holm",
    "pareto_front",
    "plan_tests",
    "predict_peak_memory",
    "recommend",
    "run_data",
    "welch",
    "write_report",
]
