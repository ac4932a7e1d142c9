"""Exponential moving average of the weights, parameterised by a half-life in images (EDM, App. F.1).

beta = 0.5 ** (images_this_step / half_life): after `half_life` images the old weights count half.
Early in training the half-life is capped at `rampup_ratio * images_seen`, so the average forgets the
random initialisation quickly.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(images_this_step: float, images_seen: float, halflife_kimg: float, rampup_ratio: float) -> float:
    halflife = halflife_kimg * 1000
    if rampup_ratio > 0:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (images_this_step / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    net_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b_net)
