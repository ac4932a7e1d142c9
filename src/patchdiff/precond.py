"""EDM preconditioning (Karras et al. 2022, Table 1, "Ours" column) around any backbone.

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with the coordinate
channels of Patch Diffusion concatenated to the network input c_in x.

Table 1's "VP" and "VE" columns are the other choices (`precond`), for networks trained that way
(EDM's published VP / VE snapshots): continuous VP of Song et al., whose noise level at time t is
sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and whose network sees (M - 1) t; and VE,
whose network sees log(sigma / 2). Each knows only its own noise range (`Denoiser.sigma_range`).
"""

from __future__ import annotations

import math

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


# Continuous VP (EDM Table 1 and Appendix F.1): the schedule, the timestep scale M and the smallest t.
VP_BETA_D, VP_BETA_MIN, VP_M, VP_EPSILON_T = 19.9, 0.1, 1000, 1e-5
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.02, 100.0  # VE's noise range (Table 1)
PRECONDS = ("edm", "vp", "ve")


def vp_sigma(t, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (a float or a tensor)."""
    if isinstance(t, torch.Tensor):
        return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()
    return math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_time(sigma: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """t(sigma), the inverse of vp_sigma: the positive root of beta_d t^2 / 2 + beta_min t = L with
    L = log(1 + sigma^2), written as 2 L / (sqrt(beta_min^2 + 2 beta_d L) + beta_min) so that small
    sigma does not subtract two nearly equal numbers."""
    L = torch.log1p(sigma**2)
    return 2 * L / ((beta_min**2 + 2 * beta_d * L).sqrt() + beta_min)


def vp_scalings(sigma: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN, M: int = VP_M):
    """(c_skip, c_out, c_in, c_noise), EDM Table 1, "VP" column."""
    c_skip = torch.ones_like(sigma)
    c_out = -sigma
    c_in = 1.0 / (sigma**2 + 1).sqrt()
    c_noise = (M - 1) * vp_time(sigma, beta_d, beta_min)
    return c_skip, c_out, c_in, c_noise


def ve_scalings(sigma: torch.Tensor):
    """(c_skip, c_out, c_in, c_noise), EDM Table 1, "VE" column."""
    return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


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
        precond: str = "edm",  # Table 1's column: "edm", "vp" or "ve" (sigma_data is EDM's only)
    ):
        super().__init__()
        self.net = net
        self.logvar = logvar  # None: no state_dict entries, so other snapshots load unchanged
        self.sigma_data = sigma_data
        self.use_coords = use_coords
        self.label_dim = label_dim
        self.coord_embed = coord_embed
        self.augment_dim = augment_dim
        if precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {precond!r}; choose one of {', '.join(PRECONDS)}")
        self.precond = precond

    def scalings(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) of this denoiser's preconditioning."""
        if self.precond == "vp":
            return vp_scalings(sigma)
        if self.precond == "ve":
            return ve_scalings(sigma)
        return edm_scalings(sigma, self.sigma_data)

    def sigma_range(self, sigma_min: float, sigma_max: float) -> tuple[float, float]:
        """A sampler's (sigma_min, sigma_max) clamped to the noise levels a VP / VE network was trained
        on (VP: sigma(epsilon_t) .. sigma(1); VE: 0.02 .. 100); EDM's own is left as asked."""
        if self.precond == "edm":
            return sigma_min, sigma_max
        if self.precond == "vp":
            low, high = vp_sigma(VP_EPSILON_T), vp_sigma(1.0)
        else:
            low, high = VE_SIGMA_MIN, VE_SIGMA_MAX
        lo, hi = max(sigma_min, low), min(sigma_max, high)
        if lo >= hi:
            raise ValueError(
                f"sigma range {sigma_min:g}..{sigma_max:g} lies outside the {self.precond.upper()} "
                f"network's noise levels {low:.4g}..{high:.4g}; choose a range that overlaps them"
            )
        return lo, hi

    def forward(
        self, x: torch.Tensor, sigma, coords=None, class_labels=None, augment_labels=None, return_logvar=False
    ):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        c_skip, c_out, c_in, c_noise = self.scalings(sigma.reshape(-1, 1, 1, 1))
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
