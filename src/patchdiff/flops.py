"""Training compute in counted FLOPs, so that runs can be compared at equal compute on any machine.

FLOPs of one training step are counted with `torch.utils.flop_counter.FlopCounterMode` on the real
denoiser: the forward pass and the backward pass of the EDM loss over a batch of crops, divided by
the number of crops. The counter sees the matrix products and convolutions (which dominate a U-Net);
element-wise work (normalisation, activations, the loss itself) is not counted. A multiply-add
counts as 2 FLOPs. Attention through scaled_dot_product_attention runs as one fused op; torch knows
the CUDA ones, but not the CPU's (`_scaled_dot_product_flash_attention_for_cpu`), which it would count
as 0, so the counter is given that op's closed form (attention_flops): the same count as on a GPU.

The expected cost of one training image under a crop schedule is the mean of flops(P_i) over the
images of the crop plan, `patching.mean_per_image` (stochastic: sum_i p_i n_i flops(P_i) / sum_i p_i n_i
with n_i = batch_mult_i images per base image; progressive: sum_i p_i flops(P_i); see there).
Training length is counted in images as the paper counts it (`patching.StepPlan`), so a run of
`kimg` costs kimg * 1000 * flops_per_image FLOPs.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from patchdiff.config import LossConfig, TrainConfig
from patchdiff.denoisers import build_denoiser
from patchdiff.loss import edm_loss
from patchdiff.patching import (
    PatchSchedule,
    coordinate_grid,
    crop_phase_mean,
    mean_per_image,
    resolve_schedule,
)


def attention_flops(query, key, value) -> int:
    """Q K^T and P V for shapes [B, H, Lq, D], [B, Hkv, Lk, D], [B, Hkv, Lk, Dv] (H a multiple of Hkv):
    2 B H Lq Lk (D + Dv), i.e. 4 B H Lq Lk D when Dv = D."""
    B, H, Lq, D = query
    Lk, Dv = key[2], value[3]
    return 2 * B * H * Lq * Lk * (D + Dv)


def attention_backward_flops(grad_out, query, key, value) -> int:
    """The fused backward: Q K^T again, then dO V^T, P^T dO, dS K and dS^T Q, 2 B H Lq Lk (3 D + 2 Dv)
    (10 B H Lq Lk D when Dv = D), as torch counts its GPU attention ops."""
    B, H, Lq, D = query
    Lk, Dv = key[2], value[3]
    return 2 * B * H * Lq * Lk * (3 * D + 2 * Dv)


# The CPU's fused attention ops, which torch's counter has no formula for; the counter passes shapes.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: attention_flops(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kwargs: attention_backward_flops(g, q, k, v)
    ),
}


def step_flops_per_image(denoiser, channels: int, crop_hw: tuple[int, int], batch: int = 2) -> float:
    """Counted FLOPs of forward + backward of the training loss, per crop of `channels` x crop_hw.

    `denoiser` is a precond.Denoiser (its use_coords and label_dim decide the extra inputs)."""
    h, w = crop_hw
    y = torch.zeros(batch, channels, h, w)
    coords = coordinate_grid(h, w).expand(batch, -1, -1, -1) if denoiser.use_coords else None
    labels = torch.zeros(batch, denoiser.label_dim) if denoiser.label_dim else None
    was_training = denoiser.training
    denoiser.train()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        loss = edm_loss(denoiser, y, coords, labels, LossConfig(), generator=torch.Generator().manual_seed(0))
        loss.backward()
    denoiser.zero_grad(set_to_none=True)
    denoiser.train(was_training)
    return counter.get_total_flops() / batch


def crop_phase_flops_per_image(schedule: PatchSchedule, flops_by_size: dict[int, float]) -> float:
    """Fixed schedule: FLOPs per image of its crop phase (`patching.crop_phase_mean`)."""
    return crop_phase_mean(schedule, [flops_by_size[s] for s in schedule.sizes])


def schedule_flops_per_image(
    schedule: PatchSchedule, flops_by_size: dict[int, float], duration_kimg: float | None = None
) -> float:
    """Expected FLOPs per training image of a crop schedule, from the FLOPs per image at each size: their
    mean over the plan's images (`patching.mean_per_image`; the fixed schedule's depends on the run's
    length, `duration_kimg`)."""
    if schedule.kind == "fixed" and (not duration_kimg or duration_kimg <= 0):
        raise ValueError(
            "the fixed schedule's FLOPs per image depend on the run's length: give duration_kimg"
        )
    return mean_per_image(schedule, [flops_by_size[s] for s in schedule.sizes], duration_kimg)


def training_flops(cfg: TrainConfig) -> dict:
    """FLOPs of a resolved TrainConfig (image_size and channels filled in, as `train --dry-run` prints
    them): per image at each crop size, expected per training image, and for the whole run."""
    if not cfg.image_size:
        raise ValueError("training_flops needs a resolved config (image_size set); use `train --dry-run`")
    schedule = resolve_schedule(cfg.patch, tuple(cfg.image_size), cfg.network.min_crop)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg)
    C = cfg.network.img_channels
    by_size = {
        s: step_flops_per_image(denoiser, C, schedule.crop_shape(i)) for i, s in enumerate(schedule.sizes)
    }
    per_image = schedule_flops_per_image(schedule, by_size, cfg.duration_kimg)
    return dict(by_size=by_size, per_image=per_image, total=per_image * cfg.duration_kimg * 1000)


def fixed_kimg_for_budget(
    budget_flops: float, crop_kimg: float, crop_per_image: float, full_per_image: float
) -> float:
    """Fixed schedule: the kimg that spends `budget_flops`, its crop phase (crop_kimg at crop_per_image
    FLOPs per image, `crop_phase_flops_per_image`) first, then whole images."""
    crop_cost = crop_kimg * 1000 * crop_per_image
    if budget_flops <= crop_cost:
        return kimg_for_budget(budget_flops, crop_per_image)
    return crop_kimg + kimg_for_budget(budget_flops - crop_cost, full_per_image)


def kimg_for_budget(budget_flops: float, flops_per_image: float) -> float:
    """Training length in kimg that spends `budget_flops` at `flops_per_image`."""
    if budget_flops <= 0 or flops_per_image <= 0:
        raise ValueError(
            f"a FLOP budget ({budget_flops:g}) and FLOPs per image ({flops_per_image:g}) must be > 0"
        )
    return budget_flops / flops_per_image / 1000
