"""The crop-schedule levers: a fixed-length crop phase, --min-crop, the learning-rate cool-down and
warm-up/EMA counted in steps (training/stream.py, patching.py, flops.py)."""

import json
import math

import pytest

from patchdiff.config import PatchConfig
from patchdiff.flops import fixed_kimg_for_budget, schedule_flops_per_image
from patchdiff.patching import StepPlan, default_sizes, resolve_schedule
from patchdiff.training import loop
from patchdiff.training.optim import lr_factor
from patchdiff.training.stream import clock


def fixed_plan(duration_nimg: float, crop_kimg: float = 2.0, batch: int = 8) -> StepPlan:
    schedule = resolve_schedule(PatchConfig(schedule="fixed", crop_kimg=crop_kimg), (64, 64))
    return StepPlan(schedule, 0, schedule.images_per_step(batch), duration_nimg)


def test_the_fixed_crop_phase_does_not_grow_with_the_run():
    short, long = fixed_plan(10_000), fixed_plan(40_000)
    assert short.phase_bounds[:-1] == long.phase_bounds[:-1]
    crop_end = short.phase_bounds[-2]
    # The crop phases (R/4 then R/2, shares 2:3 of the crop phase) hold crop_kimg images, whole images follow.
    assert short.nimg(short.phase_bounds[0]) == pytest.approx(0.4 * 2000, abs=32)
    assert short.nimg(crop_end) == pytest.approx(2000, abs=32)
    assert short.size_index(crop_end - 1) == 1 and short.size_index(crop_end) == 2
    assert short.nimg(short.total_steps) >= 10_000 > short.nimg(short.total_steps - 1)
    assert long.total_steps - short.total_steps == 30_000 // 8  # only whole-image steps were added
    # A run shorter than the crop phase is all crops.
    tiny = fixed_plan(1000)
    assert tiny.size_index(tiny.total_steps - 1) == 1


def test_fixed_schedule_flags_are_checked():
    with pytest.raises(ValueError, match="fixed needs --crop-kimg"):
        resolve_schedule(PatchConfig(schedule="fixed"), (32, 32))
    with pytest.raises(ValueError, match="--crop-kimg needs --patch-schedule fixed"):
        resolve_schedule(PatchConfig(schedule="progressive", crop_kimg=3), (32, 32))


def test_min_crop_leaves_out_the_smallest_crops_only_where_they_are_small():
    assert default_sizes(32, 0.5, False, min_crop=16) == ((16, 32), (0.5, 0.5))
    assert default_sizes(64, 0.5, False, min_crop=16) == ((16, 32, 64), (0.2, 0.3, 0.5))
    assert default_sizes(32, 0.5, False) == ((8, 16, 32), (0.2, 0.3, 0.5))
    assert resolve_schedule(PatchConfig(min_crop=16), (32, 32)).sizes == (16, 32)


def test_lr_factor_warm_up_and_cool_down():
    assert lr_factor(50, 0, 100, 100, 0.0) == 0.5  # half-way through the warm-up
    assert lr_factor(500, 50, 100, 100, 0.2) == 1.0  # before the cool-down
    assert lr_factor(500, 80, 100, 100, 0.2) == 1.0  # its first step
    assert lr_factor(500, 90, 100, 100, 0.2) == pytest.approx(0.5)
    assert lr_factor(500, 90, 100, 100, 0.2, "cosine") == pytest.approx(0.5)
    assert lr_factor(500, 85, 100, 100, 0.2, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.75)))
    assert lr_factor(500, 100, 100, 100, 0.2) == 0.0


def test_steps_clock_counts_batch_images_per_step():
    plan = fixed_plan(10_000)
    assert clock(plan, 3, "steps", 8) == (24.0, 8.0)
    images, step_images = clock(plan, 3, "images", 8)
    assert images == plan.nimg(3) and step_images == plan.nimg(4) - plan.nimg(3)
    assert step_images == 32  # R/4 crops: 4x the images per step


def test_fixed_flops_and_budget_agree():
    schedule = resolve_schedule(PatchConfig(schedule="fixed", crop_kimg=2.0), (64, 64))
    by_size = {16: 1.0, 32: 4.0, 64: 16.0}
    crop = 0.4 * 1.0 + 0.6 * 4.0
    assert schedule_flops_per_image(schedule, by_size, 8.0) == pytest.approx((2 * crop + 6 * 16) / 8)
    assert schedule_flops_per_image(schedule, by_size, 1.0) == pytest.approx(crop)
    for kimg in (1.0, 2.0, 8.0):
        budget = schedule_flops_per_image(schedule, by_size, kimg) * kimg * 1000
        assert fixed_kimg_for_budget(budget, 2.0, crop, 16.0) == pytest.approx(kimg)


