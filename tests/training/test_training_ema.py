import pytest
import torch

from patchdiff.training.ema import ema_beta, update_ema


def test_beta_halves_after_one_half_life():
    # Steps totalling one half-life of images leave the old weights with weight 1/2.
    beta = ema_beta(100, 1e9, halflife_kimg=1.0, rampup_ratio=0.0)
    assert beta**10 == pytest.approx(0.5)
    # Early in training the ramp-up caps the half-life at rampup_ratio * images seen.
    assert ema_beta(100, 1000, 500.0, 0.1) == pytest.approx(0.5)


def test_update_moves_towards_the_network():
    net = torch.nn.Linear(2, 2)
    ema = torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.zero_()
        net.weight.fill_(1.0)
    update_ema(ema, net, beta=0.75)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 0.25))
