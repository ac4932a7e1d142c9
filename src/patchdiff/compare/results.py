"""A study's results: a markdown table, FID against kimg / training time / FLOPs, and the final
sample grids side by side. Everything is read back from the run directories, so it can be redrawn
at any time (also while a study is still running)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from patchdiff.compare.posthoc_ema import sigma_rel_table
from patchdiff.files import atomic_write_bytes
from patchdiff.report.plots import _log_y, _time_unit, png_bytes
from patchdiff.report.series import as_float, last_metrics, latest_grid, metric_series, read_stats


def _fmt_flops(flops: float) -> str:
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g}"


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def result_rows(results: dict[str, dict]) -> list[dict]:
    """One row per configuration: its plan and result, and the final metrics of its run."""
    rows = []
    for name, result in results.items():
        stats = read_stats(result["run_dir"])
        latest = last_metrics(stats)
        ticks = [r for r in stats if r.get("kind") == "tick"]
        row = dict(result, name=name, train_s=as_float(ticks[-1].get("time_s")) if ticks else math.nan)
        for metric in ("fid", "kid"):
            record = latest.get(metric, {})
            row[metric] = as_float(record.get(metric))
            row[f"{metric}_std"] = as_float(record.get(f"{metric}_std"))
        rows.append(row)
    return rows


def results_table(rows: list[dict]) -> str:
    """The markdown table of results.md."""
    lines = [
        "| config | flags | kimg | FLOPs/img | FLOPs | train time | wall time | final FID | KID ± std |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        kid = f"{r['kid']:.4f} ± {r['kid_std']:.4f}" if math.isfinite(r["kid"]) else "-"
        fid = f"{r['fid']:.2f}" if math.isfinite(r["fid"]) else "-"
        flags = " ".join(r.get("flags", [])) or "(base)"
        lines.append(
            f"| {r['name']} | `{flags}` | {r['kimg']:.2f} | {_fmt_flops(r['flops_per_image'])} | "
            f"{_fmt_flops(r['flops'])} | {_fmt_time(r['train_s'])} | {_fmt_time(r['wall_s'])} | {fid} | {kid} |"
        )
    return "\n".join(lines) + "\n"


def plot_fid(results: dict[str, dict], x: str, path: Path, dpi: int = 100) -> Path:
    """FID of every configuration against "kimg", "time_s" (training time) or "flops"."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    series = {name: metric_series(read_stats(r["run_dir"]), "fid") for name, r in results.items()}
    scale, unit = 1.0, "s"
    if x == "time_s":
        longest = max((float(np.nanmax(s.time_s, initial=0)) for s in series.values()), default=0.0)
        scale, unit = _time_unit(longest)
    label = {"kimg": "kimg", "time_s": f"training time [{unit}]", "flops": "training FLOPs"}[x]
    values = []
    for i, (name, s) in enumerate(series.items()):
        if x == "kimg":
            xs = s.kimg
        elif x == "time_s":
            xs = s.time_s / scale
        else:  # the run's own cumulative count where logged; else the plan's estimate (older runs)
            estimate = s.kimg * 1000 * results[name]["flops_per_image"]
            xs = estimate if s.flops is None else np.where(np.isfinite(s.flops), s.flops, estimate)
        ax.plot(xs, s.value, "o-", ms=3, color=f"C{i}", label=name)
        values.extend(v for v in s.value if math.isfinite(v))
    if values and min(values) > 0 and max(values) > 5 * min(values):
        _log_y(ax)
    ax.set(xlabel=label, ylabel="FID", title=f"FID vs {label.split(' [')[0]}")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return path


def plot_grids(results: dict[str, dict], path: Path, dpi: int = 100) -> Path:
    """The final sample grid of every configuration, side by side (same seeds in each)."""
    fig = Figure(figsize=(3.2 * max(1, len(results)), 3.6), layout="constrained")
    for i, (name, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, max(1, len(results)), i + 1)
        ax.set_axis_off()
        found = latest_grid(r["run_dir"])
        ax.set_title(name, fontsize="small")
        if found is not None:
            with Image.open(found[0]) as image:
                ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return path


def _sigma_scored(results: dict[str, dict]) -> dict[str, dict]:
    """The configurations scored by held-out loss by noise level (compare/sigma_loss.py)."""
    return {name: r["sigma_loss"] for name, r in results.items() if "sigma_loss" in r}


