"""Run reports: read a run directory's stats.jsonl and draw what happened.

The training loop appends one JSON object per line to `stats.jsonl`: `"kind": "tick"` lines (loss,
throughput, cumulative images / crops / steps per crop size) and `"kind": "metrics"` lines (FID, KID
and friends). Everything here tolerates a crashed run: lines that do not parse are skipped and
counted, NaN losses are kept as NaN (and marked on the plot), and a resumed run's re-logged steps
supersede the lines it rolled back over.

Pure helpers turn records into numpy series; the drawing functions use matplotlib's object API with
the Agg canvas (no pyplot state, no display needed); every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image

Record = dict[str, Any]

STATS_FILE = "stats.jsonl"
_RESERVED = {"kind", "step", "kimg", "time_s"}
_GRID_RE = re.compile(r"^grid-(\d+)\.png$")
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d+)\.safetensors$")
# The config entries worth a glance; the full flattened config goes in a collapsed table below them.
KEY_CONFIG = (
    "data", "network.arch", "network.resolution", "network.img_channels", "network.coord_channels",
    "network.label_dim", "network.model_channels", "network.channel_mult", "network.num_blocks",
    "patch.schedule", "patch.real_p", "patch.sizes", "patch.probs", "patch.batch_mult", "patch.latent",
    "patch.coords", "batch", "duration_kimg", "lr", "ema_halflife_kimg", "precision", "seed", "metrics",
)  # fmt: skip


# --------------------------------------------------------------------------- reading


def parse_stats(text: str) -> tuple[list[Record], int]:
    """Records from the text of a stats.jsonl, and how many non-empty lines did not parse as objects."""
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # Python's json reads NaN/Infinity, as json.dumps writes them
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def stats_path(run_dir: str | os.PathLike) -> Path:
    """The stats.jsonl of a run directory (or the file itself); a clear error when there is none."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    if not (path / STATS_FILE).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {STATS_FILE}, so it is not a patchdiff run directory; "
            "pass the folder that `patchdiff train` wrote (it holds config.json and stats.jsonl)"
        )
    return path / STATS_FILE


def read_stats(run_dir: str | os.PathLike) -> list[Record]:
    """All parseable records of a run's stats.jsonl in file order; broken lines are skipped with a warning."""
    path = stats_path(run_dir)
    records, bad = parse_stats(path.read_text(encoding="utf-8", errors="replace"))
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that did not parse (a crash mid-write?)", stacklevel=2)
    return records


# --------------------------------------------------------------------------- series (pure)


