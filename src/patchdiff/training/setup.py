"""Everything a run decides before its first step: the resolved config, the batch split, the step plan
and the run directory. Nothing here writes to disk except `new_run_dir`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from patchdiff.config import TrainConfig
from patchdiff.data import ImageDataset
from patchdiff.patching import PatchSchedule
from patchdiff.training.stream import StepPlan


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


def make_plan(cfg: TrainConfig, schedule: PatchSchedule, batch_gpu: int, rounds: int, world: int) -> StepPlan:
    per_step = tuple(
        schedule.images_per_round(batch_gpu, i) * rounds * world for i in range(len(schedule.sizes))
    )
    return StepPlan(schedule, cfg.seed, per_step, cfg.duration_kimg * 1000)


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
