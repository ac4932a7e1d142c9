"""VP preconditioning: closed forms for the schedule, the sigma -> timestep map and both prediction types."""

import math

import pytest
import torch

from patchdiff.patching import coordinate_grid
from patchdiff.precond_vp import VPDenoiser, sigma_to_timestep, vp_alphas_cumprod, vp_scalings, vp_sigmas
from patchdiff.sampling import edm_sampler


def test_linear_schedule_closed_form():
    abar = vp_alphas_cumprod("linear", 1e-4, 0.02, 1000).to(torch.float64)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(abar, torch.cumprod(1 - betas, 0), rtol=1e-5)
    sigmas = vp_sigmas(abar)
    # float32 abar as diffusers keeps it: 1 - abar_0 = 1e-4 carries a ~1e-4 relative rounding error
    assert math.isclose(float(sigmas[0]), math.sqrt(1e-4 / (1 - 1e-4)), rel_tol=1e-3)
    assert (sigmas[1:] > sigmas[:-1]).all() and 150 < float(sigmas[-1]) < 160  # DDPM's sigma_max ~ 157


def test_other_schedules_and_errors():
    cos = vp_alphas_cumprod("squaredcos_cap_v2", num_steps=1000).to(torch.float64)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert math.isclose(float(cos[499]), f(500 / 1000) / f(0), rel_tol=1e-4)
    sd = vp_alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000)
    assert math.isclose(float(sd[0]), 1 - 0.00085, rel_tol=1e-6)
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        vp_alphas_cumprod("sigmoid")
    with pytest.raises(ValueError, match="prediction type 'x0'"):
        vp_scalings(torch.ones(1), "x0")


def test_sigma_to_timestep_is_nearest_in_log_sigma():
    log_sigmas = vp_sigmas(vp_alphas_cumprod()).log()
    sigmas = log_sigmas.exp().to(torch.float32)
    t = torch.tensor([0, 1, 17, 500, 999])
    assert torch.equal(sigma_to_timestep(sigmas[t], log_sigmas), t.to(torch.float32))
    between = (log_sigmas[10] * 0.6 + log_sigmas[11] * 0.4).exp().to(torch.float32)
    assert float(sigma_to_timestep(between.reshape(1), log_sigmas)) == 10.0
    assert sigma_to_timestep(torch.tensor([1e-4, 1e4]), log_sigmas).tolist() == [0.0, 999.0]  # clamped


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_exact_network_gives_the_clean_image(prediction):
    """x = y + sigma n fed to an oracle that returns the true epsilon (or v): D(x; sigma) must be y."""
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    abar = vp_alphas_cumprod()
    sigma = vp_sigmas(abar)[torch.tensor([5, 300, 990])].to(torch.float32)
    s = sigma.reshape(-1, 1, 1, 1)
    x = y + s * n

    seen = {}

    def oracle(net_in, t, labels):
        seen.update(net_in=net_in, t=t)
        return n if prediction == "epsilon" else (n - s * y) / (1 + s**2).sqrt()

    D = VPDenoiser(oracle_module(oracle), prediction, abar, use_coords=False)
    assert torch.allclose(D(x, sigma), y, atol=1e-5)
    assert torch.allclose(seen["net_in"], x / (1 + s**2).sqrt())  # x_vp = sqrt(abar) y + sqrt(1-abar) n
    assert seen["t"].tolist() == [5.0, 300.0, 990.0]


def test_coordinates_and_labels_reach_the_network():
    seen = {}

    def net(net_in, t, labels):
        seen.update(net_in=net_in, labels=labels)
        return net_in[:, :1]

    D = VPDenoiser(oracle_module(net), "epsilon", vp_alphas_cumprod(), use_coords=True, label_dim=4)
    D(torch.randn(2, 1, 4, 4), 1.0)
    assert seen["net_in"].shape == (2, 3, 4, 4) and torch.equal(
        seen["net_in"][:, 1:], coordinate_grid(4, 4).expand(2, -1, -1, -1)
    )
    assert torch.equal(seen["labels"], torch.zeros(2, 4))  # none given: the null label


def oracle_module(fn):
    class Oracle(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    return Oracle()


def test_sigma_range_is_clamped_to_the_trained_noise_levels():
    D = VPDenoiser(
        oracle_module(lambda *a: a[0]), "epsilon", vp_alphas_cumprod("scaled_linear", 0.00085, 0.012)
    )
    lo, hi = D.sigma_range(0.002, 80.0)  # EDM's defaults reach far beyond a scaled_linear model's 0.029..14.6
    assert (lo, hi) == (D.sigma_min, D.sigma_max)
    assert math.isclose(lo, math.sqrt(0.00085 / (1 - 0.00085)), rel_tol=1e-3) and 14.5 < hi < 14.7
    assert D.sigma_range(0.1, 5.0) == (0.1, 5.0)  # inside the range: unchanged
    with pytest.raises(ValueError, match=r"sigma range 20\.\.80 lies outside the model's noise levels"):
        D.sigma_range(20.0, 80.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_off_grid_sigma_uses_the_sigma_of_its_timestep(prediction):
    """The network answers for its timestep's sigma_t, so c_skip and c_out must use sigma_t too: an exact
    network at x = y + sigma_t n gives back y when asked at a sigma between two timesteps."""
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    abar = vp_alphas_cumprod("linear", 1e-3, 0.2, 100)  # a coarse grid: neighbours ~5% apart in sigma
    D = VPDenoiser(oracle_module(lambda *a: None), prediction, abar, use_coords=False)
    grid = D.log_sigmas.exp().to(torch.float32)[torch.tensor([20, 60])]
    asked = grid * 1.01  # nearer to the same timesteps than to their neighbours
    s = grid.reshape(-1, 1, 1, 1)
    exact = n if prediction == "epsilon" else (n - s * y) / (1 + s**2).sqrt()
    D.net = oracle_module(lambda net_in, t, labels: exact)
    assert torch.allclose(D(y + s * n, asked), y, atol=1e-5)
    assert torch.equal(D.round_sigma(asked), grid)


@pytest.mark.parametrize("schedule", [("scaled_linear", 0.00085, 0.012, 1000), ("linear", 1e-3, 0.2, 100)])
def test_gaussian_data_sampled_within_the_models_range(schedule):
    """The exact epsilon of N(0, s^2) data, known only at the discrete timesteps: Heun-18 within the model's
    sigma range gives the data's std more closely than on EDM's 0.002..80 (numbers in docs/sampling.md)."""
    s = 0.5
    abar = vp_alphas_cumprod(*schedule)

    def exact_eps(x_vp, t, labels):  # E[n | x_vp] at timestep t, x_vp = sqrt(abar) y + sqrt(1 - abar) n
        a = abar.to(torch.float64)[t.long()].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x_vp / (a * s**2 + 1 - a)).to(torch.float32)

    D = VPDenoiser(oracle_module(exact_eps), "epsilon", abar, use_coords=False)
    noise = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    noise = noise / noise.std()

    def std_error(sigma_min, sigma_max):
        x = edm_sampler(D, noise, num_steps=18, sigma_min=sigma_min, sigma_max=sigma_max)
        return abs(float(x.std()) / s - 1)

    assert std_error(*D.sigma_range(0.002, 80.0)) < 0.016 < 0.04 < std_error(0.002, 80.0)
