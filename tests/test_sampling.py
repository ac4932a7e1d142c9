import itertools
import math

import pytest
import torch

from patchdiff import edm_sampler, euler_sampler, guidance_combine, guided_denoiser, karras_sigmas
from patchdiff.config import network_preset
from patchdiff.denoisers import build_denoiser
from patchdiff.generation import Model, generate
from patchdiff.sampling import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    NETWORK_CALLS,
    SAMPLERS,
    dpmpp_2m_sampler,
    dpmpp_3m_sampler,
    resolve_sampler,
)


def gaussian_denoiser(s: float, calls: list | None = None):
    """The exact denoiser of data ~ N(0, s^2): E[y | x] = x s^2 / (s^2 + sigma^2)."""

    def D(x, sigma):
        if calls is not None:
            calls.append(1)
        return x * s**2 / (s**2 + sigma.to(x.dtype) ** 2)

    return D


def test_karras_sigmas_endpoints():
    s = karras_sigmas(18)
    assert len(s) == 19 and s[-1] == 0.0
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002)
    assert all(a > b for a, b in itertools.pairwise(s))


@pytest.mark.parametrize("steps", [18, 64])
def test_heun_call_count_is_2n_minus_1(steps):
    calls = []
    edm_sampler(gaussian_denoiser(0.5, calls), torch.randn(4, 1, 2, 2), num_steps=steps)
    assert len(calls) == 2 * steps - 1
    calls.clear()
    euler_sampler(gaussian_denoiser(0.5, calls), torch.randn(4, 1, 2, 2), num_steps=steps)
    assert len(calls) == steps


