"""EDM preconditioning (Karras et al. 2022, Table 1, "Ours" column) around any backbone.

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with the coordinate
channels of Patch Diffusion concatenated to the network input c_in x.
"""

from __future__ import annotations

import torch
from torch import nn

from patchdiff.patching import coordinate_features, coordinate_grid


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) for noise levels sigma (any shape), EDM Table 1."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def network_inputs(
    net_in: torch.Tensor, coords, class_labels, use_coords: bool, label_dim: int, coord_embed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backbone's input [N, C(+2+4K), h, w] and labels: the coordinate channels and their K
    frequencies appended (default: the full grid of an h x w image, as at sampling time), and all-zero
    labels (the null label) if none given."""
    if use_coords:
        if coords is None:
            coords = coordinate_grid(net_in.shape[2], net_in.shape[3], device=net_in.device)
            coords = coords.expand(net_in.shape[0], -1, -1, -1)
        net_in = torch.cat([net_in, coordinate_features(coords.to(net_in.dtype), coord_embed)], dim=1)
    if not label_dim:
        return net_in, None
    if class_labels is None:
        class_labels = torch.zeros(net_in.shape[0], label_dim, device=net_in.device)
    return net_in, class_labels


class Denoiser(nn.Module):
    """The preconditioned denoiser D(x; sigma) over crops with coordinates.

    x [N, C, h, w] noisy crop, sigma scalar or [N], coords [N, 2, h, w] (default: the full-image grid
    of an h x w image, as at sampling time), class_labels [N, label_dim] one-hot (zeros = none),
    augment_labels [N, augment_dim] (--augment; None = zeros, the identity transform, as at sampling time).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        use_coords: bool = True,
        label_dim: int = 0,
        coord_embed: int = 0,  # K frequencies of each coordinate (patching.coordinate_features)
        augment_dim: int = 0,
        logvar: nn.Module | None = None,  # EDM2's learned loss weighting u(c_noise), trained alongside
    ):
        super().__init__()
        self.net = net
        self.logvar = logvar  # None: no state_dict entries, so other snapshots load unchanged
        self.sigma_data = sigma_data
        self.use_coords = use_coords
        self.label_dim = label_dim
        self.coord_embed = coord_embed
        self.augment_dim = augment_dim

    def forward(
        self, x: torch.Tensor, sigma, coords=None, class_labels=None, augment_labels=None, return_logvar=False
    ):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        net_in, labels = network_inputs(
            c_in * x, coords, class_labels, self.use_coords, self.label_dim, self.coord_embed
        )
        if self.augment_dim:  # non-leaking augmentation: zeros (no transform) unless training says otherwise
            if augment_labels is None or augment_labels.numel() == 0:
                augment_labels = torch.zeros(x.shape[0], self.augment_dim, device=x.device)
            F_x = self.net(net_in, c_noise.reshape(-1), labels, augment_labels=augment_labels.to(x.device))
        else:
            F_x = self.net(net_in, c_noise.reshape(-1), labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:  # inside forward, so that DDP sees u's parameters used
            if self.logvar is None:
                raise ValueError(
                    "this denoiser has no learned loss weighting; build it with build_denoiser(cfg)"
                )
            return D_x, self.logvar(c_noise.reshape(-1))
        return D_x
