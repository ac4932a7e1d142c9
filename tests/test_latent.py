import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests import vae as helpers
from tests.conftest import TINY_TRAIN_FLAGS, tiny_config

from patchdiff.cli import main
from patchdiff.config import LatentConfig, TrainConfig
from patchdiff.generation import generate, load
from patchdiff.latent import (
    VAEUnavailableError,
    from_network,
    import_autoencoder,
    latent_scaling,
    load_vae,
    prepare_batch,
    to_network,
)
from patchdiff.training import loop
from patchdiff.training.checkpoint import load_state

tiny_vae, class_images, latent_set = helpers.tiny_vae, helpers.class_images, helpers.latent_set  # fixtures

# The tiny network on 4x4x4 latents: crops 2 and 4 (min crop 2 for --cres 1,2).
LATENT_FLAGS = [*TINY_TRAIN_FLAGS, "--attn", "4", "--dropout", "0", "--tick", "0.02", "--snap", "1"]


def test_latent_scaling_closed_forms():
    shift, scale = latent_scaling("sd", 0.18215, (1.0, 2.0), (3.0, 4.0), 0.5)
    assert shift == (0.0, 0.0) and scale == (0.18215, 0.18215)
    shift, scale = latent_scaling("channel", 0.18215, (1.0, 2.0), (4.0, 0.5), 0.5)
    assert shift == (1.0, 2.0) and scale == (0.125, 1.0)
    latent = LatentConfig(vae="x", shift=shift, scale=scale)
    z = torch.randn(3, 2, 4, 4)
    x = to_network(z, latent)
    torch.testing.assert_close(x[:, 0], (z[:, 0] - 1) * 0.125)
    torch.testing.assert_close(from_network(x, latent), z)
    with pytest.raises(ValueError, match="--latent-norm"):
        latent_scaling("nope", 0.18215, (0.0,), (1.0,), 0.5)


def test_prepare_batch_draws_a_seeded_posterior_sample():
    cfg = TrainConfig(latent=LatentConfig(vae="x", shift=(0.5,) * 4, scale=(2.0,) * 4))
    mean, std = torch.randn(64, 4, 4, 4), torch.rand(64, 4, 4, 4) + 0.5
    data = torch.stack([mean, std], dim=1).half()
    torch.manual_seed(1)
    a = prepare_batch(data, torch.device("cpu"), cfg)
    torch.manual_seed(1)
    b = prepare_batch(data, torch.device("cpu"), cfg)
    assert torch.equal(a, b) and a.dtype == torch.float32
    eps = (a / 2 + 0.5 - data[:, 0].float()) / data[:, 1].float()  # back to the noise
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    pixels = prepare_batch(
        torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), torch.device("cpu"), TrainConfig()
    )
    assert torch.all(pixels == 1)


def test_decode_of_encode_equals_the_vae_called_directly(tiny_vae):
    vae = load_vae(str(tiny_vae), "cpu")
    assert vae.factor == 8 and vae.latent_channels == 4 and vae.scaling_factor == pytest.approx(0.18215)
    images = torch.from_numpy(np.stack(helpers.make_landscapes(3, 32, seed=5))).permute(0, 3, 1, 2)
    latent = LatentConfig(vae=vae.source, shift=(0.0,) * 4, scale=(vae.scaling_factor,) * 4)
    mean, _ = vae.encode(images)
    ours = vae.decode(from_network(to_network(mean, latent), latent))
    direct_model = import_autoencoder().from_pretrained(str(tiny_vae)).eval()
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        z = direct_model.encode(x).latent_dist.mean * direct_model.config.scaling_factor
        direct = direct_model.decode(z / direct_model.config.scaling_factor).sample
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    assert ours.shape == (3, 3, 32, 32)


