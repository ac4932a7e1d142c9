import dataclasses
import json

import pytest
import torch
from tests.conftest import tiny_config

from patchdiff.denoisers import build_denoiser
from patchdiff.patching import resolve_schedule
from patchdiff.training.mfu import achieved, flops_by_crop, peak_for_name, peak_tflops


def test_flops_by_crop_grow_with_the_crop_and_leave_the_training_state_alone():
    cfg = tiny_config("unused", "unused")
    cfg = dataclasses.replace(cfg, image_size=(16, 16))
    schedule = resolve_schedule(cfg.patch, (16, 16), cfg.network.min_crop)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).train()
    rng = torch.get_rng_state()
    by_size = flops_by_crop(denoiser, schedule, cfg.network.img_channels)
    assert set(by_size) == set(schedule.sizes) == {4, 8, 16}
    # A U-Net's cost is nearly proportional to pixels: 4x the pixels, between 3x and 5x the FLOPs.
    assert 0 < by_size[4] < by_size[8] < by_size[16]
    assert 3 < by_size[16] / by_size[8] < 5
    assert torch.equal(torch.get_rng_state(), rng)  # the run's RNG stream is untouched
    assert all(p.grad is None for p in denoiser.parameters())
    assert denoiser.training


def test_achieved_rate_and_mfu():
    assert achieved(2e12, 4.0, torch.device("cpu"), 1) == {"tflops": pytest.approx(0.5)}
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("Some Future GPU") is None


def test_ticks_log_tflops(tiny_run):
    ticks = [json.loads(r) for r in (tiny_run / "stats.jsonl").read_text().splitlines()]
    ticks = [r for r in ticks if r["kind"] == "tick"]
    assert ticks and all(r["tflops"] > 0 and "mfu" not in r for r in ticks)
    assert "TFLOP/s" in (tiny_run / "log.txt").read_text()
