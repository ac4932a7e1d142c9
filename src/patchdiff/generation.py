"""Loading a trained model and sampling images from it.

An image depends only on its seed: its initial noise, its random class and its churn noise come from
a generator seeded with that seed alone (on the CPU, so the same seed gives the same image on any
device, any batch size and any number of processes, up to floating-point rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from patchdiff.config import TrainConfig
from patchdiff.networks import build_network
from patchdiff.precond import Denoiser
from patchdiff.sampling import SAMPLERS, guided_denoiser, resolve_sampler
from patchdiff.training.checkpoint import newest_snapshot, read_snapshot


def build_denoiser(cfg: TrainConfig) -> Denoiser:
    net = build_network(cfg.network)
    return Denoiser(
        net, cfg.loss.sigma_data, use_coords=cfg.network.coord_channels > 0, label_dim=cfg.network.label_dim
    )


@dataclass
class Model:
    """A denoiser ready to sample, with the configuration it was trained with."""

    denoiser: Denoiser
    config: TrainConfig
    device: torch.device

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config.image_size or (self.config.network.resolution,) * 2
        return int(size[0]), int(size[1])

    @property
    def img_channels(self) -> int:
        return self.config.network.img_channels

    @property
    def label_dim(self) -> int:
        return self.config.network.label_dim


def load(path: str | Path, device: str | torch.device | None = None) -> Model:
    """A run directory (its newest snapshot) or a snapshot `.safetensors` file -> Model in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = newest_snapshot(path)
    state, cfg, _ = read_snapshot(path)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoiser = build_denoiser(cfg)
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return Model(denoiser.to(device).eval().requires_grad_(False), cfg, device)


def parse_seeds(text: str) -> list[int]:
    """'0-99' or '1,5,10-12' -> a list of ints."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a list like 0-99 or 1,5,10-12") from None
    return seeds


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def iter_images(
    model: Model,
    seeds: Sequence[int],
    batch_size: int = 32,
    num_steps: int | None = None,
    sampler: str | None = None,
    class_label: int | None = None,
    cfg_scale: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    progress: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (seeds, uint8 images [B, C, H, W]) batch by batch. sampler/num_steps None: the defaults
    (patchdiff.sampling.DEFAULT_SAMPLER and that sampler's DEFAULT_STEPS)."""
    sampler, num_steps = resolve_sampler(sampler, num_steps)
    if class_label is not None and not 0 <= class_label < max(model.label_dim, 1):
        raise ValueError(f"--class {class_label} out of range: the model has {model.label_dim} classes")
    if class_label is not None and model.label_dim == 0:
        raise ValueError("--class given but the model is unconditional (trained without --cond)")
    H, W = model.image_size
    C = model.img_channels
    seeds = list(seeds)
    batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in batch]
        noise = torch.stack([torch.randn(C, H, W, generator=g) for g in gens]).to(model.device)
        D = model.denoiser
        if model.label_dim:
            labels = [
                class_label
                if class_label is not None
                else int(torch.randint(model.label_dim, (), generator=g))
                for g in gens
            ]
            onehot = (
                torch.nn.functional.one_hot(torch.tensor(labels), model.label_dim).float().to(model.device)
            )
            D = guided_denoiser(model.denoiser, onehot, cfg_scale)
        x = SAMPLERS[sampler](
            D,
            noise,
            num_steps=num_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            S_churn=S_churn,
            S_min=S_min,
            S_max=S_max,
            S_noise=S_noise,
            generator=gens,
        )
        yield batch, to_uint8(x)


def generate(model: Model, seeds: Sequence[int], **kwargs) -> torch.Tensor:
    """uint8 images [N, C, H, W] for the seeds (keyword arguments as for iter_images)."""
    return torch.cat([images.cpu() for _, images in iter_images(model, seeds, **kwargs)])


def image_grid(images: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 [rows*H, ncol*W, C] array."""
    N, C, H, W = images.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    grid = torch.zeros(nrow * ncol, C, H, W, dtype=torch.uint8)
    grid[:N] = images.cpu()
    grid = grid.reshape(nrow, ncol, C, H, W).permute(0, 3, 1, 4, 2).reshape(nrow * H, ncol * W, C)
    return grid.numpy()


def to_pil(array: np.ndarray) -> Image.Image:
    """HxWxC uint8 -> PIL image (grayscale for one channel)."""
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
