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
