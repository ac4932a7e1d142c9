"""The EDM training loss on crops (Karras et al. 2022, Eq. 2 and Table 1).

    ln(sigma) ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,
    L = E[ lambda(sigma) * || D(y + n; sigma) - y ||^2 ],  n ~ N(0, sigma^2 I).

A denoiser may bring its own lambda and noise levels (`loss_weight(sigma, sigma_data)`, `round_sigma`):
a pretrained epsilon-prediction network (precond_vp) is fine-tuned with the plain epsilon MSE at its
own timesteps, the loss it was trained with, rather than with EDM's lambda, which would weight its
epsilon error by 1 + sigma^2 / sigma_data^2 (~400x at sigma = 10).

Reduction: the mean over crops, channels and pixels. EDM sums over pixels, which makes a 16x16 crop's
gradient 16x smaller than a 64x64 image's; with crop sizes changing from step to step that would
rescale Adam's moment estimates step by step. The per-pixel mean keeps every step's gradient on one
scale, so one learning rate serves every crop size, and each pixel counts the same wherever it is.

`LossConfig.scaling = "published"` reproduces the published Patch Diffusion code's reduction for
comparison: each crop's squared error is summed over channels and pixels, and averaged over the crops
of the step. We divide that sum by the pixel count of the FULL image (C*H*W) rather than leaving it
raw, so a full-size step is exactly the "mean" step (one learning rate serves both modes), and a PxP
crop's loss, and gradient, is (P/R)^2 of its "mean" value: a 16x16 step at R=64 is 16x smaller.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from patchdiff.config import LossConfig
from patchdiff.loss_weighting import logvar_loss

LOSS_SCALINGS = ("mean", "published")


def sample_sigma(n: int, P_mean: float, P_std: float, device=None, generator=None) -> torch.Tensor:
    """Training noise levels, ln(sigma) ~ N(P_mean, P_std^2)."""
    return (torch.randn(n, device=device, generator=generator) * P_std + P_mean).exp()


def sample_sigma_band(
    n: int, P_mean: float, P_std: float, band: tuple[float, float], device=None, generator=None
) -> torch.Tensor:
    """Noise levels from the quantile band (lo, hi) of the same distribution:
    u ~ U(lo, hi), ln(sigma) = P_mean + P_std * Phi^-1(u). The bands (0, 1) and N(P_mean, P_std^2) agree."""
    lo, hi = band
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"noise band {band} must satisfy 0 <= lo < hi <= 1")
    u = (lo + (hi - lo) * torch.rand(n, device=device, generator=generator)).clamp(1e-7, 1.0 - 1e-7)
    return (torch.special.ndtri(u) * P_std + P_mean).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma), which makes the effective loss weight uniform in ln(sigma) (EDM Sec. 5)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def unwrapped(denoiser):
    """The denoiser inside the wrappers training may put around it: torch.compile (`_orig_mod`) and
    DistributedDataParallel (`module`), in either order."""
    while True:
        inner = getattr(denoiser, "_orig_mod", None)
        if inner is None and isinstance(denoiser, DistributedDataParallel):
            inner = denoiser.module
        if inner is None:
            return denoiser
        denoiser = inner


def crop_scale(crop_hw: tuple[int, int], full_hw: tuple[int, int] | None, scaling: str) -> float:
    """The factor between a step's loss and its per-pixel mean: 1 for "mean"; (h*w)/(H*W) for
    "published" (sum over the crop's pixels / pixels of the full image)."""
    if scaling == "mean":
        return 1.0
    if scaling != "published":
        raise ValueError(f"unknown loss scaling {scaling!r}; choose one of {', '.join(LOSS_SCALINGS)}")
    if full_hw is None:
        raise ValueError("loss scaling 'published' needs the full image size (edm_loss(..., full_hw=(H, W)))")
    return (crop_hw[0] * crop_hw[1]) / (full_hw[0] * full_hw[1])


def edm_loss(
    denoiser,
    y: torch.Tensor,
    coords=None,
    class_labels=None,
    cfg: LossConfig | None = None,
    generator=None,
    full_hw: tuple[int, int] | None = None,
    band: tuple[float, float] | None = None,
    augment_labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss for clean crops y [N, C, h, w] (in [-1, 1] or latent units) with their coords.

    `full_hw` is the (H, W) of the full image the crops come from; only the "published" scaling uses it.
    `band`: draw sigma from these quantiles of its distribution (noise-banded crops, patching.noise_band).
    `augment_labels`: the crops' augmentation labels [N, augment_dim] (--augment), or None.
    `mask`: [N, 1, h, w], the pixels the loss counts (--crop-margin, patching.loss_mask), or None for all;
    the loss is then the mean over the counted pixels and channels."""
    cfg = cfg or LossConfig()
    if mask is not None and cfg.scaling != "mean":
        raise ValueError("--crop-margin needs the loss scaling 'mean' (the published scaling has no margin)")
    scale = crop_scale((y.shape[2], y.shape[3]), full_hw, cfg.scaling)
    if band is None:
        sigma = sample_sigma(y.shape[0], cfg.P_mean, cfg.P_std, y.device, generator)
    else:
        sigma = sample_sigma_band(y.shape[0], cfg.P_mean, cfg.P_std, band, y.device, generator)
    inner = unwrapped(denoiser)
    if hasattr(inner, "round_sigma"):  # a discrete-time network: noise at the levels it answers for
        sigma = inner.round_sigma(sigma)
    sigma = sigma.reshape(-1, 1, 1, 1)
    n = torch.randn(y.shape, device=y.device, generator=generator) * sigma
    extra = {} if augment_labels is None else dict(augment_labels=augment_labels)
    if cfg.weighting == "learned":  # EDM2's learned log-variance weighting (loss_weighting.py)
        D, u = denoiser(y + n, sigma.reshape(-1), coords, class_labels, return_logvar=True, **extra)
        weight = getattr(inner, "loss_weight", loss_weight)(sigma, cfg.sigma_data)
        return masked_mean(logvar_loss(weight * (D - y) ** 2, u), mask) * scale
    D = denoiser(y + n, sigma.reshape(-1), coords, class_labels, **extra)
    weight = getattr(inner, "loss_weight", loss_weight)(sigma, cfg.sigma_data)
    return masked_mean(weight * (D - y) ** 2, mask) * scale


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of values [N, C, h, w] over the pixels where mask [N, 1, h, w] is 1 (all of them if None)."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / (mask.sum() * values.shape[1])
