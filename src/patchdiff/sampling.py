"""EDM samplers (Karras et al. 2022, Algorithm 2) as pure functions over a denoiser callable.

Every sampler has one signature: `sampler(denoiser, noise, num_steps, sigma_min, sigma_max, rho,
S_churn, S_min, S_max, S_noise, generator)`, where `denoiser(x, sigma)` returns the denoised estimate
of x at noise level sigma (a scalar tensor) and `noise` is unit Gaussian. Sampling runs at full
resolution; the Denoiser supplies the full coordinate grid itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """EDM Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then sigma_N = 0.

    Returns N+1 Python floats (float64) so the loop can branch on them without a device sync."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [float(sigma_max), 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (num_steps - 1) * (b - a)) ** rho for i in range(num_steps)] + [0.0]


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Gaussian noise shaped like x. A list of generators gives one per image, so an image's noise
    depends only on its own seed, never on the batch it was drawn in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [
            torch.randn(x.shape[1:], device=g.device, dtype=x.dtype, generator=g).to(x.device)
            for g in generator
        ]
    )


def edm_sampler(
    denoiser: DenoiserFn,
    noise: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: Generators = None,
    second_order: bool = True,
) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn; 2N-1 denoiser calls.

    second_order=False leaves out the correction: Euler, N calls (see euler_sampler)."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    t_dev = torch.tensor(sigmas, dtype=torch.float64, device=noise.device)
    x = noise.to(torch.float64) * sigmas[0]
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise (Algorithm 2, lines 4-6).
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        t_hat_dev = t_dev[i] * (1 + gamma)
        x_hat = x
        if gamma > 0:
            eps = randn_like(x.to(torch.float32), generator).to(torch.float64)
            x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * S_noise * eps
        # Euler step (line 8) ...
        d_cur = (
            x_hat - denoiser(x_hat.to(torch.float32), t_hat_dev.to(torch.float32)).to(torch.float64)
        ) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        # ... and the second-order correction, skipped when stepping to sigma = 0 (lines 9-11).
        if second_order and i < num_steps - 1:
            d_prime = (
                x - denoiser(x.to(torch.float32), t_dev[i + 1].to(torch.float32)).to(torch.float64)
            ) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x.to(torch.float32)


def euler_sampler(denoiser: DenoiserFn, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """First-order Euler over the same sigmas and churn as edm_sampler (same arguments); N calls."""
    return edm_sampler(denoiser, noise, second_order=False, **kwargs)


SAMPLERS = {"heun": edm_sampler, "euler": euler_sampler}


def guidance_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + w (D_cond - D_uncond)."""
    return uncond + scale * (cond - uncond)


def guided_denoiser(denoiser, class_labels: torch.Tensor, scale: float) -> DenoiserFn:
    """Wrap `denoiser(x, sigma, class_labels=...)` into `D(x, sigma)` with guidance scale `scale`.

    Conditional and unconditional (all-zero labels) run as one doubled batch. scale = 1 is plain
    conditional sampling and costs a single batch."""
    if scale == 1.0:
        return lambda x, sigma: denoiser(x, sigma, class_labels=class_labels)

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        labels = torch.cat([class_labels, torch.zeros_like(class_labels)])
        sigma2 = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma2, sigma2]), class_labels=labels)
        cond, uncond = both.chunk(2)
        return guidance_combine(cond, uncond, scale)

    return D
