"""Everything a run decides before its first step: the resolved config, the batch split, the step plan
and the run directory. Nothing here writes to disk except `new_run_dir`."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

from patchdiff.config import TrainConfig, to_dict
from patchdiff.data import ImageDataset
from patchdiff.patching import PatchSchedule
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
)
# A resumed run's network must match its saved weights.
FIXED_ON_RESUME = ("network.arch", "network.model_channels", "network.channel_mult", "network.num_blocks")
FIXED_ON_RESUME += ("network.attn_resolutions", "cond", "patch.coords")


def check_config(cfg: TrainConfig) -> None:
    """Values that would silently train on nonsense (a NaN learning rate, zero steps) are refused."""
    for flag, name in POSITIVE + NON_NEGATIVE:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and (flag, name) in POSITIVE):
            need = "a finite number > 0" if (flag, name) in POSITIVE else "a finite number >= 0"
            raise ValueError(f"{flag} {value}: must be {need}")
    if cfg.max_bad_steps < 1:
        raise ValueError(f"max_bad_steps {cfg.max_bad_steps}: must be at least 1")


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
    run_dir = outdir / f"{max(ids, default=-1) + 1:05d}-{name}-{cfg.network.arch}-{cfg.patch.schedule}"
    run_dir.mkdir()
    return run_dir
