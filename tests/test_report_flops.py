"""FID points at the run's own cumulative counted FLOPs (report/series.py, compare/results.py)."""

import itertools
import json

import numpy as np

from patchdiff.compare.results import plot_fid
from patchdiff.report.series import metric_names, metric_series


def test_metric_series_carries_the_logged_flops_and_flops_is_no_metric():
    stats = [
        dict(kind="metrics", step=1, kimg=1.0, time_s=1.0, flops=5e9, fid=30.0),
        dict(kind="metrics", step=2, kimg=2.0, time_s=2.0, fid=20.0),  # an older run's line: no count
    ]
    assert metric_names(stats) == ["fid"]
    series = metric_series(stats, "fid")
    assert series.flops[0] == 5e9 and np.isnan(series.flops[1])


def test_training_logs_cumulative_flops_with_every_tick(tiny_run):
    ticks = [json.loads(line) for line in (tiny_run / "stats.jsonl").read_text().splitlines()]
    flops = [r["flops"] for r in ticks if r["kind"] == "tick"]
    assert len(flops) >= 2 and all(b > a > 0 for a, b in itertools.pairwise(flops))


def test_fid_vs_flops_places_points_at_the_logged_count(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    lines = [dict(kind="metrics", step=1, kimg=1.0, time_s=1.0, flops=7e12, fid=9.0)]
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    drawn = []
    from matplotlib.axes import Axes

    plot = Axes.plot
    monkeypatch.setattr(
        Axes, "plot", lambda self, x, *a, **k: drawn.append(list(x)) or plot(self, x, *a, **k)
    )
    plot_fid({"a": dict(run_dir=str(run), flops_per_image=1.0)}, "flops", tmp_path / "f.png")
    assert drawn == [[7e12]]  # not kimg * 1000 * flops_per_image = 1e3
