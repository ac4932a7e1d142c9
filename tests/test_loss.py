import math

import torch

from patchdiff.config import LossConfig
from patchdiff.loss import edm_loss, loss_weight, sample_sigma


def test_sigma_distribution_is_lognormal():
    s = sample_sigma(200_000, -1.2, 1.2, generator=torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 1.2) < 0.01 and abs(s.log().std().item() - 1.2) < 0.01


def test_weight_closed_form():
    s = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(loss_weight(s, 0.5), (s**2 + 0.25) / (s * 0.5) ** 2)


def test_loss_of_ideal_denoiser_is_zero_and_of_identity_matches_expectation():
    y = torch.randn(64, 3, 8, 8)
    assert edm_loss(lambda x, sigma, c, l: y, y).item() == 0.0
    # D(x) = x leaves the noise: E[lambda * sigma^2] = E[(sigma^2 + sd^2) / sd^2] over ln sigma ~ N(Pm, Ps).
    cfg = LossConfig()
    gen = torch.Generator().manual_seed(0)
    losses = [edm_loss(lambda x, sigma, c, l: x, y, cfg=cfg, generator=gen).item() for _ in range(400)]
    expected = (math.exp(2 * cfg.P_mean + 2 * cfg.P_std**2) + cfg.sigma_data**2) / cfg.sigma_data**2
    assert abs(sum(losses) / len(losses) / expected - 1) < 0.1


def test_loss_scale_does_not_depend_on_crop_size():
    gen = torch.Generator().manual_seed(0)
    small = torch.stack(
        [edm_loss(lambda x, s, c, l: 0 * x, torch.randn(16, 3, 8, 8), generator=gen) for _ in range(200)]
    ).mean()
    large = torch.stack(
        [edm_loss(lambda x, s, c, l: 0 * x, torch.randn(4, 3, 32, 32), generator=gen) for _ in range(200)]
    ).mean()
    assert abs(small / large - 1) < 0.15
