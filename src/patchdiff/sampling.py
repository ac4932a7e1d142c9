"""Samplers as pure functions over a denoiser callable: EDM's Heun and Euler (Karras et al. 2022,
Algorithm 2, with churn) and the multistep DPM-Solver++ 2M/3M (Lu et al. 2022) on EDM's sigmas.

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


def dpmpp_update(
    x: torch.Tensor, sigma_cur: float, sigma_next: float, history: Sequence[tuple[float, torch.Tensor]]
) -> torch.Tensor:
    """One DPM-Solver++ multistep step (Lu et al. 2022) from sigma_cur to sigma_next > 0.

    In lambda = -log(sigma) the probability-flow ODE of EDM (alpha = 1) has the exact solution
        x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(lambda) dlambda.
    `history` holds (lambda, D) for the current point first, then earlier points; D is replaced by the
    polynomial through them (order = len(history), 1..3) and the integral is taken of that:
      order 1: D constant (DPM-Solver++ 1, i.e. DDIM);
      order 2: the paper's 2M update (Algorithm 2): D ~ (1 + 1/2r) D_0 - 1/2r D_1, r = h_prev / h;
      order 3: D(lambda_s + u) ~ D_0 + u D' + u^2/2 D'', integrated exactly with
               int_0^h e^(u-h) u du = h - phi1,  int_0^h e^(u-h) u^2/2 du = h^2/2 - h + phi1,
               phi1 = 1 - e^-h; D', D'' from divided differences on the uneven lambda grid. This is the
               exact integral of the quadratic, not k-diffusion's 3M, whose last term has half of D''."""
    h = math.log(sigma_cur / sigma_next)
    phi1 = -math.expm1(-h)
    (lam0, D0), earlier = history[0], history[1:]
    x_next = (sigma_next / sigma_cur) * x + phi1 * D0
    if not earlier:
        return x_next
    lam1, D1 = earlier[0]
    a = lam0 - lam1  # > 0: lambda grows as sigma falls
    if len(earlier) == 1:
        r = a / h
        return x_next + phi1 / (2 * r) * (D0 - D1)
    lam2, D2 = earlier[1]
    b = lam0 - lam2
    f01 = (D0 - D1) / a  # divided differences of D over lambda
    f12 = (D1 - D2) / (b - a)
    f012 = (f01 - f12) / b
    dD, d2D = f01 + a * f012, 2 * f012  # derivatives at lambda_0 of the quadratic through the three points
    return x_next + (h - phi1) * dD + (h * h / 2 - h + phi1) * d2D


def dpmpp_sampler(
    denoiser: DenoiserFn,
    noise: torch.Tensor,
    num_steps: int = 13,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: Generators = None,
    order: int = 2,
) -> torch.Tensor:
    """DPM-Solver++(2M/3M), data prediction, multistep on the EDM (Karras) sigmas; N denoiser calls.

    Each step reuses the denoised estimates of up to `order` - 1 earlier steps, so it costs one call,
    and the order rises over the first steps as history accumulates. The last step, to sigma = 0 (an
    infinite step in lambda), is first order: x_N = D(x_{N-1}, sigma_{N-1}), as in EDM's samplers.
    Deterministic: S_churn must be 0 (the S_* and generator arguments exist for the common signature)."""
    if S_churn != 0:
        raise ValueError(
            f"--S-churn {S_churn}: the DPM-Solver++ samplers are deterministic; use heun or euler"
        )
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    t_dev = torch.tensor(sigmas, dtype=torch.float32, device=noise.device)
    x = noise.to(torch.float64) * sigmas[0]
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, D), newest first
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        D = denoiser(x.to(torch.float32), t_dev[i]).to(torch.float64)
        if t_next == 0:
            return D.to(torch.float32)
        history = [(-math.log(t_cur), D), *history][:order]
        x = dpmpp_update(x, t_cur, t_next, history)
    return x.to(torch.float32)  # not reached: karras_sigmas ends at 0


def dpmpp_2m_sampler(denoiser: DenoiserFn, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """DPM-Solver++(2M) on the EDM sigmas (same arguments as dpmpp_sampler); N calls."""
    return dpmpp_sampler(denoiser, noise, order=2, **kwargs)


def dpmpp_3m_sampler(denoiser: DenoiserFn, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """Third-order multistep DPM-Solver++ on the EDM sigmas (same arguments as dpmpp_sampler); N calls."""
    return dpmpp_sampler(denoiser, noise, order=3, **kwargs)


# The samplers `--sampler` offers, each with its default step count and its network calls for N steps.
SAMPLERS = {
    "heun": edm_sampler,
    "euler": euler_sampler,
    "dpmpp-2m": dpmpp_2m_sampler,
    "dpmpp-3m": dpmpp_3m_sampler,
}
DEFAULT_STEPS = {"heun": 18, "euler": 18, "dpmpp-2m": 13, "dpmpp-3m": 13}
NETWORK_CALLS = {
    "heun": lambda n: 2 * n - 1,
    "euler": lambda n: n,
    "dpmpp-2m": lambda n: n,
    "dpmpp-3m": lambda n: n,
}
DEFAULT_SAMPLER = "dpmpp-2m"


def resolve_sampler(sampler: str | None, num_steps: int | None) -> tuple[str, int]:
    """(name, steps) with the defaults filled in: the default sampler, and that sampler's default steps."""
    sampler = DEFAULT_SAMPLER if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    num_steps = DEFAULT_STEPS[sampler] if num_steps is None else num_steps
    if num_steps < 1:
        raise ValueError(f"--steps {num_steps}: must be >= 1")
    return sampler, num_steps


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
