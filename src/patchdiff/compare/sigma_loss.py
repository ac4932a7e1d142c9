"""Held-out loss by noise level: at which noise levels one configuration's denoiser beats another's.

FID says which model samples better; this says where in the noise range the difference lies, which
is where an explanation lives. At low noise the ideal denoiser only looks at a small neighbourhood,
which a crop holds; at high noise it needs the layout of the whole image, which only full-size steps
show. Every model is scored on the same images with the same noise (seeded), so the differences
between models are not differences of noise draws.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from patchdiff.loss import loss_weight

SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 80.0)


@torch.no_grad()
def loss_by_sigma(
    denoiser,
    images: torch.Tensor,
    sigmas: Sequence[float] = SIGMAS,
    sigma_data: float = 0.5,
    seed: int = 0,
    batch: int = 250,
) -> list[float]:
    """lambda(sigma) * mean ||D(y + n; sigma) - y||^2 over full images y [N, C, H, W] in [-1, 1], for each
    sigma: the EDM training loss at that noise level, on whole images. Unconditional (null label). A
    discrete-time (VP) denoiser is scored at its timestep nearest each sigma, with its own loss weight, as
    it is trained (loss.edm_loss)."""
    gen = torch.Generator().manual_seed(seed)
    label_dim = getattr(denoiser, "label_dim", 0)
    device = next(denoiser.parameters()).device
    weight_of = getattr(denoiser, "loss_weight", loss_weight)
    losses = []
    for sigma in sigmas:
        if hasattr(denoiser, "round_sigma"):
            sigma = float(denoiser.round_sigma(torch.tensor([float(sigma)]))[0])
        total = 0.0
        for y in images.split(batch):
            noise = torch.randn(y.shape, generator=gen) * sigma
            y, noise = y.to(device), noise.to(device)
            labels = torch.zeros(len(y), label_dim, device=device) if label_dim else None
            D = denoiser(y + noise, torch.full((len(y),), float(sigma), device=device), None, labels)
            total += float(((D - y) ** 2).mean(dim=(1, 2, 3)).sum())
        weight = float(weight_of(torch.tensor(float(sigma)), sigma_data))
        losses.append(weight * total / len(images))
    return losses


def heldout_images(path: str | os.PathLike, num: int) -> torch.Tensor:
    """The first `num` images of a data set as floats in [-1, 1], [N, C, H, W]."""
    from patchdiff.data import ImageDataset

    dataset = ImageDataset(path, max_images=num, verify=False)
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))])
    return images.float() / 127.5 - 1.0


def ensure_sigma_losses(
    results: dict[str, dict], heldout: str, num: int, outdir: str | os.PathLike, sigmas=SIGMAS
) -> dict[str, dict]:
    """Add "sigma_loss" ({sigmas, loss}) to every finished configuration's result that lacks it, scoring
    its newest snapshot on the held-out images; the result files are rewritten atomically."""
    from patchdiff.files import atomic_write_text
    from patchdiff.generation import load

    missing = [name for name, r in results.items() if r.get("sigma_loss", {}).get("sigmas") != list(sigmas)]
    if not missing:
        return results
    images = heldout_images(heldout, num)
    updated = dict(results)
    for name in missing:
        model = load(results[name]["run_dir"], device="cpu")
        if tuple(images.shape[1:]) != (model.img_channels, *model.image_size):
            raise ValueError(
                f"held-out set {heldout} holds {tuple(images.shape[1:])} images; configuration {name!r} "
                f"was trained on {(model.img_channels, *model.image_size)}"
            )
        losses = loss_by_sigma(model.denoiser, images, sigmas, model.config.loss.sigma_data)
        updated[name] = dict(
            results[name], sigma_loss=dict(sigmas=list(sigmas), loss=losses, num=len(images))
        )
        path = Path(outdir) / "runs" / name / "result.json"
        atomic_write_text(path, json.dumps(updated[name], indent=2))
    return updated
