"""Run reports: read a run directory's stats.jsonl and draw what happened.

- `series`: reading stats.jsonl robustly and pure helpers turning its records into numpy series.
- `plots`: the matplotlib draw_* functions (object API, Agg canvas) and plot_loss.
- `page`: write_report, the report.png figure and the self-contained report.html.
"""

from __future__ import annotations

from patchdiff.report.page import KEY_CONFIG, write_report
from patchdiff.report.plots import (
    draw_crop_mix,
    draw_grid,
    draw_loss,
    draw_metrics,
    draw_throughput,
    plot_loss,
)
from patchdiff.report.series import (
    STATS_FILE,
    CropMix,
    MetricSeries,
    Record,
    column,
    crop_mix,
    flatten_config,
    last_metrics,
    latest_grid,
    latest_snapshot,
    local_linear_smooth,
    loss_series,
    metric_names,
    metric_series,
    parse_stats,
    read_stats,
    records_of_kind,
    stats_path,
)

__all__ = [
    "KEY_CONFIG",
    "STATS_FILE",
    "CropMix",
    "MetricSeries",
    "Record",
    "column",
    "crop_mix",
    "draw_crop_mix",
    "draw_grid",
    "draw_loss",
    "draw_metrics",
    "draw_throughput",
    "flatten_config",
    "last_metrics",
    "latest_grid",
    "latest_snapshot",
    "local_linear_smooth",
    "loss_series",
    "metric_names",
    "metric_series",
    "parse_stats",
    "plot_loss",
    "read_stats",
    "records_of_kind",
    "stats_path",
    "write_report",
]
