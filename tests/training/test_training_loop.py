import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import TINY_TRAIN_FLAGS, tiny_config

from patchdiff.cli import main
from patchdiff.config import PatchConfig
from patchdiff.data import ImageDataset
from patchdiff.denoisers import build_denoiser
from patchdiff.loss import edm_loss
from patchdiff.patching import crop_at
from patchdiff.training import loop
from patchdiff.training import run as run_module
from patchdiff.training.checkpoint import load_state
from patchdiff.training.run import NonFiniteLossError
from patchdiff.training.setup import resolve
from patchdiff.training.stream import Crop


def cut_round(images, labels, crop, generator=None) -> Crop:
    """A round as the loader delivers it: uint8 crops at uniform offsets, with the offsets."""
    N, _, H, W = images.shape
    top = torch.randint(0, H - crop[0] + 1, (N,), generator=generator)
    left = torch.randint(0, W - crop[1] + 1, (N,), generator=generator)
    return Crop(crop_at(images, top, left, crop)[0], labels, top, left)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_directory_contents(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "log.txt", "stats.jsonl", "state.pt"} <= names
    assert any(n.startswith("snapshot-") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("grid-") and n.endswith(".png") for n in names)
    ticks = [r for r in read_jsonl(tiny_run / "stats.jsonl") if r["kind"] == "tick"]
    last = ticks[-1]
    assert last["kimg"] >= 0.2 and last["step"] == sum(last["steps_by_size"].values())
    assert set(last["crops"]) <= {"4", "8", "16"} and sum(last["crops"].values()) == last["images"]
    # Counted as the paper does: kimg = steps x expected images per step (8 * 1.9 = 15.2).
    assert last["kimg"] == pytest.approx(last["step"] * 15.2 / 1000)
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["image_size"] == [16, 16] and cfg["network"]["coord_channels"] == 2
    # --precision fp32 means fp32 on GPUs too: no TF32 matmuls or convolutions.
    assert cfg["precision"] == "fp32" and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


def test_loss_goes_down_on_a_tiny_data_set(landscapes):
    torch.manual_seed(0)
    dataset = ImageDataset(landscapes)
    cfg = resolve(tiny_config(str(landscapes), "unused", lr=3e-3), dataset)
    denoiser = build_denoiser(cfg)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = torch.stack([dataset[i][0] for i in range(64)])
    labels = torch.zeros(64, dtype=torch.long)
    fixed = data.float() / 127.5 - 1

    def held_out_loss():
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return (
                torch.stack([edm_loss(denoiser, fixed, None, None, cfg.loss, gen) for _ in range(8)])
                .mean()
                .item()
            )

    before = held_out_loss()
    for step in range(120):
        batch = data[torch.randint(64, (16,))]
        crop = (8, 8) if step % 2 else (16, 16)
        rounds_data = [cut_round(batch, labels[:16], crop)]
        loop.train_step(denoiser, denoiser, optimizer, scaler, rounds_data, crop, cfg, torch.device("cpu"), 1)
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)


