"""Reading a run's stats.jsonl robustly, and pure helpers that turn its records into numpy series.

The training loop appends one JSON object per line to `stats.jsonl`: `"kind": "tick"` lines (loss,
throughput, cumulative images / crops / steps per crop size) and `"kind": "metrics"` lines (FID, KID
and friends). Everything here tolerates a crashed run: lines that do not parse are skipped and
counted, NaN losses are kept as NaN, and a resumed run's re-logged steps supersede the lines it rolled
back over.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchdiff.snapshot import SNAPSHOT_RE

Record = dict[str, Any]

STATS_FILE = "stats.jsonl"
_RESERVED = {"kind", "step", "kimg", "time_s", "flops"}  # "flops": the run's cumulative counted FLOPs
_GRID_RE = re.compile(r"^grid-(\d+)\.png$")


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


def as_float(value: Any) -> float:
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
        step = as_float(record.get("step"))
        while kept and as_float(kept[-1].get("step")) > step:
            kept.pop()
        same = len(kept)
        while same and as_float(kept[same - 1].get("step")) == step:
            same -= 1
        logged = record.keys() - _RESERVED
        kept[same:] = [r for r in kept[same:] if not r.keys() & logged]
        kept.append(record)
    return kept


def column(records: list[Record], key: str) -> np.ndarray:
    return np.array([as_float(r.get(key)) for r in records], dtype=np.float64)


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
            if key not in _RESERVED and not key.endswith("_std") and math.isfinite(as_float(value)):
                names[key] = None
    return list(names)


@dataclass(frozen=True)
class MetricSeries:
    name: str
    kimg: np.ndarray  # [N]
    time_s: np.ndarray  # [N]
    value: np.ndarray  # [N]
    std: np.ndarray | None  # [N] from `<name>_std`, NaN where a line lacks it; None when no line has it
    flops: np.ndarray | None = None  # [N] the run's cumulative counted training FLOPs; NaN where not logged


def metric_series(stats: list[Record], name: str) -> MetricSeries:
    rows = [r for r in records_of_kind(stats, "metrics") if math.isfinite(as_float(r.get(name)))]
    std = column(rows, f"{name}_std") if any(f"{name}_std" in r for r in rows) else None
    flops = column(rows, "flops")
    return MetricSeries(name, column(rows, "kimg"), column(rows, "time_s"), column(rows, name), std, flops)


def last_metrics(stats: list[Record]) -> dict[str, Record]:
    """For each metric, the newest metrics record that holds a finite value of it."""
    latest: dict[str, Record] = {}
    for record in records_of_kind(stats, "metrics"):
        for name in record:
            if name not in _RESERVED and math.isfinite(as_float(record[name])):
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
    counts = [[as_float(t[key].get(str(s), 0)) for s in sizes] for t in ticks]
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
    return _newest(Path(run_dir), SNAPSHOT_RE)  # match() anchors it at the start of the name


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"network": {"arch": ...}} -> {"network.arch": ...}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
