"""In- and out-painting by replacement (RePaint-style; Lugmayr et al. 2022), as a denoiser wrapper.

Known pixels y (where keep = 1) are replaced, at every denoiser call, by y noised to that call's sigma,
y + sigma * eps with fresh eps, so the network always sees them at the noise level it expects; the
denoised estimate of the known pixels is y itself. Every sampler in sampling.py steps x from the
estimate alone, so wrapping D is enough: the known part of x then stays y plus noise of the current
sigma throughout, and the last step (to sigma = 0) lands on y (paste_known removes the rounding).

Resampling rounds (RePaint's harmonisation, here of a whole step): the unknown pixels are replaced by
their estimate noised back to the same sigma, and denoised again with the known pixels, so the two
parts have more calls to agree. Each round costs one more network call per denoiser call.

Out-painting is the same with a canvas larger than the known image (canvas.py), keep = 0 outside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchdiff.sampling import DenoiserFn, Generators, randn_like


@dataclass(frozen=True)
class Known:
    """What in- or out-painting keeps: `image` uint8 [C, h, w] pixels, centred in the canvas; `generate`
    bool [h, w], True where pixels are generated (white in a mask file), None = the whole image is kept
    (out-painting: everything around it is generated); `rounds` resampling rounds per denoiser call."""

    image: torch.Tensor
    generate: torch.Tensor | None = None
    rounds: int = 0


def inpainting_denoiser(
    denoiser: DenoiserFn,
    known: torch.Tensor,
    keep: torch.Tensor,
    generator: Generators = None,
    rounds: int = 0,
) -> DenoiserFn:
    """D(x, sigma) that keeps the known pixels: known [N or 1, C, H, W] (the model's space), keep
    [N or 1, 1, H, W] 1 where known; generator(s) draw the fresh noise (one per image: seeded samples)."""
    if rounds < 0:
        raise ValueError(f"--resample {rounds}: must be >= 0")
    keep = keep.to(known.dtype)

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        noised_known = known + s * randn_like(x, generator)
        x_in = torch.lerp(x, noised_known, keep)  # keep * noised_known + (1 - keep) * x
        estimate = denoiser(x_in, sigma)
        for _ in range(rounds):
            renoised = estimate + s * randn_like(x, generator)
            x_in = torch.lerp(renoised, known + s * randn_like(x, generator), keep)
            estimate = denoiser(x_in, sigma)
        return torch.lerp(estimate, known.expand_as(estimate), keep)

    return D


def paste_known(x: torch.Tensor, known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The known pixels, exactly, over a finished sample (rounding in the sampler's last step, or a
    VAE's decoding, cannot move them)."""
    return torch.where(keep.to(torch.bool), known.to(x.dtype), x)


def mask_to_grid(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel keep-mask [N, 1, H, W] on a coarser grid (a latent model's): a cell is known only if all
    its pixels are (min-pooling), so no generated pixel is encoded as known."""
    H, W = keep.shape[-2:]
    h, w = size
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} mask does not divide into a {h}x{w} grid")
    return -F.max_pool2d(-keep.to(torch.float32), (H // h, W // w))


def place(
    image: torch.Tensor, size: tuple[int, int], fill: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """image [N, C, h, w] centred in a size = (H, W) tensor filled with `fill` (rounded up-left like
    canvas.centred_canvas); returns it and the (top, left) of the image in it."""
    N, C, h, w = image.shape
    H, W = size
    if h > H or w > W:
        raise ValueError(f"a {h}x{w} image does not fit in a {H}x{W} canvas")
    top, left = (H - h) // 2, (W - w) // 2
    out = torch.full((N, C, H, W), fill, dtype=image.dtype, device=image.device)
    out[..., top : top + h, left : left + w] = image
    return out, (top, left)
