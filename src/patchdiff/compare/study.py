"""A study: named training configurations compared at one compute budget in counted FLOPs.

A study file (JSON) names one data set, a list of `patchdiff train` flags shared by every
configuration, and configurations that add their own flags:

    {"data": "fmnist-32.zip", "base_flags": ["--cbase", "32", "--batch", "32"],
     "configs": [{"name": "full", "flags": ["--patch-schedule", "full"]},
                 {"name": "patch", "flags": ["--patch-schedule", "stochastic"]}],
     "budget_flops": 2e13, "points": 4,
     "metrics": ["fid", "kid"], "metric_num": 1000, "metric_ref": "ref.npz", "detector": "det.pt"}

Data efficiency: `patchdiff train` flags such as `--subset 500 --subset-seed 0` (a training subset) and
`--augment 0.12` go into base_flags or a configuration's flags. `"memorisation": 1000` measures, at
every snapshot, the share of 1000 samples that copy a training image, and draws a nearest-neighbour
grid of the last one (`nn_rows` samples, each with its `nn_k` nearest training images).

Instead of `budget_flops`, `budget_kimg` with `budget_of` sets the budget to what configuration
`budget_of` spends in that many kimg. `"sigma_rel": [0.05, 0.08, 0.12]` scores, for every configuration
trained with --posthoc-ema, the post-hoc EMA of each sigma_rel at its final snapshot and reports the best
(compare/posthoc_ema.py). Relative paths are relative to the study file.

Each configuration trains for the kimg that spends the budget (flops.py), so the comparison does
not depend on the machine or its load; training time is recorded too. Metrics are computed at
`points` evenly spaced snapshots (a configuration may set its own "points"). Training runs as a
subprocess of `python -m patchdiff train` (or `launcher` + `patchdiff train`, e.g.
["torchrun", "--nproc_per_node", "8", "-m"]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patchdiff.config import TrainConfig, from_dict
from patchdiff.files import atomic_write_text
from patchdiff.flops import crop_phase_flops_per_image, fixed_kimg_for_budget, kimg_for_budget, training_flops
from patchdiff.training.checkpoint import state_in
from patchdiff.training.flags import config_from_argv

# Flags the runner sets itself; a study may not set them.
RUNNER_FLAGS = (
    "--data",
    "--outdir",
    "--duration",
    "--tick",
    "--snap",
    "--metrics",
    "--metric-num",
    "--metric-ref",
    "--detector",
    "--grid",
    "--resume",
    "--dry-run",
    "--no-progress",
)
RESULT_FILE = "result.json"  # in runs/<name>/ once that configuration has finished


@dataclass(frozen=True)
class StudyRun:
    name: str
    flags: tuple[str, ...] = ()
    points: int = 0  # metric evaluations of this run; 0 = the study's `points`


@dataclass(frozen=True)
class StudyConfig:
    data: str
    configs: tuple[StudyRun, ...]
    base_flags: tuple[str, ...] = ()
    budget_flops: float = 0.0  # training FLOPs per configuration
    budget_kimg: float = 0.0  # ...or the FLOPs of `budget_of` in this many kimg
    budget_of: str = ""
    points: int = 4  # metric evaluations per run, evenly spaced in kimg
    metrics: tuple[str, ...] = ("fid", "kid")
    metric_num: int = 1000
    metric_ref: str = ""
    detector: str = ""
    grid: int = 64  # images in each snapshot's sample grid
    launcher: tuple[str, ...] = ()  # default: this Python, `-m`
    heldout: str = ""  # a data set of held-out images: the final snapshots' loss by noise level
    heldout_num: int = 500
    memorisation: int = 0  # samples per snapshot for the memorised share (compare/memorisation.py); 0 = off
    nn_rows: int = 8  # nearest-neighbour grid: samples (rows) ...
    nn_k: int = 4  # ... and the nearest training images beside each
    sigma_rel: tuple[float, ...] = ()  # post-hoc EMA lengths scored at the final snapshot; () = off


def load_study(path: str | os.PathLike) -> StudyConfig:
    """Read and check a study file; relative paths become relative to its folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"study file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"study file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"study file {path} must hold a JSON object")
    data = dict(data)
    runs = data.pop("configs", None)
    if not isinstance(runs, list) or not runs:
        raise ValueError(f'study file {path} needs "configs": a list of {{"name": ..., "flags": [...]}}')
    try:
        configs = tuple(
            StudyRun(name=r["name"], flags=tuple(r.get("flags", ())), points=int(r.get("points", 0)))
            for r in runs
        )
        study = from_dict(StudyConfig, {**data, "configs": ()})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"study file {path}: {error}") from None
    here = path.resolve().parent
    resolved = {
        k: str(here / v) for k in ("data", "metric_ref", "detector", "heldout") if (v := getattr(study, k))
    }
    study = dataclasses.replace(study, configs=configs, **resolved)
    check_study(study, path)
    return study