def sigma_loss_table(results: dict[str, dict]) -> str:
    """Held-out loss at each noise level (rows) for each configuration (columns), and its ratio to the
    first configuration's: below 1 means a better denoiser at that noise level."""
    scored = _sigma_scored(results)
    if not scored:
        return ""
    names = list(scored)
    first = scored[names[0]]
    lines = [
        "| sigma | " + " | ".join(names) + " |",
        "| ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for i, sigma in enumerate(first["sigmas"]):
        cells = []
        for name in names:
            loss = scored[name]["loss"][i]
            ratio = loss / first["loss"][i] if first["loss"][i] > 0 else math.nan
            cells.append(f"{loss:.4f}" if name == names[0] else f"{loss:.4f} ({ratio:.3f})")
        lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sigma_loss(results: dict[str, dict], path: Path, dpi: int = 100) -> Path:
    """Held-out loss against sigma, as a ratio to the first configuration's (log sigma axis)."""
    scored = _sigma_scored(results)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    first = next(iter(scored.values()))
    base = np.asarray(first["loss"])
    for i, (name, s) in enumerate(scored.items()):
        ax.plot(s["sigmas"], np.asarray(s["loss"]) / base, "o-", ms=3, color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(
        xlabel="sigma",
        ylabel=f"held-out loss / {next(iter(scored))}'s",
        title="held-out loss by noise level (whole images)",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return path


def _memorisation_scored(results: dict[str, dict]) -> dict[str, list[dict]]:
    return {name: r["memorisation"] for name, r in results.items() if r.get("memorisation")}


def memorisation_table(results: dict[str, dict]) -> str:
    """Per configuration: the memorised share of its samples (nearest training image < 1/3 as far as the
    second nearest, pixel space) at the last snapshot, the epochs trained, and the median ratio d1/d2."""
    scored = _memorisation_scored(results)
    if not scored:
        return ""
    lines = [
        "| config | epochs | memorised | median d1/d2 | samples |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, records in scored.items():
        r = records[-1]
        lines.append(
            f"| {name} | {r['epochs']:.1f} | {r['memorised']:.1%} | {r['median_ratio']:.3f} | {r['num']} |"
        )
    return "\n".join(lines) + "\n"


def plot_memorisation(results: dict[str, dict], path: Path, dpi: int = 100) -> Path:
    """The memorised share of samples against epochs (passes over each configuration's training images)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, records) in enumerate(_memorisation_scored(results).items()):
        epochs = [r["epochs"] for r in records]
        ax.plot(epochs, [100 * r["memorised"] for r in records], "o-", ms=3, color=f"C{i}", label=name)
    ax.set(xlabel="epochs", ylabel="memorised samples [%]", title="memorisation (d1/d2 < 1/3, pixels)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return path


def write_results(
    results: dict[str, dict], outdir: str | os.PathLike, budget_flops: float
) -> dict[str, Path]:
    """results.md and the plots into outdir; returns their paths."""
    outdir = Path(outdir)
    rows = result_rows(results)
    paths = {
        "fid_kimg": plot_fid(results, "kimg", outdir / "fid-vs-kimg.png"),
        "fid_time": plot_fid(results, "time_s", outdir / "fid-vs-time.png"),
        "fid_flops": plot_fid(results, "flops", outdir / "fid-vs-flops.png"),
        "grids": plot_grids(results, outdir / "grids.png"),
    }
    by_sigma = sigma_loss_table(results)
    if by_sigma:
        paths["sigma_loss"] = plot_sigma_loss(results, outdir / "loss-vs-sigma.png")
    by_memory = memorisation_table(results)
    if by_memory:
        paths["memorisation"] = plot_memorisation(results, outdir / "memorisation-vs-epochs.png")
        for name, r in results.items():
            if r.get("nearest_grid") and (outdir / r["nearest_grid"]).is_file():
                paths[f"nearest {name}"] = outdir / r["nearest_grid"]
    by_ema = sigma_rel_table(results)
    text = (
        f"# Study results\n\nBudget: {_fmt_flops(budget_flops)}FLOPs of training per configuration "
        "(counted forward + backward matmuls and convolutions, see patchdiff/flops.py). Train time excludes "
        "snapshots and metrics; wall time is the whole `patchdiff train` run. FID/KID at the last snapshot.\n\n"
        + results_table(rows)
        + (
            f"\nHeld-out loss on whole images by noise level (ratio to the first configuration):\n\n{by_sigma}"
            if by_sigma
            else ""
        )
        + (
            "\nMemorisation at the last snapshot (nearest-neighbour grids: each sample, then its nearest "
            f"training images):\n\n{by_memory}"
            if by_memory
            else ""
        )
        + (
            "\nPost-hoc EMA at the last snapshot, by sigma_rel (configurations trained with --posthoc-ema; "
            f"the best in bold):\n\n{by_ema}"
            if by_ema
            else ""
        )
        + "\n"
        + "".join(f"![{k}]({p.name})\n" for k, p in paths.items())
    )
    paths["table"] = outdir / "results.md"
    atomic_write_bytes(paths["table"], text.encode())
    return paths
