import math
import re
from pathlib import Path

import pytest
import torch

from patchdiff import StepPlan, coordinate_grid
from patchdiff.config import PatchConfig
from patchdiff.patching import (
    crop_at,
    crop_coords,
    crop_phase_mean,
    expected_images,
    loss_mask,
    mean_per_image,
    resolve_schedule,
    shared_uniform,
)

README = Path(__file__).resolve().parents[1] / "README.md"


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
    top = torch.randint(0, H - P + 1, (6,), generator=gen)
    left = torch.randint(0, W - P + 1, (6,), generator=gen)
    patches, coords = crop_at(images, top, left, (P, P))
    assert patches.shape == (6, 3, P, P) and coords.shape == (6, 2, P, P)
    grid = coordinate_grid(H, W)
    for n in range(6):
        # Recover each crop pixel's place from its coordinates; the image there must be the pixel.
        col = torch.round((coords[n, 0] + 1) * (W - 1) / 2).long()
        row = torch.round((coords[n, 1] + 1) * (H - 1) / 2).long()
        assert torch.equal(patches[n], images[n][:, row, col])
        t, l = row[0, 0].item(), col[0, 0].item()
        assert (t, l) == (top[n].item(), left[n].item())
        assert torch.allclose(coords[n], grid[:, t : t + P, l : l + P])
        assert torch.equal(patches[n], images[n, :, t : t + P, l : l + P])


def test_crop_at_handles_explicit_offsets():
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    patches, _coords = crop_at(images, torch.tensor([0, 2]), torch.tensor([1, 0]), (2, 2))
    assert torch.equal(patches[1, 0], images[1, 0, 2:4, 0:2])


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
    assert s.images_per_step(8) == (32, 16, 8) and s.images_per_step(4, rounds=2, world=3) == (96, 48, 24)
    assert expected_images(s, s.images_per_step(8)) == pytest.approx(8 * (0.2 * 4 + 0.3 * 2 + 0.5))
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
        counts[s.draw(seed=3, step=step)] += 1
    for c, p in zip(counts, s.probs, strict=True):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_sizes_depend_on_the_seed_and_step():
    # That two processes draw the same size at every step is checked with two real processes in
    # tests/training/test_training_distributed.py (both ranks log their per-step crop sizes).
    s = resolve_schedule(PatchConfig(schedule="stochastic"), (64, 64))
    seed7 = [s.draw(seed=7, step=i) for i in range(500)]
    seed8 = [s.draw(seed=8, step=i) for i in range(500)]
    assert seed7 != seed8 and len(set(seed7)) == 3
    assert shared_uniform(1, 2) != shared_uniform(2, 1)


def test_full_schedule_and_no_draw_for_phased_ones():
    full = resolve_schedule(PatchConfig(schedule="full"), (64, 64))
    assert full.sizes == (64,) and full.draw(0, 5) == 0
    assert full.crop_shape(0) == (64, 64)
    assert expected_images(full, full.images_per_step(8)) == 8.0
    wide = resolve_schedule(PatchConfig(schedule="full"), (32, 64))
    assert wide.crop_shape(0) == (32, 64)
    progressive = resolve_schedule(PatchConfig(schedule="progressive"), (64, 64))
    with pytest.raises(ValueError, match="come in phases"):
        progressive.draw(0, 0)


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


# --------------------------------------------------------------------------- the plan of a run


def plan_for(kind: str, duration: float = 10_000, batch: int = 8, size=(64, 64), seed: int = 0) -> StepPlan:
    schedule = resolve_schedule(PatchConfig(schedule=kind), size)
    return StepPlan(schedule, seed, schedule.images_per_step(batch), duration)