def check_study(study: StudyConfig, source: str | os.PathLike = "study") -> None:
    names = [c.name for c in study.configs]
    for name in names:
        if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
            raise ValueError(f"{source}: configuration name {name!r} must be letters, digits, '-', '_', '.'")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: configuration names {names} must be unique")
    for where, flags in [("base_flags", study.base_flags)] + [(c.name, c.flags) for c in study.configs]:
        for flag in flags:
            if flag.split("=")[0] in RUNNER_FLAGS:
                raise ValueError(
                    f"{source}: {where} sets {flag}, which the study runner sets itself; remove it"
                )
    if (study.budget_flops > 0) == (study.budget_kimg > 0):
        raise ValueError(f"{source}: set exactly one of budget_flops or budget_kimg (with budget_of)")
    if study.budget_kimg > 0 and study.budget_of not in names:
        raise ValueError(
            f"{source}: budget_of {study.budget_of!r} must name one of the configurations {names}"
        )
    if study.points < 1 or any(c.points < 0 for c in study.configs):
        raise ValueError(f"{source}: points {study.points} must be at least 1 (and a configuration's >= 0)")
    if study.heldout and not Path(study.heldout).exists():
        raise FileNotFoundError(f"{source}: held-out set {study.heldout!r} does not exist")
    if study.memorisation < 0 or study.nn_rows < 1 or study.nn_k < 2:
        raise ValueError(
            f"{source}: memorisation {study.memorisation} must be >= 0 (0 = off), nn_rows {study.nn_rows} >= 1 "
            f"and nn_k {study.nn_k} >= 2"
        )
    if study.sigma_rel:
        from patchdiff.training.posthoc_ema import sigma_rel_to_gamma

        for value in study.sigma_rel:
            try:
                sigma_rel_to_gamma(value)
            except ValueError as error:
                raise ValueError(f"{source}: sigma_rel: {error}") from None
        if not study.metrics:
            raise ValueError(f'{source}: sigma_rel needs "metrics" (fid or kid) to score each sigma_rel')
    if study.heldout_num < 1:
        raise ValueError(f"{source}: heldout_num {study.heldout_num} must be at least 1")
    if not Path(study.data).exists():
        raise FileNotFoundError(f"{source}: data set {study.data!r} does not exist")


def train_command(study: StudyConfig, run: StudyRun) -> list[str]:
    launcher = list(study.launcher) or [sys.executable, "-m"]
    return [*launcher, "patchdiff", "train", "--data", study.data, *study.base_flags, *run.flags]


def resolved_config(study: StudyConfig, run: StudyRun, workdir: Path) -> TrainConfig:
    """The configuration as training will resolve it (image size, channels from the data), as
    `patchdiff train --dry-run` resolves this run's flags."""
    argv = ["--data", study.data, *study.base_flags, *run.flags, "--outdir", str(workdir), "--device", "cpu"]
    try:
        cfg, _ = config_from_argv(argv)
    except (ValueError, RuntimeError, OSError) as error:
        system = isinstance(error, OSError) and error.strerror  # "path: reason", as `patchdiff train` says it
        reason = f"{error.filename or 'a file'}: {error.strerror}" if system else " ".join(str(error).split())
        raise ValueError(
            f"configuration {run.name!r}: `patchdiff train` rejects its flags: {reason}"
        ) from None
    return cfg


def plan_study(study: StudyConfig, outdir: Path) -> dict[str, dict]:
    """Per configuration: FLOPs per training image and the kimg that spends the budget. Cached in
    outdir/plan.json, so a resumed study keeps the lengths it started with."""
    plan_path = outdir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    for run in study.configs:
        if run.name not in plan:
            cfg = resolved_config(study, run, outdir / "runs" / run.name)
            counted = training_flops(dataclasses.replace(cfg, duration_kimg=1.0))
            plan[run.name] = dict(
                flops_per_image=counted["per_image"],
                flops_by_size={str(k): v for k, v in counted["by_size"].items()},
            )
            if cfg.patch.schedule == "fixed":  # its cost per image depends on the length: keep the parts
                from patchdiff.patching import resolve_schedule

                schedule = resolve_schedule(cfg.patch, tuple(cfg.image_size), cfg.network.min_crop)
                plan[run.name]["fixed"] = dict(
                    crop_kimg=schedule.crop_kimg,
                    crop_per_image=crop_phase_flops_per_image(schedule, counted["by_size"]),
                    full_per_image=counted["by_size"][schedule.sizes[-1]],
                )
            atomic_write_text(plan_path, json.dumps(plan, indent=2))
    budget = study.budget_flops
    if not budget:
        of, kimg = plan[study.budget_of], study.budget_kimg
        if "fixed" in of:  # crop phase, then whole images
            f = of["fixed"]
            crop = min(f["crop_kimg"], kimg)
            budget = 1000 * (crop * f["crop_per_image"] + (kimg - crop) * f["full_per_image"])
        else:
            budget = kimg * 1000 * of["flops_per_image"]
    for run in study.configs:
        entry = plan[run.name]
        entry["budget_flops"] = budget
        if "fixed" in entry:
            entry["kimg"] = fixed_kimg_for_budget(budget, **entry["fixed"])
            entry["flops_per_image"] = budget / (entry["kimg"] * 1000)  # the run's average
        else:
            entry["kimg"] = kimg_for_budget(budget, entry["flops_per_image"])
    atomic_write_text(plan_path, json.dumps(plan, indent=2))
    return {run.name: plan[run.name] for run in study.configs}


