import math

import pytest
import torch

from patchdiff.config import LossConfig
from patchdiff.loss import edm_loss, loss_weight, sample_sigma, sample_sigma_band, unwrapped


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


def _grads(scaling: str, crop: int, full: int = 16) -> list[torch.Tensor]:
    """Gradients of the loss of a tiny conv denoiser on fixed crops, noise and sigmas."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
    y = torch.randn(4, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    cfg = LossConfig(scaling=scaling)
    loss = edm_loss(
        lambda x, s, c, l: net(x),
        y,
        cfg=cfg,
        generator=torch.Generator().manual_seed(2),
        full_hw=(full, full),
    )
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("crop", [4, 8, 16])
def test_published_scaling_is_mean_times_crop_share_of_full_image(crop):
    mean, published = _grads("mean", crop), _grads("published", crop)
    expected = (crop / 16) ** 2  # a full-size crop has the same gradient in both modes
    for g_mean, g_pub in zip(mean, published, strict=True):
        assert torch.allclose(g_pub, g_mean * expected, rtol=1e-5, atol=1e-9)
        assert g_mean.abs().sum() > 0


def test_published_scaling_needs_the_full_size_and_unknown_scaling_is_rejected():
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="full image size"):
        edm_loss(lambda x, s, c, l: x, y, cfg=LossConfig(scaling="published"))
    with pytest.raises(ValueError, match="unknown loss scaling 'sum'"):
        edm_loss(lambda x, s, c, l: x, y, cfg=LossConfig(scaling="sum"), full_hw=(8, 8))


def test_noise_bands_split_the_lognormal_by_quantile():
    gen = torch.Generator().manual_seed(0)
    normal = torch.distributions.Normal(-1.2, 1.2)
    bands, probs = [(0.0, 0.2), (0.2, 0.5), (0.5, 1.0)], [0.2, 0.3, 0.5]
    draws = []
    for (lo, hi), p in zip(bands, probs, strict=True):
        s = sample_sigma_band(int(200_000 * p), -1.2, 1.2, (lo, hi), generator=gen)
        q = normal.cdf(s.log())  # each draw's quantile lies in its band, spread uniformly over it
        assert q.min() >= lo - 1e-5 and q.max() <= hi + 1e-5
        assert abs(q.mean().item() - (lo + hi) / 2) < 0.003
        draws.append(s)
    # Together the bands give back ln(sigma) ~ N(-1.2, 1.2^2), as without bands.
    log_all = torch.cat(draws).log()
    assert abs(log_all.mean().item() + 1.2) < 0.01 and abs(log_all.std().item() - 1.2) < 0.01
    with pytest.raises(ValueError, match="noise band"):
        sample_sigma_band(4, -1.2, 1.2, (0.5, 0.5))


def test_edm_loss_uses_the_band():
    seen = []

    def record(x, sigma, c, l):
        seen.append(sigma)
        return x

    edm_loss(record, torch.randn(512, 1, 4, 4), band=(0.0, 0.2), generator=torch.Generator().manual_seed(1))
    ceiling = torch.distributions.Normal(-1.2, 1.2).icdf(torch.tensor(0.2)).exp()
    assert seen[0].max() <= ceiling * (1 + 1e-5) and seen[0].min() > 0


def vp_denoiser(prediction: str, net):
    from patchdiff.precond_vp import VPDenoiser, vp_alphas_cumprod

    class Net(torch.nn.Module):
        def forward(self, x, t, labels=None):
            return net(x, t)

    return VPDenoiser(Net(), prediction, vp_alphas_cumprod(), use_coords=False)


def test_epsilon_fine_tuning_is_the_plain_epsilon_mse():
    """An epsilon network that answers 0 leaves D = x: the loss must be mean(n^2) for unit noise n, not
    EDM's lambda * sigma^2 n^2 = (1 + 4 sigma^2) n^2."""
    y = torch.zeros(8, 1, 4, 4)
    D = vp_denoiser("epsilon", lambda x, t: torch.zeros_like(x))
    loss = edm_loss(D, y, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    sample_sigma(8, LossConfig().P_mean, LossConfig().P_std, generator=gen)  # the loss's draws, in order
    n = torch.randn(y.shape, generator=gen)
    assert loss.item() == pytest.approx((n**2).mean().item(), rel=1e-5)
    # Training may wrap it (--compile; DDP): the loss looks through the wrappers for its weight.
    assert unwrapped(torch.compile(D)) is D and unwrapped(D) is D


def test_vp_training_noise_is_at_the_networks_timesteps_and_v_keeps_edms_weight():
    seen = []
    D = vp_denoiser("v_prediction", lambda x, t: seen.append(x) or torch.zeros_like(x))
    sigma = torch.tensor([0.05, 0.5, 5.0])
    assert torch.equal(D.loss_weight(sigma, 0.5), loss_weight(sigma, 0.5))
    y = torch.zeros(64, 1, 2, 2)
    edm_loss(D, y, generator=torch.Generator().manual_seed(0))
    # The drawn sigmas are moved onto the timesteps' sigma_t before the noise is added, so the network
    # sees x = y + sigma_t n, the input it assumes, not y + sigma n with sigma between two timesteps.
    gen = torch.Generator().manual_seed(0)
    drawn = sample_sigma(64, LossConfig().P_mean, LossConfig().P_std, generator=gen)
    n = torch.randn(y.shape, generator=gen)
    sigma_t = D.round_sigma(drawn).reshape(-1, 1, 1, 1)
    assert not torch.equal(sigma_t.reshape(-1), drawn)
    assert torch.allclose(seen[0], sigma_t * n / (1 + sigma_t**2).sqrt(), rtol=1e-5, atol=1e-6)


def test_the_mask_keeps_the_margin_out_of_the_loss():
    """--crop-margin: pixels outside the mask do not count, whatever the denoiser does there; the loss is
    the mean over the counted pixels."""
    y = torch.randn(4, 3, 8, 8)
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    wrong_outside = lambda x, s, c, l: y + 100 * (1 - mask)  # noqa: E731
    assert edm_loss(wrong_outside, y, mask=mask).item() == 0.0
    assert edm_loss(wrong_outside, y).item() > 0
    # The mean over counted pixels: an error of 1 on the central 4x4 gives lambda-weighted 1 per pixel,
    # the same as an error of 1 everywhere without a mask.
    off_by_one = lambda x, s, c, l: y + 1  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    masked = edm_loss(off_by_one, y, mask=mask, generator=gen())
    assert torch.allclose(masked, edm_loss(off_by_one, y, generator=gen()))
    with pytest.raises(ValueError, match="--crop-margin needs the loss scaling 'mean'"):
        edm_loss(off_by_one, y, cfg=LossConfig(scaling="published"), mask=mask, full_hw=(16, 16))
