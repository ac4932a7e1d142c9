"""The demo: a small data set made in code, a short CPU training run, samples and a loss plot.

The images are toy landscapes with a layout that depends on position: sky above, ground below a
horizon at a random height, a sun at a random place in the sky. A model that learned them draws that
layout; a crop-trained model can only do so through its coordinate channels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchdiff.config import PatchConfig, TrainConfig, network_preset


def make_landscapes(num: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [num, size, size, 3] toy landscapes, vectorised over the set."""
    rng = np.random.default_rng(seed)
    rows = np.arange(size)[None, :, None] / (size - 1)  # [1, H, 1], 0 at the top
    cols = np.arange(size)[None, None, :] / (size - 1)
    horizon = rng.uniform(0.5, 0.7, (num, 1, 1))
    sun_x, sun_y = rng.uniform(0.15, 0.85, (num, 1, 1)), rng.uniform(0.12, 0.3, (num, 1, 1))
    sun_r = rng.uniform(0.08, 0.13, (num, 1, 1))
    tint = rng.uniform(-0.08, 0.08, (num, 1, 1, 3))
    sky = np.stack([0.35 + 0.4 * rows, 0.55 + 0.3 * rows, np.full_like(rows, 0.95)], axis=-1)  # [1, H, 1, 3]
    ground = np.stack([0.25 - 0.1 * rows, 0.6 - 0.25 * rows, 0.2 - 0.1 * rows], axis=-1)
    below = (rows > horizon)[..., None]  # [num, H, 1, 1]
    image = np.where(below, ground, sky) + tint  # [num, H, W or 1, 3]
    image = np.broadcast_to(image, (num, size, size, 3)).copy()
    sun = ((cols - sun_x) ** 2 + (rows - sun_y) ** 2 < sun_r**2) & ~(rows > horizon)
    image[sun] = (1.0, 0.85, 0.25)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_images(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i:05d}.png")
    return folder


def demo_config(data: str, outdir: str, kimg: float, resolution: int = 32) -> TrainConfig:
    """A tiny DDPM++ that trains on 2 CPU cores in minutes, with the paper's crop schedule."""
    net = network_preset(
        "ddpmpp",
        resolution,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
    )
    return TrainConfig(
        data=data,
        outdir=outdir,
        network=net,
        patch=PatchConfig(schedule="progressive", real_p=0.5),
        duration_kimg=kimg,
        batch=32,
        lr=2e-3,
        lr_rampup_kimg=2.0,
        ema_halflife_kimg=1.0,
        ema_rampup_ratio=0.1,
        tick_kimg=max(kimg / 20, 0.1),
        snap_ticks=0,
        workers=0,
        seed=0,
    )


def run_demo(
    outdir: str | Path, kimg: float = 40.0, num_images: int = 2000, progress: bool = True, samples: int = 64
) -> dict:
    """Make the data, train, and write an enlarged sample grid, a data preview and the loss plot.

    The samples are the final snapshot's grid (EMA weights, seeds 0..samples-1, the default sampler)."""
    from patchdiff.generation import image_grid, to_pil
    from patchdiff.report import latest_grid, plot_loss, read_stats
    from patchdiff.training.loop import train

    outdir = Path(outdir)
    start = time.time()
    data = write_images(make_landscapes(num_images, 32, seed=0), outdir / "data")
    run_dir = train(demo_config(str(data), str(outdir / "runs"), kimg), progress=progress, grid=samples)
    train_s = time.time() - start
    grid_path, _ = latest_grid(run_dir)
    enlarge = 4
    with Image.open(grid_path) as grid:
        grid.resize((grid.width * enlarge, grid.height * enlarge), Image.NEAREST).save(outdir / "samples.png")
    preview = to_pil(image_grid(load_data_preview(data, samples)))
    preview.resize((preview.width * enlarge, preview.height * enlarge), Image.NEAREST).save(
        outdir / "data-preview.png"
    )
    loss_path = outdir / "loss.png"
    plot_loss(read_stats(run_dir), loss_path)
    return dict(
        run_dir=run_dir,
        samples=outdir / "samples.png",
        loss_plot=loss_path,
        data=data,
        train_s=train_s,
        total_s=time.time() - start,
    )


def load_data_preview(folder: Path, num: int = 64) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))[:num]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files])).permute(0, 3, 1, 2)
