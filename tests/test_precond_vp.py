"""VP preconditioning: closed forms for the schedule, the sigma -> timestep map and both prediction types."""

import math

import pytest
import torch

from patchdiff.patching import coordinate_grid
from patchdiff.precond_vp import VPDenoiser, sigma_to_timestep, vp_alphas_cumprod, vp_scalings, vp_sigmas


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
