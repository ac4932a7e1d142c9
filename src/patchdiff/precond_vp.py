"""VP preconditioning: a pretrained discrete-time DDPM network (epsilon- or v-prediction) as an EDM
denoiser D(x; sigma), the way EDM wraps DDPM-trained networks (Karras et al. 2022, Table 1, "VP" and
"iDDPM" columns).

A DDPM with cumulative alphas abar_t sees x_vp = sqrt(abar_t) y + sqrt(1 - abar_t) n. Divided by
sqrt(abar_t) this is EDM's x = y + sigma_t n with

    sigma_t = sqrt((1 - abar_t) / abar_t),   so   x_vp = x / sqrt(1 + sigma^2)   (c_in).

With s = sqrt(1 + sigma^2):
    epsilon-prediction, F = n:                         D = x - sigma F
    v-prediction, F = v = sqrt(abar) n - sqrt(1 - abar) y = (n - sigma y) / s:
        y = sqrt(abar) x_vp - sqrt(1 - abar) v = x / s^2 - (sigma / s) F,  so  D = x / s^2 - (sigma / s) F.
Both are D = c_skip x + c_out F(c_in x; t(sigma)); the network's timestep t(sigma) is the discrete step
whose sigma_t is nearest to sigma in log sigma (EDM rounds in sigma; the log treats both ends of the
range alike), and c_skip, c_out, c_in use that sigma_t, the noise level the network's answer assumes
(EDM's round_sigma). The network knows only sigma_0 .. sigma_{T-1}, so samplers run within that range
(sigma_range). Coordinate channels are concatenated to c_in x as in precond.Denoiser.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.loss import loss_weight as edm_loss_weight
from patchdiff.precond import network_inputs

PREDICTIONS = ("epsilon", "v_prediction")


def vp_alphas_cumprod(
    beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000
) -> torch.Tensor:
    """abar_t, t = 0 .. T-1, of a diffusers DDPM/DDIM scheduler config. Computed in float32 as diffusers
    does, so the sigmas of the scheduler's own timesteps are met exactly."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999) for i in range(num_steps)],
            dtype=torch.float32,
        )
    else:
        raise ValueError(
            f"unsupported beta_schedule {beta_schedule!r} in the pretrained scheduler config; "
            "supported: linear, scaled_linear, squaredcos_cap_v2"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), increasing in t (float64)."""
    abar = alphas_cumprod.to(torch.float64)
    return ((1 - abar) / abar).sqrt()


def sigma_to_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The discrete timestep (as a float tensor, like sigma) whose log sigma_t is nearest to log sigma."""
    distance = (sigma.to(log_sigmas.dtype).log().reshape(-1, 1) - log_sigmas.reshape(1, -1)).abs()
    return distance.argmin(dim=1).to(sigma.dtype).reshape(sigma.shape)


def vp_scalings(sigma: torch.Tensor, prediction: str):
    """(c_skip, c_out, c_in) for an epsilon- or v-prediction network (see the module docstring)."""
    s2 = 1 + sigma**2
    c_in = s2.rsqrt()
    if prediction == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction == "v_prediction":
        return 1 / s2, -sigma * c_in, c_in
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


class VPDenoiser(nn.Module):
    """D(x; sigma) of a discrete VP network; called like precond.Denoiser(x, sigma, coords, class_labels)."""

    def __init__(
        self,
        net: nn.Module,
        prediction: str,
        alphas_cumprod: torch.Tensor,
        use_coords: bool = True,
        label_dim: int = 0,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}"
            )
        self.net = net
        self.prediction = prediction
        self.use_coords = use_coords
        self.label_dim = label_dim
        # Derived from the config, so not part of the snapshot's state.
        self.register_buffer("log_sigmas", vp_sigmas(alphas_cumprod).log(), persistent=False)

    @classmethod
    def from_config(cls, net: nn.Module, cfg: NetworkConfig) -> VPDenoiser:
        abar = vp_alphas_cumprod(cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
        return cls(net, cfg.prediction, abar, use_coords=cfg.coord_channels > 0, label_dim=cfg.label_dim)

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_range(self, sigma_min: float, sigma_max: float) -> tuple[float, float]:
        """A sampler's (sigma_min, sigma_max) clamped to the noise levels the network was trained on:
        beyond them it sees the end timestep, so D would scale its output by a sigma it never assumed
        (sampling a scaled_linear model, sigma_max ~ 14.6, from sigma = 80)."""
        lo, hi = max(sigma_min, self.sigma_min), min(sigma_max, self.sigma_max)
        if lo >= hi:
            raise ValueError(
                f"sigma range {sigma_min:g}..{sigma_max:g} lies outside the model's noise levels "
                f"{self.sigma_min:.4g}..{self.sigma_max:.4g}; choose a range that overlaps them"
            )
        return lo, hi

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise level of the trained timestep nearest to sigma (EDM's round_sigma)."""
        t = sigma_to_timestep(sigma, self.log_sigmas).long()
        return self.log_sigmas[t].exp().to(sigma.dtype)

    def loss_weight(self, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
        """lambda(sigma) of the fine-tuning loss (loss.edm_loss). Epsilon-prediction: 1 / sigma^2 = 1 / c_out^2,
        so lambda ||D - y||^2 = ||F - n||^2, the plain epsilon MSE of DDPM (EDM's VP column); EDM's lambda
        would weight it by 1 + sigma^2 / sigma_data^2. v-prediction keeps EDM's lambda, 1 to 1 / sigma_data^2 times
        the plain v MSE's weight 1 / c_out^2 = 1 + 1 / sigma^2."""
        if self.prediction == "epsilon":
            return sigma.to(torch.float32) ** -2
        return edm_loss_weight(sigma, sigma_data)

    def forward(self, x: torch.Tensor, sigma, coords=None, class_labels=None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        # The network only knows its timesteps: c_skip, c_out and c_in use the sigma of the one it is given.
        t = sigma_to_timestep(sigma, self.log_sigmas)
        sigma = self.log_sigmas[t.long()].exp().to(torch.float32)
        c_skip, c_out, c_in = vp_scalings(sigma.reshape(-1, 1, 1, 1), self.prediction)
        net_in, labels = network_inputs(c_in * x, coords, class_labels, self.use_coords, self.label_dim)
        F_x = self.net(net_in, t, labels)
        return c_skip * x + c_out * F_x.to(torch.float32)
