"""Memorisation along training, for a study: at every snapshot of a configuration, the share of its
samples that copy a training image (metrics/memorisation.py), and at the last one a nearest-neighbour
grid (each sample beside its nearest training images).

The training images are those the run trained on: its data set, --subset and --xflip as its config
says. Samples use seeds 0..num-1 at every snapshot, so the snapshots are compared on the same noise.
Results are cached in the configuration's folder (memorisation.json), keyed by snapshot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from patchdiff.config import TrainConfig

MEMORISATION_FILE = "memorisation.json"


def training_images(cfg: TrainConfig) -> torch.Tensor:
    """The images a run trained on, float32 [M, C, H, W] in [-1, 1] (its subset, with its mirrors)."""
    from patchdiff.data import ImageDataset
    from patchdiff.data.subset import training_subset

    if cfg.latent.vae:
        raise ValueError(f"memorisation is measured in pixel space; {cfg.data} is a latent set")
    dataset = training_subset(
        ImageDataset(cfg.data, xflip=cfg.xflip, verify=False), cfg.subset, cfg.subset_seed
    )
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))]).float() / 127.5 - 1.0


def snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot of a run, in step order."""
    from patchdiff.snapshot import SNAPSHOT_RE

    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := SNAPSHOT_RE.match(p.name))]
    return sorted(found)


def nearest_grid(samples: torch.Tensor, train: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N * (k + 1), C, H, W]: each sample followed by its k nearest training images (pixel space),
    for generation.image_grid(..., ncol=k + 1). samples uint8, train in [-1, 1]."""
    from patchdiff.generation import to_uint8
    from patchdiff.metrics.memorisation import nearest

    _, index = nearest(samples.float() / 127.5 - 1.0, train, k)
    rows = [torch.cat([s[None], to_uint8(train[i])]) for s, i in zip(samples, index, strict=True)]
    return torch.cat(rows)


def memorisation_along_training(
    result: dict, num: int, run_out: Path, grid_path: Path | None = None, grid_rows: int = 8, grid_k: int = 4
) -> list[dict]:
    """One record per snapshot of a finished configuration: step, kimg, epochs (passes over its training
    images), the memorised share of `num` samples, and the share's samples' median d1/d2. Cached in
    run_out/memorisation.json; with grid_path, the last snapshot's nearest-neighbour grid (PNG)."""
    from patchdiff.files import atomic_write, atomic_write_text
    from patchdiff.generation import generate, image_grid, load, to_pil
    from patchdiff.metrics.memorisation import memorised, nearest

    cache_path = run_out / MEMORISATION_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    found = snapshots(result["run_dir"])
    train = None
    for i, (step, path) in enumerate(found):
        last = i == len(found) - 1
        if (
            path.name in cache
            and cache[path.name]["num"] == num
            and not (last and grid_path and not grid_path.is_file())
        ):
            continue
        model = load(path, device="cuda" if torch.cuda.is_available() else "cpu")
        if train is None:
            train = training_images(model.config)
        samples = generate(model, range(num), batch_size=min(num, 64))
        distances, _ = nearest(samples.float() / 127.5 - 1.0, train, 2)
        sidecar = path.with_suffix(".json")  # written with every snapshot: its kimg
        kimg = (
            float(json.loads(sidecar.read_text()).get("kimg", "nan")) if sidecar.is_file() else float("nan")
        )
        cache[path.name] = dict(
            step=step,
            kimg=kimg,
            epochs=kimg * 1000 / len(train),
            num=num,
            memorised=float(memorised(distances).double().mean()),
            median_ratio=float((distances[:, 0] / distances[:, 1].clamp_min(1e-12)).median()),
        )
        atomic_write_text(cache_path, json.dumps(cache, indent=2))
        if last and grid_path is not None:
            rows = min(grid_rows, num)
            grid = nearest_grid(samples[:rows], train, grid_k)
            atomic_write(
                grid_path, lambda tmp, g=grid: to_pil(image_grid(g, ncol=grid_k + 1)).save(tmp, format="PNG")
            )
    return sorted(cache.values(), key=lambda r: r["step"])
