"""diffusers UNet2DModel backbone: a tiny model saved with save_pretrained stands in for a pretrained one.

Widening conv_in keeps it bit for bit; the VP-wrapped model under the EDM sampler reproduces its own
deterministic DDIM sampler; it fine-tunes patch-wise through the CLI and its snapshots rebuild without
the pretrained folder; a hub id offline and a missing diffusers give one clear line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff import sampling
from patchdiff.cli import main
from patchdiff.config import TrainConfig, network_preset
from patchdiff.denoisers import build_denoiser
from patchdiff.generation import load
from patchdiff.networks import DiffusersUNet, build_network
from patchdiff.networks.diffusers_unet import resolve_unet
from patchdiff.patching import coordinate_grid
from patchdiff.precond_vp import VPDenoiser, vp_alphas_cumprod

diffusers = pytest.importorskip("diffusers")  # the optional extra; installed in the dev environment


def tiny_unet(seed: int = 0) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def save_pretrained(path, prediction="epsilon"):
    """A tiny 'pretrained' DDPM folder: the UNet and its scheduler, as save_pretrained writes them."""
    unet = tiny_unet()
    unet.save_pretrained(path)
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction).save_pretrained(path)
    return unet


def pretrained_config(path, prediction=None, **overrides):
    cfg = network_preset("diffusers-unet", 16, init_from=str(path), **overrides)
    return resolve_unet(cfg, prediction)


def test_new_unet_from_the_flags_at_every_crop_size_with_labels():
    cfg = resolve_unet(
        network_preset(
            "diffusers-unet", 16, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,)
        )
    )
    layout = json.loads(cfg.unet_config)
    assert layout["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"] and cfg.prediction == "edm"
    cfg = network_preset("diffusers-unet", 16, unet_config=cfg.unet_config, label_dim=3, label_dropout=0.5)
    net = build_network(cfg).train()
    assert isinstance(net, DiffusersUNet) and cfg.min_crop == 2
    for P in (4, 8, 16):
        y = net(torch.randn(3, 5, P, P), torch.randn(3), torch.eye(3))
        assert y.shape == (3, 3, P, P)
        net.zero_grad()
        y.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.map_label.weight.grad.abs().sum() > 0  # zero-initialised, yet it learns


def test_widened_conv_in_keeps_the_pretrained_outputs_bit_for_bit(tmp_path):
    pretrained = save_pretrained(tmp_path / "ddpm")
    cfg = pretrained_config(tmp_path / "ddpm")
    assert cfg.prediction == "epsilon" and cfg.beta_schedule == "linear" and cfg.num_train_timesteps == 1000
    net = build_network(cfg, pretrained=True).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    coords = coordinate_grid(16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        ours = net(torch.cat([x, coords], dim=1), t)
        theirs = pretrained(x, t).sample
    assert torch.equal(ours, theirs)
    assert torch.equal(net.unet.conv_in.coords.weight, torch.zeros_like(net.unet.conv_in.coords.weight))
    fresh = build_network(cfg, pretrained=False)  # same layout, no weights read
    assert not torch.equal(fresh.unet.conv_out.weight, net.unet.conv_out.weight)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_euler_sampler_reproduces_the_models_own_ddim(tmp_path, monkeypatch, prediction):
    pretrained = save_pretrained(tmp_path / "ddpm", prediction)
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction, clip_sample=False)
    ddim.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 16, 16, generator=g)

    # The model's own deterministic DDIM (eta = 0), in VP space.
    x = x_T
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(pretrained(x, t).sample, t, x, eta=0.0).prev_sample
    reference = x

    # The same model through VPDenoiser and patchdiff's EDM sampler (Euler), at the DDIM steps' sigmas.
    cfg = pretrained_config(tmp_path / "ddpm")
    assert cfg.prediction == prediction
    assert torch.equal(vp_alphas_cumprod(num_steps=1000), ddim.alphas_cumprod)
    D = build_denoiser(TrainConfig(network=cfg)).eval()
    assert isinstance(D, VPDenoiser)
    abar = ddim.alphas_cumprod.to(torch.float64)[ddim.timesteps]
    sigmas = [float(s) for s in ((1 - abar) / abar).sqrt()] + [0.0]  # DDIM's last step goes to abar = 1
    # edm_sampler draws its sigmas from karras_sigmas; here they are DDIM's (the sampler itself is unchanged).
    monkeypatch.setattr(sampling, "karras_sigmas", lambda *args, **kwargs: sigmas)
    x_ve = x_T * (1 + sigmas[0] ** 2) ** 0.5  # x_ve = x_vp sqrt(1 + sigma^2); the sampler multiplies by sigma
    with torch.no_grad():
        ours = sampling.euler_sampler(D, x_ve / sigmas[0], num_steps=len(sigmas) - 1)
    assert reference.abs().max() > 0.1
    assert torch.allclose(ours, reference, atol=2e-4, rtol=1e-4), (ours - reference).abs().max()


def test_patch_fine_tuning_through_the_cli_and_snapshots_without_the_pretrained_folder(
    tmp_path, landscapes, tiny_detector
):
    folder = tmp_path / "ddpm"
    save_pretrained(folder)
    runs = tmp_path / "runs"
    train = f"train --data {landscapes} --outdir {runs} --duration 0.05 --tick 0.05 --grid 2 --no-progress"
    flags = ["--arch", "diffusers-unet", "--init-from", str(folder)]
    assert main([*train.split(), *TINY_TRAIN_FLAGS, *flags]) == 0
    (run,) = runs.iterdir()
    assert "crop sizes (4, 8, 16)" in (run / "log.txt").read_text()
    folder.rename(tmp_path / "gone")  # the snapshot alone must rebuild the network
    model = load(run, device="cpu")
    net_cfg = model.config.network
    assert net_cfg.prediction == "epsilon" and json.loads(net_cfg.unet_config)["block_out_channels"] == [
        8,
        16,
    ]
    out = tmp_path / "out"
    assert main(f"generate --model {run} --outdir {out} --seeds 0-1 --steps 4 --no-progress".split()) == 0
    assert len(list(out.glob("*.png"))) == 2
    common = ["--detector", tiny_detector, "--batch", "8", "--no-progress", "--device", "cpu"]
    ref = str(tmp_path / "ref.npz")
    assert main(["fid", "ref", "--data", str(landscapes), "--dest", ref, *common]) == 0
    assert (
        main(["fid", "calc", "--model", str(run), "--num", "8", "--steps", "3", "--ref", ref, *common]) == 0
    )
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()
    # Resuming needs neither the pretrained folder nor the hub: the state holds the weights.
    longer = train.replace("--duration 0.05", "--duration 0.1").split()
    assert main([*longer, *TINY_TRAIN_FLAGS, *flags, "--resume", "auto"]) == 0
    assert len(list(run.glob("snapshot-*.safetensors"))) == 2


def test_unsupported_pretrained_models_are_refused(tmp_path):
    for name, kwargs, match in (
        ("ve", dict(time_embedding_type="fourier"), "'fourier' time embedding"),
        ("cond", dict(num_class_embeds=10), "class-conditional"),
    ):
        small = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
        small.update(
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")
        )
        diffusers.UNet2DModel(sample_size=8, **small, **kwargs).save_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            pretrained_config(tmp_path / name)
    with pytest.raises(ValueError, match="cannot load the unet from this folder"):
        pretrained_config(tmp_path)  # a folder without a UNet


@pytest.mark.slow  # a fresh process importing diffusers: 5 s of CPU, more on a loaded machine
def test_a_hub_id_offline_gives_one_clear_line(tmp_path, landscapes):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "patchdiff", "train", "--data", str(landscapes), "--outdir", str(tmp_path)]
    cmd += ["--arch", "diffusers-unet", "--init-from", "google/ddpm-cifar10-32"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "--init-from 'google/ddpm-cifar10-32'" in lines[0] and "offline" in lines[0]


def test_patchdiff_imports_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import patchdiff, patchdiff.cli\n"
        "from patchdiff.config import network_preset\n"
        "from patchdiff.networks import build_network\n"
        "build_network(network_preset('dit', 8, depth=1, width=8, heads=1))\n"
        "try:\n"
        "    build_network(network_preset('diffusers-unet', 8))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'patchdiff[diffusers]'" in out.stdout
