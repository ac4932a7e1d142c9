"""Everything a run decides before its first step: checked flags, the resumed state and the effective
config, the batch split, the step plan and the run directory. `prepare` checks all of it before anything
is written (only `new_run_dir` creates a folder, and the run lock a file)."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchdiff import distributed as dist
from patchdiff.config import TrainConfig, from_json, to_dict
from patchdiff.data import ImageDataset, open_dataset
from patchdiff.data.latents import resolve_latent
from patchdiff.patching import PatchSchedule, resolve_schedule
from patchdiff.training.checkpoint import StateError, check_state, find_resume_state, load_state
from patchdiff.training.lock import RunLock, RunLockedError
from patchdiff.training.posthoc_ema import MAX_SIGMA_REL
from patchdiff.training.stream import StepPlan

# Flags whose value must be finite and positive (or >= 0), checked before anything is written.
POSITIVE = (("--duration", "duration_kimg"), ("--lr", "lr"), ("--tick", "tick_kimg"), ("--batch", "batch"))
NON_NEGATIVE = (
    ("--batch-gpu", "batch_gpu"),
    ("--workers", "workers"),
    ("--snap", "snap_ticks"),
    ("--lr-rampup", "lr_rampup_kimg"),
    ("--ema", "ema_halflife_kimg"),
    ("--ema-rampup", "ema_rampup_ratio"),
    ("--grad-clip", "grad_clip"),
    ("--checkpoint", "checkpoint_kimg"),
    ("--checkpoint-minutes", "checkpoint_minutes"),
    ("--lr-ref-kimg", "lr_ref_kimg"),
)
# A resumed run's network must match its saved weights.
FIXED_ON_RESUME = ("network.arch", "network.model_channels", "network.channel_mult", "network.num_blocks")
FIXED_ON_RESUME += ("network.attn_resolutions", "cond", "patch.coords", "network.depth", "network.width")
FIXED_ON_RESUME += ("network.heads", "network.dit_patch", "network.prediction", "latent.norm")
FIXED_ON_RESUME += ("loss.weighting", "posthoc_ema")  # learned u(sigma) weights; EMA profiles since step 0


def check_config(cfg: TrainConfig) -> None:
    """Values that would silently train on nonsense (a NaN learning rate, zero steps) are refused."""
    for flag, name in POSITIVE + NON_NEGATIVE:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and (flag, name) in POSITIVE):
            need = "a finite number > 0" if (flag, name) in POSITIVE else "a finite number >= 0"
            raise ValueError(f"{flag} {value}: must be {need}")
    if cfg.max_bad_steps < 1:
        raise ValueError(f"max_bad_steps {cfg.max_bad_steps}: must be at least 1")
    for sigma_rel in cfg.posthoc_ema:
        if not 0.0 < sigma_rel < MAX_SIGMA_REL:
            raise ValueError(f"--posthoc-ema {sigma_rel}: each sigma_rel must be in (0, {MAX_SIGMA_REL})")
    if len(set(cfg.posthoc_ema)) != len(cfg.posthoc_ema):
        raise ValueError(f"--posthoc-ema {','.join(map(str, cfg.posthoc_ema))}: a sigma_rel is repeated")


def check_outdir(outdir: str) -> None:
    """--outdir must be (or become) a writable folder; checked before anything is created."""
    path = Path(outdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--outdir {outdir} is a file, not a folder; pick another --outdir")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(f"--outdir {outdir}: {existing} is a file, not a folder; pick another --outdir")
    try:  # os.access says yes to root everywhere; creating a file is the real test
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"--outdir {outdir}: {existing} is not writable ({error.strerror}); pick another --outdir"
        ) from None


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value) if rest else value})


def merge_resumed(saved: TrainConfig, given: TrainConfig, overrides) -> tuple[TrainConfig, list[str]]:
    """The saved config with the settings in `overrides` (field paths such as "duration_kimg" or
    "network.dropout") taken from `given`; returns it and one line per changed setting."""
    cfg, changes = saved, []
    for path in sorted(overrides):
        old, new = _get(saved, path), _get(given, path)
        if old == new:
            continue
        if path in FIXED_ON_RESUME:
            raise ValueError(
                f"{path} is {new!r} on the command line but {old!r} in the resumed run; "
                f"a resumed run keeps its network (drop the flag or start a new run)"
            )
        cfg = _set(cfg, path, new)
        changes.append(f"{path}: {old!r} -> {new!r}")
    return cfg, changes


def field_paths(cfg: TrainConfig) -> set[str]:
    """Every setting of a config as a field path ("lr", "network.dropout", ...)."""

    def walk(d: dict, prefix: str) -> set[str]:
        out = set()
        for k, v in d.items():
            out |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    return walk(to_dict(cfg), "")


def resolve(cfg: TrainConfig, dataset: ImageDataset) -> TrainConfig:
    """Fill in what the data set decides: image size, channels, classes; check the batch split."""
    H, W = dataset.resolution
    if cfg.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs class labels, but {cfg.data} has no dataset.json labels")
    net = dataclasses.replace(
        cfg.network,
        resolution=min(H, W),
        img_channels=dataset.num_channels,
        coord_channels=2 if cfg.patch.coords else 0,
        label_dim=dataset.num_classes if cfg.cond else 0,
    )
    for name, value in (("H", H), ("W", W)):
        if value % net.min_crop:
            raise ValueError(
                f"image {name}={value} of {cfg.data} is not a multiple of {net.min_crop}, which "
                f"--cres {','.join(map(str, net.channel_mult))} needs; convert with `patchdiff dataset --resolution`"
            )
    return dataclasses.replace(cfg, network=net, image_size=(H, W))


def batch_split(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(batch_gpu, accumulation rounds) with batch = batch_gpu * rounds * world."""
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    if batch_gpu < 1 or cfg.batch % (batch_gpu * world):
        raise ValueError(
            f"--batch {cfg.batch} must be a multiple of --batch-gpu {batch_gpu} x {world} processes"
        )
    return batch_gpu, cfg.batch // (batch_gpu * world)