def test_a_fixed_run_with_cool_down_and_steps_clock_trains(landscapes, tmp_path):
    from tests.conftest import tiny_config

    patch = PatchConfig(schedule="fixed", crop_kimg=0.05)
    cfg = tiny_config(
        str(landscapes), str(tmp_path), patch=patch, duration_kimg=0.1, lr_cooldown=0.5, ema_unit="steps"
    )
    run = loop.train(cfg, progress=False, grid=0)
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    ticks = [r for r in ticks if r["kind"] == "tick"]
    assert set(ticks[-1]["steps_by_size"]) == {"4", "8", "16"}
    # 8 steps, the last 4 cooling down: the last step (7) runs at (8 - 7) / 4 of the learning rate.
    total = sum(ticks[-1]["steps_by_size"].values())
    assert total == 8 and ticks[-1]["lr"] == pytest.approx(cfg.lr * 0.25)


def test_crop_margin_windows_multipliers_and_errors():
    plain = resolve_schedule(PatchConfig(), (32, 32), min_crop=4)
    margin = resolve_schedule(PatchConfig(margin=4), (32, 32), min_crop=4)
    assert margin.sizes == plain.sizes == (8, 16, 32)
    # The network sees each crop with 4 more pixels on every side, never more than the image.
    assert [margin.crop_shape(i) for i in range(3)] == [(16, 16), (24, 24), (32, 32)]
    assert [plain.crop_shape(i) for i in range(3)] == [(8, 8), (16, 16), (32, 32)]
    # Images per base image follow the windows, so a step holds the same pixels at every size.
    assert margin.batch_mult == pytest.approx((2.0, 32 / 24, 1.0))
    assert resolve_schedule(PatchConfig(margin=12), (32, 32), min_crop=4).crop_shape(1) == (32, 32)
    with pytest.raises(ValueError, match=r"--crop-margin 1: patch size 8 .* 10 pixels, not a multiple of 4"):
        resolve_schedule(PatchConfig(margin=1), (32, 32), min_crop=4)
    with pytest.raises(ValueError, match="--crop-margin -1"):
        resolve_schedule(PatchConfig(margin=-1), (32, 32))


def test_a_run_with_a_crop_margin_scores_only_the_crops(landscapes, tmp_path, monkeypatch):
    """--crop-margin through the CLI's config: the loss gets windows of crop + 2 margin pixels and a mask
    that leaves out the margin inside the image; FLOPs are counted at the windows' size."""
    from tests.conftest import tiny_config

    from patchdiff.loss import edm_loss
    from patchdiff.training.flags import config_from_argv

    seen = []

    def recording_loss(*args, mask=None, **kwargs):
        seen.append((tuple(args[1].shape[-2:]), mask))
        return edm_loss(*args, mask=mask, **kwargs)

    monkeypatch.setattr(loop, "edm_loss", recording_loss)
    patch = PatchConfig(schedule="progressive", margin=2)
    cfg = tiny_config(str(landscapes), str(tmp_path), patch=patch, duration_kimg=0.1)
    run = loop.train(cfg, progress=False, grid=0)
    assert "crop sizes (4, 8, 16) seen in windows (8, 12, 16)" in (run / "log.txt").read_text()
    shapes = {shape for shape, _ in seen}
    assert shapes == {(8, 8), (12, 12), (16, 16)}
    for shape, mask in seen:
        if shape == (16, 16):
            assert mask is None  # whole images: every pixel counts
        else:
            # Between the crop's own pixels (h - 4 per axis, more on the image's border) and the window.
            share = mask.mean().item()
            assert ((shape[0] - 4) / shape[0]) ** 2 <= share < 1
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert json.loads((run / "config.json").read_text())["patch"]["margin"] == 2
    assert [r for r in ticks if r["kind"] == "tick"]
    # The flag reaches the config.
    args = ["--data", str(landscapes), "--outdir", str(tmp_path), "--crop-margin", "3"]
    assert config_from_argv(args, resolve=False)[0].patch.margin == 3