def test_sampler_reaches_the_exact_gaussian():
    s = 0.5
    noise = torch.randn(20000, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    errs = {}
    for steps in (18, 64):
        out = edm_sampler(gaussian_denoiser(s), noise, num_steps=steps)
        errs[steps] = abs(out.std().item() / s - 1)
    assert errs[64] < 0.015
    assert errs[64] < errs[18]  # discretisation error shrinks with more steps


def test_churn_keeps_the_distribution_and_uses_per_image_generators():
    s = 0.5
    noise = torch.randn(4000, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(noise.shape[0])]
    out = edm_sampler(gaussian_denoiser(s), noise, num_steps=64, S_churn=10, generator=gens)
    assert abs(out.std().item() / s - 1) < 0.03
    # Image 3 sampled alone with its own generator is the same image.
    alone = edm_sampler(
        gaussian_denoiser(s),
        noise[3:4],
        num_steps=64,
        S_churn=10,
        generator=[torch.Generator().manual_seed(3)],
    )
    assert torch.allclose(alone, out[3:4], atol=1e-5)


def test_guidance_combination_and_doubled_batch():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guidance_combine(cond, uncond, 1.5).item() == pytest.approx(2.5)
    seen = []

    def D(x, sigma, class_labels):
        seen.append(x.shape[0])
        return x + class_labels.sum(1).reshape(-1, 1, 1, 1)  # conditional adds 1, unconditional adds 0

    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    x = torch.zeros(2, 1, 2, 2)
    out = guided_denoiser(D, labels, scale=3.0)(x, torch.tensor(1.0))
    assert seen == [4]  # one network call on the doubled batch
    assert torch.allclose(out, torch.full_like(x, 3.0))  # 0 + 3 * (1 - 0)
    assert torch.allclose(guided_denoiser(D, labels, 1.0)(x, torch.tensor(1.0)), torch.ones_like(x))
    assert math.isfinite(out.sum().item())


def exact_gaussian_solution(noise: torch.Tensor, s: float, sigma_min=0.002, sigma_max=80.0) -> torch.Tensor:
    """The ODE dx/dsigma = (x - D)/sigma for N(0, s^2) data has x(sigma) ∝ sqrt(s^2 + sigma^2). Every
    sampler ends with x_N = D(x, sigma_min), so the exact ODE to sigma_min plus that step is the target."""
    x = noise.to(torch.float64) * sigma_max * math.sqrt((s**2 + sigma_min**2) / (s**2 + sigma_max**2))
    return x * s**2 / (s**2 + sigma_min**2)


def relative_error(name: str, steps: int, noise: torch.Tensor, s: float = 0.5) -> float:
    out = SAMPLERS[name](gaussian_denoiser(s), noise, num_steps=steps).to(torch.float64)
    exact = exact_gaussian_solution(noise, s)
    return ((out - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-3m"])
@pytest.mark.parametrize("steps", [1, 2, 3, 13])
def test_dpmpp_calls_the_network_once_per_step(name, steps):
    calls = []
    SAMPLERS[name](gaussian_denoiser(0.5, calls), torch.randn(2, 1, 2, 2), num_steps=steps)
    assert len(calls) == steps == NETWORK_CALLS[name](steps)


def test_network_calls_table_matches_the_samplers():
    for name, sampler in SAMPLERS.items():
        calls = []
        sampler(gaussian_denoiser(0.5, calls), torch.randn(2, 1, 2, 2), num_steps=7)
        assert len(calls) == NETWORK_CALLS[name](7), name


def test_dpmpp_one_step_is_the_denoised_noise():
    # One step goes from sigma_max straight to 0: the answer is D(x_0, sigma_max), exactly.
    noise = torch.randn(3, 1, 2, 2)
    D = gaussian_denoiser(0.5)
    out = dpmpp_2m_sampler(D, noise, num_steps=1)
    assert torch.allclose(out, D(noise * 80.0, torch.tensor(80.0)), rtol=1e-6)


def test_convergence_order_as_the_step_count_doubles():
    # Error ratio per doubling ~ 2^order: Euler 2, Heun and DPM-Solver++(2M) 4, 3M 8.
    noise = torch.randn(256, 1, 1, 4, generator=torch.Generator().manual_seed(0))
    ratio = {}
    for name in ("euler", "dpmpp-2m", "dpmpp-3m"):
        e = [relative_error(name, n, noise) for n in (16, 32, 64)]
        ratio[name] = min(e[0] / e[1], e[1] / e[2])
    assert 1.8 < ratio["euler"] < 2.2
    assert ratio["dpmpp-2m"] > 3.5
    assert ratio["dpmpp-3m"] > 7.0
    assert relative_error("dpmpp-2m", 64, noise) < 5e-3
    assert relative_error("dpmpp-3m", 64, noise) < 1e-3


def mixture_denoiser(centres: torch.Tensor, s0: float):
    """The exact denoiser of an equal mixture of N(centre_k, s0^2 I): nonlinear in x, unlike the Gaussian's."""

    def D(x, sigma):
        flat = x.to(torch.float64).flatten(1)
        var = s0**2 + float(sigma) ** 2
        w = (-((flat[:, None] - centres[None]) ** 2).sum(-1) / (2 * var)).softmax(-1)  # [N, K]
        mean = w @ centres + (s0**2 / var) * (flat - w @ centres)
        return mean.reshape(x.shape).to(x.dtype)

    return D


def test_dpmpp_3m_is_accurate_given_enough_steps_and_unstable_with_few():
    """On a nonlinear (mixture) ODE, against a 400-step Heun solution of the same noise: 3M is the most
    accurate multistep solver at 18 steps, but its quadratic extrapolation over the few large steps of
    an 8-step Karras schedule goes wrong (docs/sampling.md: why 13-step 3M scored badly)."""
    gen = torch.Generator().manual_seed(0)
    D = mixture_denoiser(torch.rand(16, 64, generator=gen, dtype=torch.float64) * 2 - 1, 0.1)
    noise = torch.randn(128, 1, 8, 8, generator=gen)
    exact = edm_sampler(D, noise, num_steps=400)

    def rms(sampler, n):
        return (sampler(D, noise, num_steps=n) - exact).pow(2).mean().sqrt().item()

    assert rms(dpmpp_3m_sampler, 18) < 0.5 * rms(dpmpp_2m_sampler, 18)
    assert rms(dpmpp_3m_sampler, 25) < 0.01 and rms(dpmpp_2m_sampler, 25) < 0.01
    assert rms(dpmpp_3m_sampler, 8) > 2 * rms(dpmpp_2m_sampler, 8)


def test_dpmpp_reaches_the_exact_gaussian():
    s = 0.5
    noise = torch.randn(20000, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    for sampler in (dpmpp_2m_sampler, dpmpp_3m_sampler):
        assert abs(sampler(gaussian_denoiser(s), noise, num_steps=64).std().item() / s - 1) < 0.015


def test_dpmpp_is_deterministic_and_refuses_churn():
    with pytest.raises(ValueError, match="--S-churn"):
        dpmpp_2m_sampler(gaussian_denoiser(0.5), torch.randn(1, 1, 2, 2), S_churn=1.0)


def test_resolve_sampler_fills_in_the_defaults():
    assert resolve_sampler(None, None) == (DEFAULT_SAMPLER, DEFAULT_STEPS[DEFAULT_SAMPLER])
    assert resolve_sampler("heun", None) == ("heun", 18)
    assert resolve_sampler("dpmpp-3m", 9) == ("dpmpp-3m", 9)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        resolve_sampler("dpm", None)
    with pytest.raises(ValueError, match="--steps 0"):
        resolve_sampler("euler", 0)


@pytest.fixture(scope="module")
def tiny_model() -> Model:
    """An untrained ~30k-parameter DDPM++ at 16x16: enough to check batching and seeding through a network."""
    from patchdiff.config import TrainConfig

    net = network_preset(
        "ddpmpp", 16, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,)
    )
    torch.manual_seed(0)
    cfg = TrainConfig(data="", outdir="", network=net)
    return Model(build_denoiser(cfg).eval().requires_grad_(False), cfg, torch.device("cpu"))


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-3m"])
def test_dpmpp_images_depend_only_on_their_seeds(tiny_model, name):
    one_by_one = generate(tiny_model, [3, 4, 5], batch_size=1, num_steps=5, sampler=name)
    batched = generate(tiny_model, [3, 4, 5], batch_size=3, num_steps=5, sampler=name)
    again = generate(tiny_model, [3, 4, 5], batch_size=2, num_steps=5, sampler=name)
    assert (one_by_one.int() - batched.int()).abs().max() <= 1  # rounding at most one level
    assert (batched.int() - again.int()).abs().max() <= 1
    assert torch.equal(generate(tiny_model, [4], batch_size=1, num_steps=5, sampler=name), one_by_one[1:2])
    assert not torch.equal(one_by_one[0], one_by_one[1])


def test_dpmpp_3m_step_is_the_exact_integral_of_the_quadratic():
    """D quadratic in lambda: the 3M step equals the exact solution (quadrature of the integral), and the
    variant with half the curvature term (k-diffusion's dpmpp_3m_sde at eta = 0) does not."""
    from patchdiff.sampling import dpmpp_update

    sig = [3.0, 1.7, 1.0, 0.45]  # two earlier points, the current one, the target
    lam = [-math.log(s) for s in sig]
    c0, c1, c2 = 0.3, -0.8, 0.5

    def D(l):  # a quadratic around the current point lambda_2
        return torch.tensor([c0 + c1 * (l - lam[2]) + c2 * (l - lam[2]) ** 2], dtype=torch.float64)

    x = torch.tensor([1.234], dtype=torch.float64)
    ours = float(
        dpmpp_update(x, sig[2], sig[3], [(lam[2], D(lam[2])), (lam[1], D(lam[1])), (lam[0], D(lam[0]))])
    )
    # x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda D(lambda) dlambda, by the midpoint rule.
    n = 200_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n * (lam[3] - lam[2]) + lam[2]
    integral = float(
        (u.exp() * (c0 + c1 * (u - lam[2]) + c2 * (u - lam[2]) ** 2)).sum() * (lam[3] - lam[2]) / n
    )
    exact = sig[3] / sig[2] * 1.234 + sig[3] * integral
    assert ours == pytest.approx(exact, abs=1e-9)
    h = lam[3] - lam[2]
    halved = (
        ours - (h * h / 2 - h + -math.expm1(-h)) * c2
    )  # the curvature term with f012 = c2 instead of 2 c2
    assert abs(halved - exact) > 1e-3