def make_plan(
    cfg: TrainConfig,
    schedule: PatchSchedule,
    batch_gpu: int,
    rounds: int,
    world: int,
    saved_bounds: tuple[int, ...] = (),
) -> StepPlan:
    per_step = tuple(
        schedule.images_per_round(batch_gpu, i) * rounds * world for i in range(len(schedule.sizes))
    )
    return StepPlan(schedule, cfg.seed, per_step, cfg.duration_kimg * 1000, tuple(saved_bounds))


def new_run_dir(cfg: TrainConfig) -> Path:
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ids = [
        int(p.name.split("-")[0]) for p in outdir.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()
    ]
    name = Path(cfg.data.rstrip("/")).stem or "data"
    for i in range(max(ids, default=-1) + 1, max(ids, default=-1) + 100):
        run_dir = outdir / f"{i:05d}-{name}-{cfg.network.arch}-{cfg.patch.schedule}"
        try:
            run_dir.mkdir()  # atomic: two runs starting at once take different numbers
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"--outdir {outdir}: could not create a new run directory")


# What a library call `train(cfg, resume=...)` takes from `cfg` when resuming; everything else comes
# from the saved config. The CLI passes the flags given on its command line instead.
RUN_CONTROL = (
    "data",  # the same images may have moved
    "duration_kimg",
    "tick_kimg",
    "snap_ticks",
    "workers",
    "cache",
    "metrics",
    "metric_num",
    "detector",
    "metric_ref",
    "max_bad_steps",
    "checkpoint_kimg",
    "checkpoint_minutes",
)


@dataclass
class Setup:
    """What a run decides before it builds anything: config, data, crop sizes, plan, resumed state."""

    cfg: TrainConfig
    dataset: ImageDataset
    schedule: PatchSchedule
    plan: StepPlan
    batch_gpu: int
    rounds: int
    state: dict | None = None
    state_path: Path | None = None
    counters: dict | None = None
    changes: tuple[str, ...] = ()
    lock: RunLock | None = None


def read_resumed(
    state_path: Path, given: TrainConfig, overrides
) -> tuple[dict, dict, TrainConfig, list[str]]:
    """(state, counters, effective config, changed settings) of a run to resume."""
    state = load_state(state_path)
    check_state(state_path, state)
    try:
        saved = from_json(TrainConfig, state["config"])
        counters = json.loads(state["counters"])
        counters["step"], counters["position"]
    except (ValueError, TypeError, KeyError) as error:
        raise StateError(f"{state_path} holds an unreadable config or counters ({error})") from None
    cfg, changes = merge_resumed(saved, given, RUN_CONTROL if overrides is None else overrides)
    return state, counters, cfg, changes


def prepare(cfg: TrainConfig, resume: str | None, world: int, overrides=None, lock: bool = False) -> Setup:
    """Check everything that can be checked before anything is written; with `lock`, rank 0 holds the
    resumed run's directory from before its state is read until the run ends."""
    check_config(cfg)
    check_outdir(cfg.outdir)
    state_path = find_resume_state(resume, cfg.outdir) if resume else None
    run_lock, error = None, None
    if state_path is not None and lock and dist.is_main():
        try:
            run_lock = RunLock(state_path.parent).acquire()
        except RunLockedError as e:
            error = e
    if lock:
        dist.agree_on_error(error)
    try:
        state, counters, changes = None, None, []
        if state_path is not None:
            state, counters, cfg, changes = read_resumed(state_path, cfg, overrides)
            check_config(cfg)
        dataset = open_dataset(cfg.data, xflip=cfg.xflip, cache=cfg.cache)
        cfg = resolve(resolve_latent(cfg, dataset), dataset)
        schedule = resolve_schedule(cfg.patch, tuple(cfg.image_size), cfg.network.min_crop)
        batch_gpu, rounds = batch_split(cfg, world)
        if cfg.metrics:
            from patchdiff.metrics import parse_metric_names

            parse_metric_names(cfg.metrics)  # fail before training, not at the first snapshot
        bounds = tuple(counters.get("phase_bounds", ())) if counters else ()
        plan = make_plan(cfg, schedule, batch_gpu, rounds, world, bounds)
    except BaseException:
        if run_lock:
            run_lock.release()
        raise
    return Setup(
        cfg, dataset, schedule, plan, batch_gpu, rounds, state, state_path, counters, tuple(changes), run_lock
    )
