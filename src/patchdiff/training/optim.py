"""Adam as the training step uses it: one fused kernel over all parameters (on CPU and CUDA).

PyTorch's default on CPU is the per-parameter loop (a dozen small ops per tensor, ~250 tensors in a
DDPM++); the fused kernel makes the update one pass over memory. The update rule is Adam's either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from patchdiff.config import TrainConfig

ISQRT_REF_STEPS = 70_000  # EDM2's t_ref in steps (Karras et al. 2024, Table 1)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with EDM's betas (0.9, 0.999) and eps 1e-8, fused where PyTorch has the kernel."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def lr_factor(
    counted: float, step: int, total_steps: int, rampup_nimg: float, cooldown: float, shape: str = "linear"
) -> float:
    """The learning rate's multiplier at `step`: a linear warm-up over `rampup_nimg` counted images
    (`clock`), then 1, then (--lr-cooldown F) a decay to 0 over the last share F of the steps, linear or
    cosine (masked-training recipes end this way)."""
    factor = min(counted / max(rampup_nimg, 1e-8), 1.0)
    if cooldown > 0:
        left = (total_steps - step) / (cooldown * total_steps)  # 1 where the cool-down starts, 0 at the end
        if left < 1:
            left = max(left, 0.0)
            factor *= left if shape == "linear" else 0.5 * (1 - math.cos(math.pi * left))
    return factor


def lr_at(counted: float, step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of `step` of `total_steps`, `counted` images into training (`stream.clock`:
    images seen, or steps x --batch with --ema-unit steps): cfg.lr times the linear warm-up over
    lr_rampup_kimg and the --lr-cooldown decay to 0 over the last steps (`lr_factor`), times
    EDM2's inverse square-root decay ("isqrt", Eq. 7; 1 for "rampup")."""
    factor = lr_factor(
        counted, step, total_steps, cfg.lr_rampup_kimg * 1000, cfg.lr_cooldown, cfg.lr_cooldown_shape
    )
    return cfg.lr * factor * isqrt_decay(counted, cfg)


def isqrt_decay(images_seen: float, cfg: TrainConfig) -> float:
    """The schedule's decay factor: 1 ("rampup"), or 1 / sqrt(max(t / t_ref, 1)) ("isqrt", EDM2 Eq. 7)."""
    if cfg.lr_schedule != "isqrt":
        return 1.0
    t_ref = (cfg.lr_ref_kimg * 1000) or ISQRT_REF_STEPS * cfg.batch
    return 1.0 / math.sqrt(max(images_seen / t_ref, 1.0))