def _float(value: Any) -> float:
    """A number, or NaN for null / missing / non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def records_of_kind(stats: list[Record], kind: str) -> list[Record]:
    """Records of one kind in step order. A resumed run re-logs the steps after its snapshot, so a record
    drops the kept records of later steps, and of its own step when they log the same values (two
    metrics lines at one step with different metrics both stay)."""
    kept: list[Record] = []
    for record in stats:
        if record.get("kind") != kind:
            continue
        step = _float(record.get("step"))
        while kept and _float(kept[-1].get("step")) > step:
            kept.pop()
        same = len(kept)
        while same and _float(kept[same - 1].get("step")) == step:
            same -= 1
        logged = record.keys() - _RESERVED
        kept[same:] = [r for r in kept[same:] if not r.keys() & logged]
        kept.append(record)
    return kept


def column(records: list[Record], key: str) -> np.ndarray:
    return np.array([_float(r.get(key)) for r in records], dtype=np.float64)


def loss_series(stats: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """(kimg, loss) per tick; a bad loss stays NaN."""
    ticks = records_of_kind(stats, "tick")
    return column(ticks, "kimg"), column(ticks, "loss")


def local_linear_smooth(values: np.ndarray, half_width: int) -> np.ndarray:
    """Least-squares line through the finite values within +-half_width samples, evaluated at each sample.
    Unlike a moving average (or an EMA) it neither lags nor bends a trend at the ends; NaN where a
    window holds no finite value."""
    v = np.asarray(values, dtype=np.float64)
    n, ok = len(v), np.isfinite(v)
    t = np.arange(n, dtype=np.float64)
    lo, hi = np.clip(t.astype(int) - half_width, 0, n), np.clip(t.astype(int) + half_width + 1, 0, n)

    def window_sum(a: np.ndarray) -> np.ndarray:  # sums over every window at once via a cumulative sum
        c = np.concatenate([[0.0], np.cumsum(np.where(ok, a, 0.0))])
        return c[hi] - c[lo]

    with np.errstate(invalid="ignore", divide="ignore"):
        w = window_sum(np.ones(n))
        t_mean, v_mean = window_sum(t) / w, window_sum(v) / w
        var = window_sum(t * t) / w - t_mean**2
        slope = np.where(var > 1e-9, (window_sum(t * v) / w - t_mean * v_mean) / var, 0.0)
        return np.where(w > 0, v_mean + slope * (t - t_mean), np.nan)


def metric_names(stats: list[Record]) -> list[str]:
    """Names of the logged metrics in first-seen order; `<name>_std` is an error bar, not a metric."""
    names: dict[str, None] = {}
    for record in records_of_kind(stats, "metrics"):
        for key, value in record.items():
            if key not in _RESERVED and not key.endswith("_std") and math.isfinite(_float(value)):
                names[key] = None
    return list(names)


@dataclass(frozen=True)
class MetricSeries:
    name: str
    kimg: np.ndarray  # [N]
    time_s: np.ndarray  # [N]
    value: np.ndarray  # [N]
    std: np.ndarray | None  # [N] from `<name>_std`, NaN where a line lacks it; None when no line has it


def metric_series(stats: list[Record], name: str) -> MetricSeries:
    rows = [r for r in records_of_kind(stats, "metrics") if math.isfinite(_float(r.get(name)))]
    std = column(rows, f"{name}_std") if any(f"{name}_std" in r for r in rows) else None
    return MetricSeries(name, column(rows, "kimg"), column(rows, "time_s"), column(rows, name), std)


def last_metrics(stats: list[Record]) -> dict[str, Record]:
    """For each metric, the newest metrics record that holds a finite value of it."""
    latest: dict[str, Record] = {}
    for record in records_of_kind(stats, "metrics"):
        for name in record:
            if name not in _RESERVED and math.isfinite(_float(record[name])):
                latest[name] = record
    return latest


@dataclass(frozen=True)
class CropMix:
    """Share of the crops of each size drawn during each tick, from differences of cumulative counts."""

    kimg_start: np.ndarray  # [T] the previous tick's kimg (0 for the first)
    kimg_end: np.ndarray  # [T]
    sizes: tuple[int, ...]  # [S] ascending crop sizes
    shares: np.ndarray  # [T, S], each row sums to 1
    overall: np.ndarray  # [S] share over the whole run (the last cumulative counts)


def crop_mix(stats: list[Record], key: str = "crops") -> CropMix:
    """Per-tick crop-size shares. `key="steps_by_size"` gives the share of steps instead. Ticks that
    drew nothing are left out; a count that went backwards (a reset) counts as zero new crops."""
    ticks = [t for t in records_of_kind(stats, "tick") if isinstance(t.get(key), dict)]
    sizes = tuple(sorted({int(s) for t in ticks for s in t[key]}))
    counts = [[_float(t[key].get(str(s), 0)) for s in sizes] for t in ticks]
    cumulative = np.nan_to_num(np.array(counts, dtype=np.float64).reshape(len(ticks), len(sizes)), nan=0.0)
    new = np.clip(np.diff(cumulative, axis=0, prepend=0.0), 0.0, None)
    kimg = column(ticks, "kimg")
    start = np.concatenate([[0.0], kimg[:-1]])
    drew = new.sum(axis=1) > 0
    shares = new[drew] / new[drew].sum(axis=1, keepdims=True)
    last = cumulative[-1] if len(ticks) else np.zeros(len(sizes))
    overall = last / last.sum() if last.sum() > 0 else np.zeros(len(sizes))
    return CropMix(start[drew], kimg[drew], sizes, shares, overall)


def _newest(run_dir: Path, pattern: re.Pattern[str]) -> tuple[Path, int] | None:
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := pattern.match(p.name)) and p.is_file()]
    if not found:
        return None
    step, path = max(found)
    return path, step


def latest_grid(run_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """(path, step) of the sample grid with the largest step, or None."""
    return _newest(Path(run_dir), _GRID_RE)


def latest_snapshot(run_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """(path, step) of the snapshot with the largest step, or None."""
    return _newest(Path(run_dir), _SNAPSHOT_RE)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"network": {"arch": ...}} -> {"network.arch": ...}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------- drawing


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename over `path`: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_bytes(fig: Figure, dpi: int) -> bytes:
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
    _atomic_write(path, _png_bytes(fig, dpi))
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


# --------------------------------------------------------------------------- report


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
    kimg = _float(last.get("kimg"))
    snapshot = latest_snapshot(run_dir)
    return [
        ("step", _fmt(last.get("step", "-"))),
        ("kimg", _fmt(kimg) + (f" of {total_kimg:g}" if math.isfinite(total_kimg) else "")),
        ("training time", _fmt_duration(_float(last.get("time_s")))),
        ("last loss", _fmt(last.get("loss", "-"))),
        ("s / kimg", _fmt(last.get("s_per_kimg", "-"))),
        ("steps / s", _fmt(last.get("steps_per_s", "-"))),
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
            (name, f"{_fmt(r[name])}{std} at step {r.get('step', '?')} ({_fmt(_float(r.get('kimg')))} kimg)")
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
    progress = _progress_rows(run_dir, stats, bad, _float(config.get("duration_kimg")))

    fig = Figure(figsize=(18, 10), layout="constrained")
    axes = fig.subplots(2, 3)
    draw_loss(axes[0, 0], stats)
    draw_metrics(axes[0, 1], stats, "kimg")
    draw_metrics(axes[0, 2], stats, "time_s")
    draw_crop_mix(axes[1, 0], stats)
    draw_throughput(axes[1, 1], stats)
    draw_grid(axes[1, 2], run_dir)
    fig.suptitle(f"{name}: step {progress[0][1]}, {progress[1][1]} kimg, {progress[2][1]} of training")
    png = _png_bytes(fig, dpi)
    png_path = run_dir / "report.png"
    _atomic_write(png_path, png)

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
    _atomic_write(html_path, page.encode("utf-8"))
    return png_path, html_path
