import math

import pytest
import torch

from patchdiff import coordinate_grid, random_patches
from patchdiff.config import PatchConfig
from patchdiff.patching import crop_at, crop_coords, resolve_schedule, shared_uniform


def test_coordinate_grid_closed_form():
    H, W = 5, 7
    g = coordinate_grid(H, W)
    assert g.shape == (2, H, W)
    for row in range(H):
        for col in range(W):
            assert g[0, row, col].item() == pytest.approx(2 * col / (W - 1) - 1)
            assert g[1, row, col].item() == pytest.approx(2 * row / (H - 1) - 1)
    assert g[:, 0, 0].tolist() == [-1.0, -1.0] and g[:, -1, -1].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("H,W,P", [(16, 16, 4), (16, 16, 16), (12, 20, 8)])
def test_crop_pixels_and_coords_match_the_full_image(H, W, P):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, H, W, generator=gen)
    patches, coords = random_patches(images, P, generator=gen)
    assert patches.shape == (6, 3, P, P) and coords.shape == (6, 2, P, P)
    grid = coordinate_grid(H, W)
    for n in range(6):
        # Recover each crop pixel's place from its coordinates; the image there must be the pixel.
        col = torch.round((coords[n, 0] + 1) * (W - 1) / 2).long()
        row = torch.round((coords[n, 1] + 1) * (H - 1) / 2).long()
        assert torch.equal(patches[n], images[n][:, row, col])
        top, left = row[0, 0].item(), col[0, 0].item()
        assert torch.allclose(coords[n], grid[:, top : top + P, left : left + P])
        assert torch.equal(patches[n], images[n, :, top : top + P, left : left + P])


def test_every_offset_is_reachable_and_uniform():
    H = W = 8
    P = 3
    images = torch.arange(H * W, dtype=torch.float32).reshape(1, 1, H, W).expand(4000, 1, H, W)
    patches, _ = random_patches(images, P, generator=torch.Generator().manual_seed(1))
    corner = patches[:, 0, 0, 0].long()
    tops, lefts = corner // W, corner % W
    counts = torch.zeros(H - P + 1, W - P + 1)
    counts.index_put_((tops, lefts), torch.ones(len(tops)), accumulate=True)
    assert (counts > 0).all()  # all 36 offsets, including 0 and R-P
    expected = 4000 / counts.numel()
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


def test_crop_at_handles_explicit_offsets_and_rejects_oversize():
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    patches, _coords = crop_at(images, torch.tensor([0, 2]), torch.tensor([1, 0]), (2, 2))
    assert torch.equal(patches[1, 0], images[1, 0, 2:4, 0:2])
    with pytest.raises(ValueError, match="does not fit"):
        random_patches(images, 5)


@pytest.mark.parametrize("H,W,h,w", [(16, 16, 4, 4), (12, 20, 8, 8), (12, 20, 12, 20), (1, 6, 1, 3)])
def test_crop_coords_are_the_full_grid_at_the_offsets(H, W, h, w):
    """The coordinates built from offsets alone (as training builds them on the device) are the full grid's
    values at the crop's pixels, and are what crop_at returns with the crop."""
    gen = torch.Generator().manual_seed(2)
    top = torch.randint(0, H - h + 1, (5,), generator=gen)
    left = torch.randint(0, W - w + 1, (5,), generator=gen)
    coords = crop_coords(top, left, (h, w), (H, W))
    assert coords.shape == (5, 2, h, w) and coords.dtype == torch.float32
    grid = coordinate_grid(H, W)
    for n in range(5):
        t, l = top[n].item(), left[n].item()
        assert torch.equal(coords[n], grid[:, t : t + h, l : l + w])
    _, from_crop_at = crop_at(torch.zeros(5, 1, H, W), top, left, (h, w))
    assert torch.equal(from_crop_at, coords)


def test_default_stochastic_schedule_sizes_and_multipliers():
    s = resolve_schedule(PatchConfig(schedule="stochastic"), (64, 64), min_crop=8)
    assert s.sizes == (16, 32, 64)
    assert s.probs == pytest.approx((0.2, 0.3, 0.5))
    assert s.batch_mult == (4.0, 2.0, 1.0)
    assert s.expected_images_per_round(8) == pytest.approx(8 * (0.2 * 4 + 0.3 * 2 + 0.5))
    # R=32 works too (the published lookup table fails there): sizes 8, 16, 32.
    s32 = resolve_schedule(PatchConfig(schedule="stochastic"), (32, 32), min_crop=4)
    assert s32.sizes == (8, 16, 32) and s32.batch_mult == (4.0, 2.0, 1.0)
    latent = resolve_schedule(PatchConfig(schedule="stochastic", latent=True, real_p=0.3), (32, 32))
    assert latent.sizes == (16, 32) and latent.probs == pytest.approx((0.7, 0.3))


