import itertools
import math

import pytest
import torch

from patchdiff import edm_sampler, euler_sampler, guidance_combine, guided_denoiser, karras_sigmas


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
