"""The run report: report.png (every plot on one figure) and a self-contained report.html (images embedded)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from patchdiff.files import atomic_write_bytes
from patchdiff.report.plots import (
    draw_crop_mix,
    draw_grid,
    draw_loss,
    draw_metrics,
    draw_throughput,
    png_bytes,
)
from patchdiff.report.series import (
    Record,
    as_float,
    column,
    flatten_config,
    last_metrics,
    latest_grid,
    latest_snapshot,
    parse_stats,
    records_of_kind,
    stats_path,
)

# The config entries worth a glance; the full flattened config goes in a collapsed table below them.
KEY_CONFIG = (
    "data", "network.arch", "network.resolution", "network.img_channels", "network.coord_channels",
    "network.label_dim", "network.model_channels", "network.channel_mult", "network.num_blocks",
    "patch.schedule", "patch.real_p", "patch.sizes", "patch.probs", "patch.batch_mult", "patch.latent",
    "patch.coords", "batch", "duration_kimg", "lr", "ema_halflife_kimg", "precision", "seed", "metrics",
)  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) if value else "(empty)"
    return str(value)


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _read_config(run_dir: Path) -> tuple[dict[str, Any], str]:
    """The run's config as a dict, or ({}, why not): a report should still come out of a damaged run."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"{path.name} is missing"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {}, f"{path.name} does not parse ({error})"
    return (config, "") if isinstance(config, dict) else ({}, f"{path.name} is not a JSON object")


def _progress_rows(
    run_dir: Path, stats: list[Record], bad_lines: int, total_kimg: float
) -> list[tuple[str, str]]:
    ticks = records_of_kind(stats, "tick")
    last = ticks[-1] if ticks else {}
    kimg = as_float(last.get("kimg"))
    snapshot = latest_snapshot(run_dir)
    return [
        ("step", _fmt(last.get("step", "-"))),
        ("kimg", _fmt(kimg) + (f" of {total_kimg:g}" if math.isfinite(total_kimg) else "")),
        ("training time", _fmt_duration(as_float(last.get("time_s")))),
        ("last loss", _fmt(last.get("loss", "-"))),
        ("s / kimg", _fmt(last.get("s_per_kimg", "-"))),
        ("steps / s", _fmt(last.get("steps_per_s", "-"))),
        ("achieved TFLOP/s", _fmt(last.get("tflops", "-"))),
        ("MFU (bf16 peak)", f"{last['mfu']:.1%}" if isinstance(last.get("mfu"), float) else "-"),
        ("images seen", _fmt(last.get("images", "-"))),
        ("memory [GB]", _fmt(last.get("mem_gb", "-"))),
        ("ticks with a non-finite loss", str(int((~np.isfinite(column(ticks, "loss"))).sum()))),
        ("unparseable stats lines", str(bad_lines)),
        ("newest snapshot", snapshot[0].name if snapshot else "none yet"),
    ]


def _metric_rows(stats: list[Record]) -> list[tuple[str, str]]:
    rows = []
    for name, r in last_metrics(stats).items():
        if name.endswith("_std"):
            continue
        std = f" ± {_fmt(r[name + '_std'])}" if name + "_std" in r else ""
        rows.append(
            (
                name,
                f"{_fmt(r[name])}{std} at step {r.get('step', '?')} ({_fmt(as_float(r.get('kimg')))} kimg)",
            )
        )
    return rows


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1800px}table{border-collapse:collapse}"
    "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#f4f4f4}img{max-width:100%}"
)


def write_report(run_dir: str | os.PathLike, dpi: int = 100) -> tuple[Path, Path]:
    """Write report.png and a self-contained report.html (images embedded) into the run directory."""
    run_dir = Path(run_dir)
    path = stats_path(run_dir)
    if path.parent != run_dir:
        raise ValueError(f"write_report needs a run directory, not the file {str(run_dir)!r}")
    stats, bad = parse_stats(path.read_text(encoding="utf-8", errors="replace"))
    config, config_problem = _read_config(run_dir)
    name = run_dir.resolve().name
    progress = _progress_rows(run_dir, stats, bad, as_float(config.get("duration_kimg")))

    fig = Figure(figsize=(18, 10), layout="constrained")
    axes = fig.subplots(2, 3)
    draw_loss(axes[0, 0], stats)
    draw_metrics(axes[0, 1], stats, "kimg")
    draw_metrics(axes[0, 2], stats, "time_s")
    draw_crop_mix(axes[1, 0], stats)
    draw_throughput(axes[1, 1], stats)
    draw_grid(axes[1, 2], run_dir)
    fig.suptitle(f"{name}: step {progress[0][1]}, {progress[1][1]} kimg, {progress[2][1]} of training")
    png = png_bytes(fig, dpi)
    png_path = run_dir / "report.png"
    atomic_write_bytes(png_path, png)

    metrics = _metric_rows(stats)
    flat = flatten_config(config)
    key_rows = [(k, _fmt(flat[k])) for k in KEY_CONFIG if k in flat]
    parts = [
        f"<h1>patchdiff run {html.escape(name)}</h1>",
        f"<h2>Progress</h2>{_table(progress)}",
        "<h2>Last metrics</h2>" + (_table(metrics) if metrics else "<p>No metrics yet.</p>"),
        "<h2>Configuration</h2>"
        + (_table(key_rows) if key_rows else f"<p>{html.escape(config_problem or 'no key values')}</p>"),
        f"<details><summary>full config ({len(flat)} values)</summary>"
        f"{_table([(k, _fmt(v)) for k, v in flat.items()])}</details>",
        f"<h2>Plots</h2>{_img(png, 'report plots')}",
    ]
    grid = latest_grid(run_dir)
    if grid is not None:
        parts.append(f"<h2>Samples at step {grid[1]}</h2>{_img(grid[0].read_bytes(), grid[0].name)}")
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>patchdiff report: {html.escape(name)}'
        f"</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    html_path = run_dir / "report.html"
    atomic_write_bytes(html_path, page.encode("utf-8"))
    return png_path, html_path
