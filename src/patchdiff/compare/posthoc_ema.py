"""A study's post-hoc EMA sweep: each configuration trained with power-function EMA profiles
(--posthoc-ema; EDM2, Karras et al. 2024, Sec. 3.2) is scored at its final snapshot for every sigma_rel
of the study's "sigma_rel" list, so that configurations are compared each at its best EMA length."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SWEEP_KEY = "sigma_rel_sweep"  # in a configuration's result.json


def has_profiles(run_dir: str | os.PathLike) -> bool:
    return any(Path(run_dir).glob("phema-*.safetensors"))


def ensure_sigma_rel_sweeps(results: dict[str, dict], study, outdir: str | os.PathLike) -> dict[str, dict]:
    """Add SWEEP_KEY ({sigma_rels, step, rows, best, num}) to every finished configuration with stored
    profiles that lacks it for the study's sigma_rels; the result files are rewritten atomically.
    Scored like training's metrics: study.metrics on study.metric_num samples from seeds 0, 1, ..."""
    from patchdiff.files import atomic_write_text
    from patchdiff.training.posthoc_ema import best_sigma_rel, sweep_sigma_rel

    wanted = [float(s) for s in study.sigma_rel]
    updated = dict(results)
    for name, result in results.items():
        run_dir = Path(result["run_dir"])
        if result.get(SWEEP_KEY, {}).get("sigma_rels") == wanted or not has_profiles(run_dir):
            continue
        ref = Path(study.metric_ref) if study.metric_ref else run_dir / "reference.npz"
        if not ref.is_file():
            raise FileNotFoundError(
                f"configuration {name!r}: no reference statistics for the sigma_rel sweep ({ref}); set "
                '"metric_ref" in the study file'
            )
        rows = sweep_sigma_rel(
            study.metrics, run_dir, wanted, str(ref), study.metric_num, study.detector or None, batch=64
        )
        sweep = dict(
            sigma_rels=wanted, step=rows[0]["step"], rows=rows, best=best_sigma_rel(rows)["sigma_rel"]
        )
        updated[name] = dict(result, **{SWEEP_KEY: dict(sweep, num=study.metric_num)})
        atomic_write_text(Path(outdir) / "runs" / name / "result.json", json.dumps(updated[name], indent=2))
    return updated


def sigma_rel_table(results: dict[str, dict]) -> str:
    """Per swept configuration: FID (else KID) at each sigma_rel, the best in bold, and the best one."""
    swept = {name: r[SWEEP_KEY] for name, r in results.items() if SWEEP_KEY in r}
    if not swept:
        return ""
    sigma_rels = next(iter(swept.values()))["sigma_rels"]
    metric = "fid" if "fid" in next(iter(swept.values()))["rows"][0] else "kid"
    lines = [
        f"| config | step | best sigma_rel | {metric.upper()} at "
        + " | ".join(f"{s:g}" for s in sigma_rels)
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in sigma_rels) + " |",
    ]
    for name, sweep in swept.items():
        by_sigma = {row["sigma_rel"]: row.get(metric, math.nan) for row in sweep["rows"]}
        cells = []
        for s in sigma_rels:
            value = by_sigma.get(s, math.nan)
            text = f"{value:.4f}" if metric == "kid" else f"{value:.2f}"
            cells.append("-" if not math.isfinite(value) else f"**{text}**" if s == sweep["best"] else text)
        lines.append(f"| {name} | {sweep['step']} | {sweep['best']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
