"""Regions, larger canvases and tiles (canvas.py) and their sampling through generation.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.conftest import tiny_config

from patchdiff.canvas import (
    canvas_coords,
    canvas_denoiser,
    centred_canvas,
    frame_canvas,
    region_canvas,
    tile_starts,
    tile_windows,
)
from patchdiff.denoisers import build_denoiser
from patchdiff.generation import Model, conditioned_denoiser, generate
from patchdiff.patching import coordinate_grid
from patchdiff.sampling import SAMPLERS


def random_model(size: int = 16, **network) -> Model:
    """An untrained tiny DDPM++ with every weight random (an untrained EDM network outputs zeros)."""
    cfg = tiny_config("d", "o", image_size=(size, size))
    cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, resolution=size, **network))
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, pretrained=False)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.normal_(0, 0.2)
    return Model(denoiser.eval().requires_grad_(False), cfg, torch.device("cpu"))


def test_region_coordinates_are_the_slice_of_the_frame():
    grid = coordinate_grid(16, 20)
    canvas = region_canvas((16, 20), x0=4, y0=8, height=8, width=12)
    assert torch.equal(canvas_coords(canvas), grid[:, 8:16, 4:16])
    with pytest.raises(ValueError, match="--region 12,8,8,12"):
        region_canvas((16, 20), x0=12, y0=8, height=8, width=12)


def test_a_larger_canvas_keeps_the_frame_centred_at_the_same_pitch():
    canvas = centred_canvas((16, 16), 16, 32)
    assert canvas.offset == (0, -8)
    coords = canvas_coords(canvas)
    assert torch.allclose(coords[:, :, 8:24], coordinate_grid(16, 16))  # the frame in the middle
    pitch = 2 / 15
    assert torch.allclose(coords[0, 0], torch.arange(-8, 24) * pitch - 1)  # x runs past [-1, 1]
    assert coords[0].min() < -1 and coords[0].max() > 1
    with pytest.raises(ValueError, match="--canvas 8,32 is smaller"):
        centred_canvas((16, 16), 8, 32)


def test_tiles_cover_the_canvas_inside_it():
    assert tile_starts(32, 16, 8) == [0, 8, 16]
    assert tile_starts(30, 16, 8) == [0, 8, 14]  # the last window flush with the end
    assert tile_starts(16, 16, 8) == [0]
    canvas = centred_canvas((16, 16), 16, 40, tile=True)
    windows = tile_windows(canvas)
    assert windows == [(0, 0), (0, 8), (0, 16), (0, 24)]
    covered = torch.zeros(16, 40)
    for t, l in windows:
        covered[t : t + 16, l : l + 16] += 1
    assert covered.min() >= 1


def test_tiled_mean_of_a_pixelwise_denoiser_is_the_denoiser_on_the_canvas():
    """A denoiser that acts pixel by pixel gives every window the same estimate for a shared pixel, so
    the tiled mean with canvas coordinates equals one call on the whole canvas."""

    def at(coords):
        return lambda x, sigma: x * sigma + coords[0] - 2 * coords[1]

    canvas = centred_canvas((8, 8), 8, 24, tile=True, stride=3, tile_coords="canvas")
    x = torch.randn(2, 3, 8, 24)
    tiled = canvas_denoiser(canvas, at)(x, torch.tensor(0.7))
    whole = at(canvas_coords(canvas))(x, torch.tensor(0.7))
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_tiled_and_canvas_sampling_equal_the_plain_one_on_the_frame():
    model = random_model()
    x = torch.randn(2, 3, 16, 16)
    plain = conditioned_denoiser(model, None, 1.0)(x, torch.tensor(1.3))
    for canvas in (
        centred_canvas((16, 16), 16, 16, tile=True),
        dataclasses.replace(frame_canvas((16, 16)), tile=True),
    ):
        D = canvas_denoiser(canvas, lambda c: conditioned_denoiser(model, None, 1.0, c))
        assert torch.allclose(D(x, torch.tensor(1.3)), plain, atol=1e-6)
    reference = generate(model, [0, 1], num_steps=3)
    tiled = generate(model, [0, 1], num_steps=3, canvas=centred_canvas((16, 16), 16, 16, tile=True))
    assert (reference.int() - tiled.int()).abs().max() <= 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_makes_regions_and_wide_canvases(sampler):
    model = random_model()
    region = generate(model, [0], num_steps=2, sampler=sampler, canvas=region_canvas((16, 16), 4, 8, 8, 12))
    assert region.shape == (1, 3, 8, 12)
    for tile in (False, True):
        wide = generate(
            model, [0], num_steps=2, sampler=sampler, canvas=centred_canvas((16, 16), 16, 32, tile=tile)
        )
        assert wide.shape == (1, 3, 16, 32)


def test_a_canvas_the_network_cannot_take_is_one_clear_error():
    model = random_model()  # two levels: sides must be even
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(model, [0], num_steps=2, canvas=region_canvas((16, 16), 0, 0, 7, 8))
