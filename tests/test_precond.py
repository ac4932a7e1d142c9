import math

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
