import json

import pytest
import torch
from tests.conftest import tiny_config

from patchdiff.config import PatchConfig
from patchdiff.training.flags import default_precision
from patchdiff.training.loop import train


def test_default_precision_is_bf16_on_cuda_and_fp32_on_a_cpu():
    assert default_precision("cpu") == "fp32"
    assert default_precision("cuda:1") == "bf16"
    assert default_precision(None) == ("bf16" if torch.cuda.is_available() else "fp32")


@pytest.mark.slow
def test_compiled_training_logs_the_compile_time_and_matches_eager(landscapes, tmp_path):
    """--compile: one static graph for the crop size, its compile time logged; the same losses as eager
    (up to the reordered float sums of fused kernels)."""
    losses = {}
    for compile in (False, True):
        cfg = tiny_config(
            str(landscapes), str(tmp_path / str(compile)), patch=PatchConfig(schedule="full"), duration_kimg=0.05,
            tick_kimg=0.016,
        )  # fmt: skip
        run = train(cfg, progress=False, grid=0, compile=compile)
        ticks = [json.loads(r) for r in (run / "stats.jsonl").read_text().splitlines()]
        losses[compile] = [r["loss"] for r in ticks if r["kind"] == "tick"]
        if compile:
            assert all(r["compile_s"]["16"] > 0 for r in ticks if r["kind"] == "tick")
            assert "compiled the step for crop size 16" in (run / "log.txt").read_text()
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the sync check cannot run on a CPU)")
def test_no_host_device_sync_inside_the_step_on_cuda(landscapes, tmp_path, monkeypatch):
    from patchdiff.training import run as run_module

    original, checked = run_module.Run.step, []

    def strict_step(self):
        if self.at_step >= 3:  # after one step of each crop size (lazy CUDA set-up may sync)
            torch.cuda.set_sync_debug_mode("error")
            checked.append(self.at_step)
        try:
            original(self)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(run_module.Run, "step", strict_step)
    cfg = tiny_config(str(landscapes), str(tmp_path), precision="bf16", tick_kimg=1.0, snap_ticks=0)
    train(cfg, progress=False, grid=0, device="cuda")
    assert len(checked) >= 5


def test_compiled_step_with_gradient_accumulation_on_one_process(landscapes):
    """--compile with one process and several rounds: the compiled wrapper has no DDP no_sync to call."""
    from tests.training.test_training_loop import cut_round

    from patchdiff.data import ImageDataset
    from patchdiff.denoisers import build_denoiser
    from patchdiff.training import loop
    from patchdiff.training.setup import resolve

    torch.manual_seed(0)
    dataset = ImageDataset(landscapes)
    cfg = resolve(tiny_config(str(landscapes), "unused", patch=PatchConfig(schedule="full")), dataset)
    denoiser = build_denoiser(cfg)
    compiled = torch.compile(denoiser, backend="eager")  # dynamo's wrapper, without inductor's kernels
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.stack([dataset[i][0] for i in range(8)])
    labels = torch.zeros(8, dtype=torch.long)
    rounds = [cut_round(images[:4], labels[:4], (16, 16)), cut_round(images[4:], labels[4:], (16, 16))]
    loss, n = loop.train_step(
        compiled, denoiser, optimizer, scaler, rounds, (16, 16), cfg, torch.device("cpu"), 2
    )
    assert n == 4 and torch.isfinite(loss)
    assert all(p.grad is not None for p in denoiser.parameters() if p.requires_grad)