def run_dir_of(run_out: Path) -> Path | None:
    """The run directory `patchdiff train` made under a configuration's --outdir (the newest)."""
    dirs = sorted(p for p in run_out.iterdir() if p.is_dir() and (p / "config.json").is_file())
    return dirs[-1] if dirs else None


def latest_kimg(run_dir: Path | None) -> float:
    """kimg of the newest tick in a run's stats.jsonl (0 when there is none yet)."""
    if run_dir is None or not (run_dir / "stats.jsonl").is_file():
        return 0.0
    kimg = 0.0
    for line in (run_dir / "stats.jsonl").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == "tick":
            kimg = float(record.get("kimg", kimg))
    return kimg


def run_study(
    study: StudyConfig,
    outdir: str | os.PathLike,
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Train every configuration not finished yet (resuming an interrupted one); returns each
    configuration's result (run_dir, kimg, flops, wall_s)."""
    from tqdm import tqdm

    outdir = Path(outdir)
    (outdir / "runs").mkdir(parents=True, exist_ok=True)
    plan = plan_study(study, outdir)
    tera = 1e12
    total = sum(p["budget_flops"] for p in plan.values()) / tera
    bar = tqdm(
        total=total,
        disable=not progress,
        dynamic_ncols=True,
        desc="study",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} TFLOP [{elapsed}<{remaining}]",
    )
    results: dict[str, dict] = {}
    try:
        for run in study.configs:
            entry, run_out = plan[run.name], outdir / "runs" / run.name
            result_path = run_out / RESULT_FILE
            if result_path.is_file():
                results[run.name] = json.loads(result_path.read_text())
                bar.update(entry["budget_flops"] / tera)
                continue
            run_out.mkdir(parents=True, exist_ok=True)
            if on_start:
                on_start(run.name)
            results[run.name] = train_one(study, run, entry, run_out, bar)
    finally:
        bar.close()
    return results


def finished_results(study: StudyConfig, outdir: str | os.PathLike) -> dict[str, dict]:
    """The results of the configurations that have finished, in study order."""
    paths = {run.name: Path(outdir) / "runs" / run.name / RESULT_FILE for run in study.configs}
    return {name: json.loads(p.read_text()) for name, p in paths.items() if p.is_file()}


def train_one(study: StudyConfig, run: StudyRun, entry: dict, run_out: Path, bar) -> dict:
    kimg = entry["kimg"]
    # Ticks a hair longer than kimg/points: the last evaluation is the one at the end of training.
    tick = kimg / (run.points or study.points) * (1 + 1e-6)
    cmd = [*train_command(study, run), "--outdir", str(run_out), "--duration", f"{kimg:.6f}"]
    cmd += ["--tick", f"{tick:.6f}", "--snap", "1", "--grid", str(study.grid), "--no-progress"]
    if study.metrics:
        cmd += ["--metrics", ",".join(study.metrics), "--metric-num", str(study.metric_num)]
        cmd += ["--metric-ref", study.metric_ref] if study.metric_ref else []
        cmd += ["--detector", study.detector] if study.detector else []
    previous = run_dir_of(run_out)
    if previous is not None and state_in(previous) is not None:  # the lookup training resumes with
        cmd += ["--resume", str(previous)]
    wall_path = run_out / "wall_s.txt"  # wall time of earlier, interrupted invocations
    wall_before = float(wall_path.read_text()) if wall_path.is_file() else 0.0
    budget = entry["budget_flops"] / 1e12  # TFLOP; a run's last step may pass its kimg by a little
    done_before = min(latest_kimg(previous) / kimg * budget, budget)
    bar.update(done_before)
    start = time.time()
    with open(run_out / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        shown = done_before
        while proc.poll() is None:
            time.sleep(1.0)
            now = min(latest_kimg(run_dir_of(run_out)) / kimg * budget, budget)
            bar.update(max(0.0, now - shown))
            shown = max(shown, now)
            atomic_write_text(wall_path, str(wall_before + time.time() - start))
    wall = wall_before + time.time() - start
    atomic_write_text(wall_path, str(wall))
    if proc.returncode != 0:
        raise RuntimeError(
            f"training configuration {run.name!r} failed (exit {proc.returncode}); see {run_out / 'train.log'}. "
            "Run the study again to resume it."
        )
    bar.update(max(0.0, budget - shown))
    run_dir = run_dir_of(run_out)
    result = dict(
        name=run.name,
        flags=list(run.flags),
        run_dir=str(run_dir),
        kimg=kimg,
        flops=entry["budget_flops"],
        flops_per_image=entry["flops_per_image"],
        wall_s=wall,
    )
    atomic_write_text(run_out / RESULT_FILE, json.dumps(result, indent=2))
    return result
