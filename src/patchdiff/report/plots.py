"""Drawing a run's records with matplotlib's object API on the Agg canvas (no pyplot state, no display).

Each draw_* function fills one Axes from stats.jsonl records (see `series`); plot_loss writes a single
loss plot. Every file is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image

from patchdiff.files import atomic_write_bytes
from patchdiff.report.series import (
    Record,
    column,
    crop_mix,
    latest_grid,
    local_linear_smooth,
    loss_series,
    metric_names,
    metric_series,
    records_of_kind,
)


def png_bytes(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # Agg explicitly, whatever the session's default backend
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _log_y(ax: Axes) -> None:
    """Log y with plain numbers (0.3, 20) instead of 3x10^-1 on every tick."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    # Minor labels only at 2x, 3x, 5x a power of ten, or a decade's labels run into each other.
    ax.yaxis.set_minor_formatter(
        FuncFormatter(
            lambda y, _: f"{y:g}" if y > 0 and round(y / 10 ** math.floor(math.log10(y))) in (2, 3, 5) else ""
        )
    )


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 2 * 3600:
        return 3600.0, "h"
    return (60.0, "min") if max_seconds >= 120 else (1.0, "s")


def draw_loss(ax: Axes, stats: list[Record]) -> None:
    """Raw per-tick losses, an EMA of log-loss on top, log y; non-finite losses as red ticks on the x axis."""
    kimg, loss = loss_series(stats)
    ok = np.isfinite(loss) & (loss > 0)
    ax.set(title="training loss", xlabel="kimg", ylabel="loss")
    if not ok.any():
        _note(ax, "no finite loss yet")
        return
    ax.plot(kimg[ok], loss[ok], ".", ms=3, alpha=0.35, color="C0", label="per tick")
    smooth = np.exp(
        local_linear_smooth(np.log(np.where(ok, loss, np.nan)), half_width=max(len(loss) // 20, 1))
    )
    ax.plot(kimg[ok], smooth[ok], "-", color="C0", lw=1.8, label="smoothed")
    bad = ~np.isfinite(loss)
    if bad.any():  # x in data units, y in axes units: pinned to the bottom whatever the scale
        pin = dict(color="C3", transform=ax.get_xaxis_transform(), clip_on=False)
        ax.plot(kimg[bad], np.zeros(bad.sum()), "x", label=f"non-finite ({bad.sum()})", **pin)
    _log_y(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def plot_loss(stats: list[Record], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a loss-vs-kimg PNG to `path` (atomically) and return the path."""
    path = Path(path)
    fig = Figure(figsize=(6, 4), layout="constrained")
    draw_loss(fig.add_subplot(), stats)
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return path


def draw_metrics(ax: Axes, stats: list[Record], x: str) -> None:
    """Metrics vs `x` ("kimg" or "time_s"): KID-like ones (tiny, may be negative) on a twin right axis,
    the others (FID) on the left; `<name>_std` as error bars."""
    names = metric_names(stats)
    ax.set(title=f"metrics vs {'kimg' if x == 'kimg' else 'wall time'}")
    all_series = [metric_series(stats, n) for n in names]
    scale, unit = 1.0, "s"
    if x == "time_s" and all_series:
        scale, unit = _time_unit(max(float(np.nanmax(s.time_s, initial=0)) for s in all_series))
    ax.set_xlabel("kimg" if x == "kimg" else f"training time [{unit}]")
    if not names:
        _note(ax, "no metrics yet")
        return
    right = ax.twinx() if any(n.startswith("kid") for n in names) else None
    handles = []
    for i, series in enumerate(all_series):
        target = right if (right is not None and series.name.startswith("kid")) else ax
        xs = series.kimg if x == "kimg" else series.time_s / scale
        handles.append(
            target.errorbar(
                xs, series.value, yerr=series.std, fmt="o-", ms=3, capsize=2, color=f"C{i}", label=series.name
            )
        )
    left = [s.value for s in all_series if right is None or not s.name.startswith("kid")]
    if (
        left
        and all(np.all(v > 0) for v in left)
        and max(v.max() for v in left) > 10 * min(v.min() for v in left)
    ):
        _log_y(ax)  # FID falls by orders of magnitude early on
    ax.set_ylabel(", ".join(s.name for s in all_series if right is None or not s.name.startswith("kid")))
    if right is not None:
        right.set_ylabel(", ".join(n for n in names if n.startswith("kid")))
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize="small")


def draw_crop_mix(ax: Axes, stats: list[Record]) -> None:
    """Stacked share of crops of each size over each tick's kimg interval."""
    mix = crop_mix(stats)
    ax.set(title="crop-size mix per tick", xlabel="kimg", ylabel="share of crops", ylim=(0, 1))
    if not len(mix.shares):
        _note(ax, "no crop counts yet")
        return
    # Each tick's share holds over (previous tick, this tick].
    edges = np.concatenate([mix.kimg_start[:1], mix.kimg_end])
    bottom = np.zeros(len(edges))
    for j, size in enumerate(mix.sizes):
        top = bottom + np.concatenate(
            [mix.shares[:1, j], mix.shares[:, j]]
        )  # step="pre": y[i] on (x[i-1], x[i]]
        label = f"{size}px ({100 * mix.overall[j]:.0f}% overall)"
        ax.fill_between(edges, bottom, top, step="pre", alpha=0.8, color=f"C{j}", label=label)
        bottom = top
    ax.set_xlim(edges[0], edges[-1] if edges[-1] > edges[0] else edges[0] + 1)
    ax.legend(fontsize="small", loc="lower left")


def draw_throughput(ax: Axes, stats: list[Record]) -> None:
    ticks = records_of_kind(stats, "tick")
    kimg, s_per_kimg = column(ticks, "kimg"), column(ticks, "s_per_kimg")
    ax.set(title="throughput", xlabel="kimg")
    ax.set_ylabel("s / kimg", color="C0")
    if not np.isfinite(s_per_kimg).any():
        _note(ax, "no timing yet")
        return
    ax.plot(kimg, s_per_kimg, "-", color="C0", label="s/kimg")
    mem = column(ticks, "mem_gb")
    if np.isfinite(mem).any():
        twin = ax.twinx()
        twin.plot(kimg, mem, "--", color="C1", label="memory")
        twin.set_ylabel("memory [GB]", color="C1")
    ax.grid(True, alpha=0.3)


def draw_grid(ax: Axes, run_dir: Path, max_side: int = 1024) -> None:
    ax.set_axis_off()
    found = latest_grid(run_dir)
    if found is None:
        ax.set_title("samples")
        _note(ax, "no sample grid yet")
        return
    path, step = found
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side))  # a big grid would only slow the figure down
        ax.imshow(np.asarray(image), interpolation="lanczos")
    ax.set_title(f"samples, step {step} ({path.name})")