def test_stochastic_plan_counts_expected_images():
    plan = plan_for("stochastic")
    assert plan.images_per_step == (32, 16, 8)
    assert plan.expected_images == pytest.approx(0.2 * 32 + 0.3 * 16 + 0.5 * 8)
    assert plan.total_steps == -(-10_000 // plan.expected_images)
    assert plan.nimg(10) == pytest.approx(10 * plan.expected_images)


def test_progressive_plan_phases_cover_their_share_of_images():
    plan = plan_for("progressive")
    b = plan.phase_bounds
    assert [plan.size_index(s) for s in (0, b[0] - 1, b[0], b[1] - 1, b[1], b[2] - 1)] == [0, 0, 1, 1, 2, 2]
    assert plan.nimg(b[0]) == pytest.approx(0.2 * 10_000, abs=32)
    assert plan.nimg(b[1]) == pytest.approx(0.5 * 10_000, abs=48)
    assert plan.nimg(plan.total_steps) >= 10_000


def test_finish_full_trains_the_last_share_of_images_on_whole_images():
    schedule = resolve_schedule(PatchConfig(schedule="stochastic", finish_full=0.3), (64, 64))
    plan = StepPlan(schedule, 0, schedule.images_per_step(8), 10_000)
    b = plan.finish_step
    assert b == -(-7_000 // plan.expected_images)  # 70% of the images under the stochastic schedule
    assert {plan.size_index(s) for s in range(b)} == {0, 1, 2}
    assert {plan.size_index(s) for s in range(b, plan.total_steps)} == {2}
    assert plan.nimg(b + 5) == pytest.approx(b * plan.expected_images + 5 * 8)
    assert plan.nimg(plan.total_steps) >= 10_000 > plan.nimg(plan.total_steps - 1)
    # The first part draws exactly the sizes the plain stochastic plan draws.
    plain = plan_for("stochastic")
    assert [plan.size_index(s) for s in range(b)] == [plain.size_index(s) for s in range(b)]
    assert plain.finish_step is None
    with pytest.raises(ValueError, match="--finish-full needs --patch-schedule stochastic"):
        resolve_schedule(PatchConfig(schedule="progressive", finish_full=0.3), (64, 64))
    with pytest.raises(ValueError, match=r"--finish-full 1.0 must lie in \[0, 1\)"):
        resolve_schedule(PatchConfig(schedule="stochastic", finish_full=1.0), (64, 64))


def test_full_plan():
    plan = plan_for("full")
    assert plan.images_per_step == (8,) and plan.total_steps == 1250 and plan.size_index(3) == 0


def test_the_stochastic_plan_draws_the_schedules_sizes():
    plan = plan_for("stochastic", seed=4)
    assert [plan.size_index(k) for k in range(300)] == [plan.schedule.draw(4, k) for k in range(300)]


def test_means_per_image_over_the_plan():
    v = (1.0, 4.0, 16.0)
    stochastic = resolve_schedule(PatchConfig(schedule="stochastic", real_p=0.5), (16, 16))
    # p = (0.2, 0.3, 0.5), images per base image n = (4, 2, 1): sum p n v / sum p n
    assert mean_per_image(stochastic, v) == pytest.approx((0.8 * 1 + 0.6 * 4 + 0.5 * 16) / 1.9)
    finish = resolve_schedule(PatchConfig(schedule="stochastic", finish_full=0.25), (16, 16))
    assert mean_per_image(finish, v) == pytest.approx(0.75 * mean_per_image(stochastic, v) + 0.25 * 16)
    progressive = resolve_schedule(PatchConfig(schedule="progressive", real_p=0.5), (16, 16))
    assert mean_per_image(progressive, v) == pytest.approx(0.2 * 1 + 0.3 * 4 + 0.5 * 16)
    assert mean_per_image(resolve_schedule(PatchConfig(schedule="full"), (16, 16)), (16.0,)) == 16.0
    fixed = resolve_schedule(PatchConfig(schedule="fixed", crop_kimg=2.0), (16, 16))
    crop = (0.2 * 1 + 0.3 * 4) / 0.5
    assert crop_phase_mean(fixed, v) == pytest.approx(crop)
    assert mean_per_image(fixed, v, 8.0) == pytest.approx(0.25 * crop + 0.75 * 16)
    assert mean_per_image(fixed, v, 1.0) == pytest.approx(crop)  # a run shorter than the crop phase
    with pytest.raises(ValueError, match="run's length"):
        mean_per_image(fixed, v)


def test_the_readme_crop_plan_snippet_runs():
    """The README's crop-plan example is what training does, and runs as written."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    snippet = next(b for b in blocks if "StepPlan" in b)
    scope: dict = {}
    exec(compile(snippet, str(README), "exec"), scope)
    plan, step = scope["plan"], scope["step"]
    assert (
        scope["patches"].shape[-2:]
        == scope["coords"].shape[-2:]
        == plan.schedule.crop_shape(plan.size_index(step))
    )
    assert len(scope["patches"]) == plan.images_per_step[plan.size_index(step)]


def test_loss_mask_leaves_out_the_margin_inside_the_image():
    # Windows of 8 rows in a 16-row image, margin 2: at the top edge the image's border rows count.
    top = torch.tensor([0, 4, 8])
    left = torch.tensor([4, 0, 8])
    mask = loss_mask(top, left, (8, 8), (16, 16), 2)
    assert mask.shape == (3, 1, 8, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}
    rows = mask[:, 0].amax(dim=2)  # [N, 8]: which rows count
    cols = mask[:, 0].amax(dim=1)
    assert rows[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # top edge: its own border rows count
    assert rows[1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # interior: only the central 4 rows
    assert rows[2].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]  # bottom edge
    assert cols[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0] and cols[1].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert torch.equal(mask[:, 0], rows[:, :, None] * cols[:, None, :])  # the product of the axes
    # Every pixel of the image is scored at some offset; margin 0 scores everything.
    offsets = torch.arange(9)
    covered = torch.zeros(16)
    for t, m in zip(offsets, loss_mask(offsets, offsets, (8, 8), (16, 16), 2)[:, 0].amax(dim=2), strict=True):
        covered[t : t + 8] += m
    assert (covered > 0).all()
    assert loss_mask(top, left, (8, 8), (16, 16), 0).eq(1).all()
