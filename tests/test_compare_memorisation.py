import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image
from tests.conftest import tiny_config
from tests.test_compare import write_study

from patchdiff.compare import load_study
from patchdiff.compare.memorisation import memorisation_along_training, nearest_grid, training_images
from patchdiff.compare.results import write_results
from patchdiff.data import ImageDataset
from patchdiff.data.subset import subset_indices
from patchdiff.training import loop


def test_nearest_grid_puts_each_sample_before_its_nearest_training_images():
    train = torch.linspace(-1, 1, 5)[:, None, None, None].expand(5, 1, 2, 2).contiguous()
    samples = torch.tensor([0, 250], dtype=torch.uint8)[:, None, None, None].expand(2, 1, 2, 2)
    grid = nearest_grid(samples, train, k=2)
    assert grid.shape == (6, 1, 2, 2)
    assert grid[:, 0, 0, 0].tolist() == [0, 0, 64, 250, 255, 191]  # sample, nearest, second nearest


@pytest.mark.slow
def test_memorisation_along_training_on_a_subset(landscapes, tmp_path):
    cfg = tiny_config(str(landscapes), str(tmp_path / "run"), duration_kimg=0.06, tick_kimg=0.03)
    cfg = replace(cfg, subset=6, subset_seed=1, augment=0.2)
    run_dir = loop.train(cfg, progress=False, grid=0)
    train = training_images(cfg)
    want = ImageDataset(landscapes)[int(subset_indices(64, 6, 1)[2])][0].float() / 127.5 - 1
    assert train.shape == (6, 3, 16, 16) and torch.equal(train[2], want)

    result = dict(run_dir=str(run_dir), kimg=0.06, flops=1.0, flops_per_image=1.0, wall_s=1.0, flags=[])
    out = tmp_path / "out"
    (out / "runs" / "a").mkdir(parents=True)
    grid = out / "nearest-a.png"
    records = memorisation_along_training(result, 4, out / "runs" / "a", grid, grid_rows=3, grid_k=2)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records) and len(records) >= 2
    for r in records:
        assert 0.0 <= r["memorised"] <= 1.0 and r["num"] == 4 and r["median_ratio"] <= 1.0
        assert r["epochs"] == pytest.approx(r["kimg"] * 1000 / 6)
    with Image.open(grid) as image:
        assert image.size == (3 * 16, 3 * 16)
    cached = (out / "runs" / "a" / "memorisation.json").stat().st_mtime_ns
    assert memorisation_along_training(result, 4, out / "runs" / "a", grid, 3, 2) == records
    assert (out / "runs" / "a" / "memorisation.json").stat().st_mtime_ns == cached  # nothing recomputed

    paths = write_results({"a": dict(result, memorisation=records, nearest_grid=grid.name)}, out, 1.0)
    text = paths["table"].read_text()
    assert "Memorisation at the last snapshot" in text and "| a |" in text and "nearest-a.png" in text
    assert paths["memorisation"].stat().st_size > 1000


def test_study_takes_subsets_augmentation_and_memorisation(tmp_path, landscapes, tiny_detector):
    configs = [
        {"name": "whole", "flags": ["--patch-schedule", "full", "--subset", "8", "--subset-seed", "0"]},
        {"name": "patch-aug", "flags": ["--subset", "8", "--subset-seed", "0", "--augment", "0.2"]},
    ]
    study = write_study(
        tmp_path / "s.json", landscapes, tiny_detector, configs=configs, memorisation=16, budget_of="whole"
    )
    assert load_study(study).memorisation == 16
    cmd = [
        sys.executable,
        "-m",
        "patchdiff",
        "compare",
        str(study),
        "--outdir",
        str(tmp_path / "o"),
        "--plan-only",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["patch-aug"]["kimg"] > plan["whole"]["kimg"] > 0
    bad = write_study(tmp_path / "b.json", landscapes, tiny_detector, memorisation=-1)
    with pytest.raises(ValueError, match="memorisation -1 must be >= 0"):
        load_study(bad)