def test_missing_diffusers_says_what_to_install(monkeypatch, class_images, tiny_run, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert generate(load(tiny_run, "cpu"), [0], num_steps=2).shape == (1, 3, 16, 16)  # pixels need no VAE
    with pytest.raises(VAEUnavailableError, match=r"patchdiff\[latent\]"):
        import_autoencoder()
    code = main(["dataset", "--source", str(class_images), "--dest", str(tmp_path / "z"), "--vae"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'pip install "patchdiff[latent]"' in err


@pytest.mark.slow
def test_a_hub_id_without_network_or_cache_is_a_clear_error(class_images, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "patchdiff", "dataset", "--source", str(class_images)]
    cmd += ["--dest", str(tmp_path / "z"), "--vae", "stabilityai/sd-vae-ft-ema", "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("patchdiff")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "stabilityai/sd-vae-ft-ema" in lines[0] and "HF_HOME" in lines[0] and "save_pretrained" in lines[0]
    assert "Traceback" not in result.stderr


def test_presets_are_defaults_that_flags_override():
    from patchdiff.cli import build_parser

    parser = build_parser()
    base = ["train", "--data", "d", "--outdir", "o"]
    args = parser.parse_args([*base, "--preset", "imagenet256-latent", "--lr", "2e-4"])
    assert (args.arch, args.batch, args.lr, args.cond, args.label_dropout) == ("adm", 4096, 2e-4, True, 0.1)
    assert (args.ema, args.precision, args.dropout) == (50_000.0, "bf16", 0.1)
    # The paper's latent recipe is stochastic, whatever the pixel-space default schedule is.
    assert (args.patch_schedule, parser.parse_args(base).patch_schedule) == ("stochastic", "progressive")
    args = parser.parse_args([*base, "--batch", "64", "--preset", "lsun256-latent"])
    assert (args.batch, args.cond, args.arch, args.patch_schedule) == (64, False, "adm", "stochastic")
    args = parser.parse_args([*base, "--preset", "lsun256-latent", "--patch-schedule", "full"])
    assert args.patch_schedule == "full"
    args = parser.parse_args(["generate", "--model", "m", "--outdir", "o", "--preset", "adm-latent"])
    assert (args.steps, args.S_churn, args.S_min, args.S_max, args.S_noise, args.cfg) == (
        256,
        40.0,
        0.05,
        50.0,
        1.003,
        1.3,
    )


def test_dry_run_shows_latent_crops(latent_set, capsys):
    assert main(["train", "--data", str(latent_set), "--outdir", "unused", *LATENT_FLAGS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "crop sizes (2, 4)" in out
    cfg = json.loads(out[: out.index("\nparameters")])
    assert cfg["network"]["resolution"] == 4 and cfg["network"]["img_channels"] == 4
    assert cfg["patch"]["latent"] and cfg["latent"]["scale"] == [0.18215] * 4
    assert cfg["latent"]["pixel_size"] == [32, 32]


def test_dataset_train_generate_fid_on_latents(tiny_vae, class_images, tiny_detector, tmp_path):
    data = tmp_path / "latents"
    flags = ["--source", str(class_images), "--dest", str(data), "--class-folders", "--no-progress"]
    assert main(["dataset", *flags, "--vae", str(tiny_vae), "--max-images", "8", "--shard-size", "3"]) == 0
    assert (tmp_path / "latents-preview.png").is_file()
    runs = tmp_path / "runs"
    train = ["train", "--data", str(data), "--outdir", str(runs), *LATENT_FLAGS, "--duration", "0.05"]
    assert main([*train, "--cond", "--label-dropout", "0.1", "--latent-norm", "channel", "--grid", "4"]) == 0
    (run,) = runs.iterdir()
    snapshot = json.loads(sorted(run.glob("snapshot-*.json"))[-1].read_text())
    assert snapshot["config"]["latent"]["vae"] == str(tiny_vae.resolve())
    assert snapshot["config"]["latent"]["norm"] == "channel"
    grid = Image.open(sorted(run.glob("grid-*.png"))[-1])
    assert grid.size == (64, 64) and grid.mode == "RGB"  # 2x2 decoded 32x32 images
    out = tmp_path / "gen"
    gen = ["generate", "--model", str(run), "--outdir", str(out), "--seeds", "0-3", "--steps", "4"]
    assert main([*gen, "--vae", str(tiny_vae), "--cfg", "1.3", "--no-progress"]) == 0
    images = [Image.open(p) for p in sorted(out.glob("*.png"))]
    assert len(images) == 4 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    ref = tmp_path / "ref.npz"
    fid = ["fid", "--detector", tiny_detector, "--no-progress", "--workers", "0"]
    assert main([fid[0], "ref", *fid[1:], "--data", str(out), "--dest", str(ref), "--kid-features", "0"]) == 0
    assert (
        main([fid[0], "calc", *fid[1:], "--model", str(run), "--num", "4", "--steps", "4", "--ref", str(ref)])
        == 0
    )
    # The library call decodes too, with the VAE the snapshot recorded.
    model = load(run, "cpu")
    assert generate(model, [0, 1], num_steps=4).shape == (2, 3, 32, 32)


def test_resume_on_latents_continues_exactly(latent_set, tmp_path):
    def config(out, kimg):
        return tiny_config(str(latent_set), str(tmp_path / out), duration_kimg=kimg, tick_kimg=0.05)

    full = loop.train(config("a", 0.24), progress=False, grid=0)
    part = loop.train(config("b", 0.12), progress=False, grid=0)
    resumed = loop.train(config("b", 0.24), resume="auto", progress=False, grid=0)
    assert resumed == part
    a, b = load_state(full / "state.pt"), load_state(resumed / "state.pt")
    assert json.loads(a["counters"])["step"] == json.loads(b["counters"])["step"] > 0
    for key in ("denoiser", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert json.loads(a["config"])["latent"]["vae"] == helpers.tiny_vae_path(latent_set)


def test_a_pixel_model_refuses_a_vae(tiny_run, tiny_vae):
    with pytest.raises(ValueError, match="pixels"):
        load(tiny_run, "cpu", vae=str(tiny_vae))


def test_a_resumed_latent_run_keeps_its_vae_and_scaling(latent_set, tmp_path):
    import shutil

    from patchdiff.training.setup import prepare

    cfg = tiny_config(str(latent_set), str(tmp_path / "runs"), duration_kimg=0.02, tick_kimg=0.02)
    run = loop.train(cfg, progress=False, grid=0)
    saved = json.loads(load_state(run / "state.pt")["config"])["latent"]
    # The same images re-encoded: other channel statistics (and scaling factor) -> the saved scaling stays.
    other = tmp_path / "reencoded"
    shutil.copytree(latent_set, other)
    meta = json.loads((other / "dataset.json").read_text())
    meta["scaling_factor"] *= 2
    (other / "dataset.json").write_text(json.dumps(meta))
    moved = tiny_config(str(other), str(tmp_path / "runs"), duration_kimg=0.04)
    setup = prepare(moved, "auto", 1)
    assert list(setup.cfg.latent.scale) == saved["scale"] and list(setup.cfg.latent.shift) == saved["shift"]
    # Latents of another VAE: refused in one line that names both.
    meta["vae"] = "someone/other-vae"
    (other / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'someone/other-vae'") as info:
        prepare(moved, "auto", 1)
    assert saved["vae"] in str(info.value) and "\n" not in str(info.value)
