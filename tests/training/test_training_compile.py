import json

import pytest
import torch
from tests.conftest import tiny_config

from patchdiff.cli.train import default_precision
from patchdiff.config import PatchConfig
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