def test_rectangle_schedule_square_crops_then_the_whole_frame():
    # H x W = 16 x 24: square crops of side R/4, R/2 with R = min(H, W) = 16, then the whole 16 x 24 frame.
    s = resolve_schedule(PatchConfig(schedule="stochastic"), (16, 24), min_crop=2)
    assert s.sizes == (4, 8, 16)
    assert [s.crop_shape(i) for i in range(3)] == [(4, 4), (8, 8), (16, 24)]
    # Images per base image: sqrt(frame pixels / crop pixels), so the whole frame takes one.
    assert s.batch_mult == pytest.approx((math.sqrt(384 / 16), math.sqrt(384 / 64), 1.0))
    assert [s.images_per_round(8, i) for i in range(3)] == [39, 20, 8]
    # A square frame keeps the paper's R/P exactly.
    assert resolve_schedule(PatchConfig(), (48, 48), min_crop=4).batch_mult == (4.0, 2.0, 1.0)


def test_schedule_frequencies_match_probabilities():
    s = resolve_schedule(PatchConfig(schedule="stochastic", real_p=0.5), (64, 64))
    n = 20000
    counts = [0, 0, 0]
    for step in range(n):
        counts[s.size_index(seed=3, step=step, progress=0.0)] += 1
    for c, p in zip(counts, s.probs, strict=True):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_sizes_depend_on_the_seed_and_step():
    # That two processes draw the same size at every step is checked with two real processes in
    # tests/training/test_training_distributed.py (both ranks log their per-step crop sizes).
    s = resolve_schedule(PatchConfig(schedule="stochastic"), (64, 64))
    seed7 = [s.size_index(seed=7, step=i, progress=0) for i in range(500)]
    seed8 = [s.size_index(seed=8, step=i, progress=0) for i in range(500)]
    assert seed7 != seed8 and len(set(seed7)) == 3
    assert shared_uniform(1, 2) != shared_uniform(2, 1)


def test_progressive_and_full_schedules():
    s = resolve_schedule(PatchConfig(schedule="progressive"), (64, 64))
    assert [s.sizes[s.size_index(0, 0, p)] for p in (0.0, 0.19, 0.21, 0.49, 0.51, 1.0)] == [
        16,
        16,
        32,
        32,
        64,
        64,
    ]
    assert s.expected_images_per_round(4, progress=0.1) == 16
    full = resolve_schedule(PatchConfig(schedule="full"), (64, 64))
    assert full.sizes == (64,) and full.size_index(0, 5, 0.3) == 0
    assert full.crop_shape(0) == (64, 64)
    wide = resolve_schedule(PatchConfig(schedule="full"), (32, 64))
    assert wide.crop_shape(0) == (32, 64)


def test_override_multipliers_and_bad_configs():
    s = resolve_schedule(PatchConfig(sizes=(8, 16), probs=(0.5, 0.5), batch_mult=(1.0, 1.0)), (16, 16))
    assert s.images_per_round(3, 0) == 3
    odd = resolve_schedule(PatchConfig(sizes=(12, 48), probs=(0.5, 0.5)), (48, 48), min_crop=4)
    assert odd.batch_mult == (4.0, 1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        resolve_schedule(PatchConfig(sizes=(12, 64), probs=(0.5, 0.5)), (64, 64), min_crop=8)
    with pytest.raises(ValueError, match="sum to 1"):
        resolve_schedule(PatchConfig(sizes=(16, 64), probs=(0.5, 0.6)), (64, 64))
    with pytest.raises(ValueError, match="real-p"):
        resolve_schedule(PatchConfig(real_p=1.5), (64, 64))


def test_noise_bands_tile_the_quantiles_from_small_to_full_crops():
    s = resolve_schedule(PatchConfig(schedule="stochastic", noise_bands=True), (32, 32))
    bands = [s.noise_band(i) for i in range(len(s.sizes))]
    assert s.sizes == (8, 16, 32)
    assert bands[0][0] == 0.0 and math.isclose(bands[-1][1], 1.0)
    for (lo, hi), (next_lo, _), p in zip(bands, [*bands[1:], (1.0, 1.0)], s.probs, strict=True):
        assert math.isclose(hi - lo, p) and math.isclose(hi, next_lo)
    with pytest.raises(ValueError, match="--noise-bands needs --patch-schedule stochastic"):
        resolve_schedule(PatchConfig(schedule="progressive", noise_bands=True), (32, 32))


def test_coordinate_features_closed_form():
    from patchdiff.patching import coordinate_features

    coords = coordinate_grid(3, 5)[None]
    assert torch.equal(coordinate_features(coords, 0), coords)
    f = coordinate_features(coords, 3)
    assert f.shape == (1, 2 + 4 * 3, 3, 5)
    assert torch.equal(f[:, :2], coords)
    for k in range(3):
        angle = math.pi * 2**k * coords
        assert torch.allclose(f[:, 2 + 4 * k : 4 + 4 * k], angle.sin(), atol=1e-6)
        assert torch.allclose(f[:, 4 + 4 * k : 6 + 4 * k], angle.cos(), atol=1e-6)
    # A pixel's features are the same in every crop: they depend on its coordinates alone.
    crop = crop_coords(torch.tensor([1]), torch.tensor([2]), (2, 3), (3, 5))
    assert torch.equal(coordinate_features(crop, 3), f[:, :, 1:3, 2:5])
    with pytest.raises(ValueError, match="--coord-embed -1"):
        coordinate_features(coords, -1)
