"""EDM2's learned loss weighting (Karras et al. 2024, Sec. 3 "uncertainty-based multi-task loss", Eq. 21).

The loss at noise level sigma has a very different scale from one sigma to another, so its gradients
compete. A one-output linear map u(sigma) over Fourier features of c_noise learns the log-variance of
each level's loss, and the per-element loss becomes

    L = lambda(sigma) ||D - y||^2 / exp(u(sigma)) + u(sigma),

whose minimum over u is at exp(u) = the expected weighted loss of that level: every level then
contributes a loss of about one. u is trained with the network; sampling never uses it.
"""

from __future__ import annotations

import torch
from torch import nn

from patchdiff.networks.edm2 import MPConv, MPFourier

LOGVAR_CHANNELS = 128


class LogVar(nn.Module):
    """u(c_noise): a magnitude-preserving linear map over fixed Fourier features of c_noise."""

    def __init__(self, channels: int = LOGVAR_CHANNELS):
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1, 0)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """c_noise [N] -> u [N]."""
        return self.linear(self.fourier(c_noise.reshape(-1))).reshape(-1)


def logvar_loss(weighted_error: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-element loss lambda ||D - y||^2 / exp(u) + u, with weighted_error [N, C, h, w] and u [N]."""
    u = u.reshape(-1, *([1] * (weighted_error.ndim - 1))).to(torch.float32)
    return weighted_error / u.exp() + u
