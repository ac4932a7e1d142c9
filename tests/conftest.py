"""Shared fixtures: a tiny data set and a tiny trained run, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchdiff.config import PatchConfig, TrainConfig, network_preset
from patchdiff.demo import make_landscapes, write_images

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class TinyNvidiaDetector(torch.nn.Module):
    """A stand-in FID detector with NVIDIA's calling convention (uint8/float 0..255 NCHW,
    `return_features=True`): 16 features from a fixed random conv."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.register_buffer("weight", torch.randn(dim, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32) / 127.5 - 1.0
        features = torch.relu(torch.nn.functional.conv2d(x, self.weight, padding=1)).mean(dim=(2, 3))
        return features if return_features else features.sum(dim=1, keepdim=True)


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> str:
    """The stand-in detector saved as TorchScript, for --detector."""
    path = tmp_path_factory.mktemp("detector") / "tiny.pt"
    torch.jit.script(TinyNvidiaDetector()).save(str(path))
    return str(path)


# `patchdiff train` flags for the same tiny network, for tests that go through the command line.
TINY_TRAIN_FLAGS = [
    "--cbase",
    "8",
    "--cres",
    "1,2",
    "--blocks",
    "1",
    "--attn",
    "8",
    "--batch",
    "8",
    "--lr-rampup",
    "0.05",
    "--ema",
    "0.05",
    "--workers",
    "0",
]


def tiny_config(data: str, outdir: str, **overrides) -> TrainConfig:
    """A ~30k-parameter DDPM++ on 16x16 images with crops 4, 8, 16."""
    net = network_preset(
        "ddpmpp", 16, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0
    )
    base = dict(
        data=data,
        outdir=outdir,
        network=net,
        patch=PatchConfig(schedule="stochastic"),
        duration_kimg=0.2,
        batch=8,
        lr=2e-3,
        lr_rampup_kimg=0.05,
        ema_halflife_kimg=0.05,
        tick_kimg=0.1,
        snap_ticks=1,
        workers=0,
        seed=0,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def landscapes(tmp_path_factory) -> Path:
    """A folder of 64 16x16 RGB toy landscapes."""
    return write_images(make_landscapes(64, 16, seed=1), tmp_path_factory.mktemp("landscapes"))


@pytest.fixture(scope="session")
def tiny_run(landscapes, tmp_path_factory) -> Path:
    from patchdiff.training.loop import train

    outdir = tmp_path_factory.mktemp("runs")
    return train(tiny_config(str(landscapes), str(outdir)), progress=False, grid=4)
