import math

import pytest
import torch

from patchdiff import Denoiser, coordinate_grid, edm_scalings


def test_scalings_closed_form():
    sd = 0.5
    for s in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(s, dtype=torch.float64), sd)
        assert math.isclose(c_skip, sd**2 / (s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_out, s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_in, 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_noise, math.log(s) / 4, rel_tol=1e-12)
        # Unit variance of the network input and target (EDM Appendix B.6).
        assert math.isclose(c_in**2 * (sd**2 + s**2), 1.0, rel_tol=1e-12)


class Recorder(torch.nn.Module):
    """Returns a constant and records what the denoiser fed it."""

    def forward(self, x, noise_labels, class_labels=None):
        self.x, self.noise, self.labels = x, noise_labels, class_labels
        return torch.ones(x.shape[0], 3, x.shape[2], x.shape[3])


def test_denoiser_composes_scalings_and_coordinates():
    net = Recorder()
    D = Denoiser(net, sigma_data=0.5, use_coords=True, label_dim=4)
    x = torch.randn(2, 3, 4, 6)
    sigma = torch.tensor([0.5, 2.0])
    out = D(x, sigma)
    c_skip, c_out, c_in, _c_noise = edm_scalings(sigma.reshape(-1, 1, 1, 1))
    assert torch.allclose(out, c_skip * x + c_out)
    assert torch.allclose(net.x[:, :3], c_in * x)
    assert torch.equal(net.x[:, 3:], coordinate_grid(4, 6).expand(2, -1, -1, -1))
    assert torch.allclose(net.noise, sigma.log() / 4)
    assert net.labels.shape == (2, 4) and net.labels.abs().sum() == 0  # missing labels = unconditional
    coords = torch.zeros(2, 2, 4, 6)
    D(x, 1.0, coords=coords)
    assert torch.equal(net.x[:, 3:], coords) and net.noise.shape == (2,)


def test_denoiser_without_coords_or_labels():
    net = Recorder()
    D = Denoiser(net, use_coords=False)
    D(torch.randn(1, 3, 4, 4), torch.tensor(1.0))
    assert net.x.shape[1] == 3 and net.labels is None


def test_denoiser_feeds_the_coordinate_frequencies():
    from patchdiff.patching import coordinate_features

    net = Recorder()
    D = Denoiser(net, use_coords=True, coord_embed=2)
    D(torch.randn(2, 3, 4, 6), torch.tensor(1.0))
    assert net.x.shape[1] == 3 + 2 + 8
    assert torch.equal(net.x[:, 3:], coordinate_features(coordinate_grid(4, 6).expand(2, -1, -1, -1), 2))


# --------------------------------------------------------------------------- EDM Table 1, VP and VE


def test_vp_time_inverts_vp_sigma():
    from patchdiff.precond import vp_sigma, vp_time

    sigma = torch.tensor([1e-3, 0.002, 0.1, 1.0, 80.0, 150.0], dtype=torch.float64)
    assert torch.allclose(vp_sigma(vp_time(sigma)), sigma, rtol=1e-10, atol=0)
    t = torch.tensor([1e-5, 0.01, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(vp_time(vp_sigma(t)), t, rtol=1e-10, atol=0)
    # float32 keeps small sigma too (no cancellation): sigma(1e-5) ~ 1e-3
    small = vp_sigma(torch.tensor([1e-5], dtype=torch.float32))
    assert math.isclose(float(vp_time(small)), 1e-5, rel_tol=1e-5)
    assert math.isclose(vp_sigma(1.0), math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel_tol=1e-12)


def test_vp_and_ve_scalings_closed_form():
    from patchdiff.precond import ve_scalings, vp_scalings

    for s in (0.002, 0.3, 1.0, 80.0):
        sigma = torch.tensor(s, dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = vp_scalings(sigma)
        t = (math.sqrt(0.1**2 + 2 * 19.9 * math.log(1 + s**2)) - 0.1) / 19.9
        assert (float(c_skip), float(c_out)) == (1.0, -s)
        assert math.isclose(c_in, 1 / math.sqrt(s**2 + 1), rel_tol=1e-12)
        assert math.isclose(c_noise, 999 * t, rel_tol=1e-9)
        c_skip, c_out, c_in, c_noise = ve_scalings(sigma)
        assert (float(c_skip), float(c_out), float(c_in)) == (1.0, s, 1.0)
        assert math.isclose(c_noise, math.log(s / 2), rel_tol=1e-12)


def test_denoiser_uses_its_preconditioning_and_noise_range():
    from patchdiff.precond import vp_sigma

    x = torch.randn(2, 3, 4, 4)
    for precond, c_out, c_in, c_noise in (
        ("vp", -2.0, 1 / math.sqrt(5), 999 * (math.sqrt(0.01 + 2 * 19.9 * math.log(5)) - 0.1) / 19.9),
        ("ve", 2.0, 1.0, 0.0),
    ):
        net = Recorder()
        D = Denoiser(net, use_coords=False, precond=precond)(x, 2.0)
        assert torch.allclose(D, x + c_out, atol=1e-6)  # c_skip = 1, F = 1
        assert torch.allclose(net.x, c_in * x, atol=1e-6)
        assert torch.allclose(net.noise, torch.full((2,), c_noise), rtol=1e-5, atol=1e-6)
    # the sampler's range, clamped to the trained one; EDM's own is left as asked
    assert Denoiser(Recorder()).sigma_range(0.002, 80.0) == (0.002, 80.0)
    assert Denoiser(Recorder(), precond="ve").sigma_range(0.002, 200.0) == (0.02, 100.0)
    lo, hi = Denoiser(Recorder(), precond="vp").sigma_range(1e-4, 500.0)
    assert (lo, hi) == (vp_sigma(1e-5), vp_sigma(1.0)) and 1e-3 < lo < 1.01e-3 and 150 < hi < 153
    with pytest.raises(ValueError, match=r"outside the VE network.s noise levels 0\.02\.\.100"):
        Denoiser(Recorder(), precond="ve").sigma_range(200.0, 300.0)
    with pytest.raises(ValueError, match="unknown preconditioning 'vx'"):
        Denoiser(Recorder(), precond="vx")