def test_resume_continues_exactly(landscapes, tmp_path):
    full = loop.train(
        tiny_config(str(landscapes), str(tmp_path / "a"), duration_kimg=0.3), progress=False, grid=0
    )
    part = loop.train(
        tiny_config(str(landscapes), str(tmp_path / "b"), duration_kimg=0.15), progress=False, grid=0
    )
    first = json.loads(load_state(part / "state.pt")["counters"])
    assert 0 < first["step"] < json.loads(load_state(full / "state.pt")["counters"])["step"]
    resumed = loop.train(
        tiny_config(str(landscapes), str(tmp_path / "b"), duration_kimg=0.3),
        resume="auto",
        progress=False,
        grid=0,
    )
    assert resumed == part  # continues in place
    a, b = load_state(full / "state.pt"), load_state(resumed / "state.pt")
    assert json.loads(a["counters"])["step"] == json.loads(b["counters"])["step"]
    ca, cb = json.loads(a["counters"]), json.loads(b["counters"])
    assert {k: ca[k] for k in ("step", "position", "images", "crops", "steps_by_size")} == {
        k: cb[k] for k in ("step", "position", "images", "crops", "steps_by_size")
    }
    for key in ("denoiser", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    ticks = [r for r in read_jsonl(resumed / "stats.jsonl") if r["kind"] == "tick"]
    assert ticks[-1]["step"] == ca["step"] and "resuming" in (resumed / "log.txt").read_text()


def test_non_finite_loss_stops_with_the_last_good_state_intact(landscapes, tmp_path, monkeypatch):
    run = loop.train(tiny_config(str(landscapes), str(tmp_path), duration_kimg=0.1), progress=False, grid=0)
    before = (run / "state.pt").read_bytes()

    def nan_loss(denoiser, y, coords=None, labels=None, cfg=None, generator=None, **_):
        return denoiser(y, torch.ones(y.shape[0]), coords, labels).mean() * float("nan")

    monkeypatch.setattr(loop, "edm_loss", nan_loss)
    cfg = tiny_config(str(landscapes), str(tmp_path), duration_kimg=0.4, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match=f"non-finite.*the last good state is {run / 'state.pt'}"):
        loop.train(cfg, resume="auto", progress=False, grid=0)
    assert (run / "state.pt").read_bytes() == before
    # A run that never wrote a state says so instead of naming a file that does not exist.
    fresh = tiny_config(str(landscapes), str(tmp_path / "fresh"), duration_kimg=0.4, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match="no training state was written yet"):
        loop.train(fresh, progress=False, grid=0)


def test_config_errors_name_the_flag(landscapes, tmp_path):
    with pytest.raises(ValueError, match="--batch 10"):
        loop.train(tiny_config(str(landscapes), str(tmp_path), batch=10, batch_gpu=4), progress=False)
    with pytest.raises(ValueError, match="--cond"):
        loop.train(tiny_config(str(landscapes), str(tmp_path), cond=True), progress=False)
    bad_patch = PatchConfig(sizes=(5, 16), probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="multiple of 2"):
        loop.train(tiny_config(str(landscapes), str(tmp_path), patch=bad_patch), progress=False)
    assert not list(tmp_path.iterdir())  # nothing written for a bad config


def test_gradient_accumulation_matches_one_big_batch(landscapes, monkeypatch):
    """Two rounds of 4 images give the gradient of one round of 8 (with a noise-free loss)."""

    def deterministic_loss(denoiser, y, coords=None, labels=None, cfg=None, **_):
        return ((denoiser(y, torch.ones(y.shape[0]), coords, labels) - y) ** 2).mean()

    monkeypatch.setattr(loop, "edm_loss", deterministic_loss)
    dataset = ImageDataset(landscapes)
    cfg = resolve(tiny_config(str(landscapes), "unused"), dataset)
    images = torch.stack([dataset[i][0] for i in range(8)])
    labels = torch.zeros(8, dtype=torch.long)
    grads = []
    for rounds in (1, 2):
        torch.manual_seed(0)
        denoiser = build_denoiser(cfg)
        opt = torch.optim.SGD(denoiser.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        chunks = [
            cut_round(x, y, (16, 16)) for x, y in zip(images.chunk(rounds), labels.chunk(rounds), strict=True)
        ]
        loop.train_step(denoiser, denoiser, opt, scaler, chunks, (16, 16), cfg, torch.device("cpu"), rounds)
        grads.append(torch.cat([p.grad.flatten() for p in denoiser.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_the_step_takes_crops_and_builds_their_coordinates(landscapes, monkeypatch):
    """train_step on crops cut on the host sees what cropping the full batch on the device gave: the same
    pixels in [-1, 1] and the full grid's coordinates at the crops' offsets."""
    seen = []

    def recording_loss(denoiser, y, coords=None, *args, **kwargs):
        seen.append((y, coords))
        return edm_loss(denoiser, y, coords, *args, **kwargs)

    monkeypatch.setattr(loop, "edm_loss", recording_loss)
    dataset = ImageDataset(landscapes)
    cfg = resolve(tiny_config(str(landscapes), "unused"), dataset)
    images, labels = torch.stack([dataset[i][0] for i in range(6)]), torch.zeros(6, dtype=torch.long)
    denoiser = build_denoiser(cfg)
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = cut_round(images, labels, (8, 8), torch.Generator().manual_seed(4))
    loop.train_step(denoiser, denoiser, optimizer, scaler, [batch], (8, 8), cfg, torch.device("cpu"), 1)
    ((y, coords),) = seen
    expected, expected_coords = crop_at(images.float() / 127.5 - 1, batch.top, batch.left, (8, 8))
    assert torch.equal(y, expected) and torch.equal(coords, expected_coords)
    with pytest.raises(ValueError, match=r"\(8, 8\) crops in a step of \(16, 16\) crops"):
        loop.train_step(denoiser, denoiser, optimizer, scaler, [batch], (16, 16), cfg, torch.device("cpu"), 1)


def test_loader_workers_do_not_change_the_run(landscapes, tmp_path):
    """Crops are cut in the loader workers at offsets of (seed, rank, step, round, slot): training with
    --workers 0 and --workers 2 gives the same weights, bit for bit."""
    states = []
    for workers in (0, 2):
        out = str(tmp_path / str(workers))  # two accumulation rounds per step: offsets depend on the round
        cfg = tiny_config(str(landscapes), out, duration_kimg=0.1, batch_gpu=4, workers=workers)
        states.append(load_state(loop.train(cfg, progress=False, grid=0) / "state.pt"))
    a, b = states
    assert json.loads(a["counters"])["crops"] == json.loads(b["counters"])["crops"]
    for key in ("denoiser", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs between 0 and 2 workers"


def test_torchrun_two_processes(landscapes, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "patchdiff",
    ]
    train = f"train --data {landscapes} --outdir {tmp_path} --duration 0.1 --tick 0.05 --snap 2 --grid 4 --no-progress"
    out = subprocess.run(
        [*torchrun, *train.split(), *TINY_TRAIN_FLAGS], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    assert "on 2 x cpu" in (run / "log.txt").read_text()
    ticks = [r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "tick"]
    assert ticks[-1]["kimg"] >= 0.1 and list(run.glob("snapshot-*.safetensors"))
    assert ticks[-1]["images"] == sum(ticks[-1]["crops"].values())
    # Generation under torchrun gives the same images as one process.
    generate = f"generate --model {run} --seeds 0-4 --steps 4 --no-progress"
    out = subprocess.run(
        [*torchrun, *generate.split(), "--outdir", str(tmp_path / "g2"), "--batch", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert main([*generate.split(), "--outdir", str(tmp_path / "g1"), "--batch", "5"]) == 0
    for s in range(5):
        a = np.asarray(Image.open(tmp_path / "g1" / f"{s:06d}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "g2" / f"{s:06d}.png")).astype(int)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    "schedule,precision,coords",
    [("progressive", "bf16", True), ("full", "fp16", True), ("stochastic", "fp32", False)],
)
def test_schedules_precisions_and_the_no_coords_ablation(landscapes, tmp_path, schedule, precision, coords):
    patch = PatchConfig(schedule=schedule, coords=coords)
    cfg = tiny_config(str(landscapes), str(tmp_path), patch=patch, precision=precision, duration_kimg=0.15)
    run = loop.train(cfg, progress=False, grid=2)
    last = [r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "tick"][-1]
    assert math.isfinite(last["loss"]) and last["loss"] < 10
    sizes = {int(k) for k in last["crops"]}
    if schedule == "full":
        assert sizes == {16}
    if schedule == "progressive":
        # 0.15 kimg: the first 20% of images at 4x4 (32 images a step), then 8x8 (16 a step), ...
        assert 4 in sizes and last["steps_by_size"]["4"] == -(-30 // 32)
        # The log's step count and mean images per step are the run's (not the whole-image batch).
        steps = sum(last["steps_by_size"].values())
        assert (
            f"; {steps} steps, {150 / steps:.1f} images per step on average" in (run / "log.txt").read_text()
        )
    saved = json.loads((run / "config.json").read_text())
    assert saved["network"]["coord_channels"] == (2 if coords else 0) and saved["precision"] == precision


@pytest.mark.parametrize("interval", [dict(checkpoint_kimg=0.03), dict(checkpoint_minutes=1e-9)])
def test_the_state_is_written_between_snapshots(landscapes, tmp_path, monkeypatch, interval):
    """--checkpoint KIMG and the wall-clock bound write the state on their own, with no snapshot."""
    written = []
    original = run_module.Run.write_state

    def spy(self):
        written.append(self.at_step)
        original(self)

    monkeypatch.setattr(run_module.Run, "write_state", spy)
    cfg = tiny_config(
        str(landscapes), str(tmp_path), duration_kimg=0.1, tick_kimg=1.0, snap_ticks=0, **interval
    )
    run = loop.train(cfg, progress=False, grid=0)
    total = json.loads(load_state(run / "state.pt")["counters"])["step"]
    if "checkpoint_kimg" in interval:  # every 0.03 kimg = 2 steps of 15.2 images, and the final snapshot
        assert written == [2, 4, 6, total]
    else:  # the clock is always due: every step
        assert written == list(range(1, total + 1))
    assert len(list(run.glob("snapshot-*.safetensors"))) == 1


def test_noise_bands_reach_the_loss_per_crop_size(landscapes, tmp_path, monkeypatch):
    """--noise-bands: every step's loss draws sigma from its crop size's band; small crops low, full high."""
    seen = {}

    def recording_loss(*args, band=None, **kwargs):
        seen.setdefault(args[1].shape[-1], set()).add(band)
        return edm_loss(*args, band=band, **kwargs)

    monkeypatch.setattr(loop, "edm_loss", recording_loss)
    patch = PatchConfig(schedule="stochastic", noise_bands=True)
    cfg = tiny_config(str(landscapes), str(tmp_path), patch=patch, duration_kimg=0.15)
    run = loop.train(cfg, progress=False, grid=2)
    assert json.loads((run / "config.json").read_text())["patch"]["noise_bands"] is True
    # 16x16 images: crops 4, 8, 16 with p = 0.2, 0.3, 0.5 take the quantiles 0-0.2, 0.2-0.5, 0.5-1.
    expected = {4: (0.0, 0.2), 8: (0.2, 0.5), 16: (0.5, 1.0)}
    assert seen and all(len(bands) == 1 for bands in seen.values())
    for size, bands in seen.items():
        assert next(iter(bands)) == pytest.approx(expected[size])


def test_finish_full_ends_training_on_whole_images(landscapes, tmp_path, monkeypatch):
    sizes = []

    def recording_loss(*args, **kwargs):
        sizes.append(args[1].shape[-1])
        return edm_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "edm_loss", recording_loss)
    cfg = tiny_config(
        str(landscapes),
        str(tmp_path),
        patch=PatchConfig(schedule="stochastic", finish_full=0.5),
        duration_kimg=0.15,
    )
    run = loop.train(cfg, progress=False, grid=2)
    last = [r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "tick"][-1]
    assert last["kimg"] >= 0.15
    # Half of the 150 images come last, on 16x16 (whole) images of 8 a step: at least 9 steps.
    first_whole_tail = max(i for i, s in enumerate(sizes) if s != 16) + 1
    assert len(sizes) - first_whole_tail >= 9 and {4, 8} & set(sizes[:first_whole_tail])


def test_a_finished_run_whose_metrics_failed_is_scored_on_resume(landscapes, tiny_detector, tmp_path):
    """Scoring fails at the end of a run (here: a broken --detector); resuming the finished run, as
    `patchdiff compare` does, scores its last snapshot instead of reporting it done without numbers."""
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"")
    common = dict(metrics=("fid",), metric_num=4, duration_kimg=0.05)
    cfg = tiny_config(str(landscapes), str(tmp_path / "runs"), detector=str(broken), **common)
    with pytest.raises(RuntimeError, match="not a TorchScript archive"):
        loop.train(cfg, progress=False, grid=0)
    run = next((tmp_path / "runs").iterdir())
    assert not [r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "metrics"]
    fixed = tiny_config(str(landscapes), str(tmp_path / "runs"), detector=tiny_detector, **common)
    assert loop.train(fixed, resume=str(run), progress=False, grid=0, overrides={"detector"}) == run
    (record,) = [r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "metrics"]
    last = [r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "tick"][-1]
    assert record["step"] == last["step"] and math.isfinite(record["fid"])
    assert "has no metrics: scoring it now" in (run / "log.txt").read_text()
    # Resumed again, it has its numbers and scores nothing twice.
    loop.train(fixed, resume=str(run), progress=False, grid=0, overrides={"detector"})
    assert len([r for r in read_jsonl(run / "stats.jsonl") if r["kind"] == "metrics"]) == 1
