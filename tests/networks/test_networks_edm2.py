"""The EDM2 U-Net: each magnitude-preserving layer keeps unit variance, forced weight normalisation, and
the network as a backbone (shapes, crops, labels, presets)."""

import json
import math

import pytest
import torch

from patchdiff.config import NetworkConfig, network_preset
from patchdiff.networks import EDM2UNet, build_network, count_parameters
from patchdiff.networks.edm2 import (
    Block,
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    pixel_norm,
    renormalize_weights_,
)

TOL = 0.05  # on the standard deviation, with ~100k samples and a few hundred channels


def tiny(**overrides) -> NetworkConfig:
    base = dict(
        arch="edm2",
        resolution=16,
        img_channels=3,
        coord_channels=2,
        model_channels=8,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
    )
    base.update(overrides)
    return NetworkConfig(**base)


def unit(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_mp_silu_sum_and_cat_keep_unit_variance():
    a, b = unit(64, 64, 32, seed=1), unit(64, 64, 32, seed=2)
    assert mp_silu(a).square().mean().sqrt().item() == pytest.approx(1.0, abs=TOL)
    for t in (0.0, 0.3, 0.5, 0.9):
        assert mp_sum(a, b, t).std().item() == pytest.approx(1.0, abs=TOL)
    small = unit(64, 8, 32, 32, seed=3)  # 8 channels against 48: each side counts by its balance
    big = unit(64, 48, 32, 32, seed=4)
    for t in (0.2, 0.5, 0.8):
        y = mp_cat(small, big, t)
        assert y.shape[1] == 56 and y.std().item() == pytest.approx(1.0, abs=TOL)
        # The share of the output's energy from b is t^2 / ((1-t)^2 + t^2), whatever the channel counts.
        share = y[:, 8:].square().sum() / y.square().sum()
        assert share.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=0.02)
    # An unbalanced plain sum would not preserve it: the test can tell.
    assert (a + b).std().item() > 1.3


def test_pixel_norm_and_normalize():
    x = unit(4, 16, 8, 8) * 7.0 + 3.0
    y = pixel_norm(x)
    assert torch.allclose(y.square().mean(dim=1), torch.ones(4, 8, 8), atol=1e-3)
    w = unit(5, 3, 3, 3) * 5.0
    assert torch.allclose(normalize(w).square().mean(dim=(1, 2, 3)), torch.ones(5), atol=1e-3)


@pytest.mark.parametrize("kernel", [0, 1, 3])
def test_mp_conv_keeps_unit_variance_whatever_the_stored_scale(kernel):
    torch.manual_seed(0)
    layer = MPConv(96, 128, kernel)
    x = unit(512, 96, seed=7) if kernel == 0 else unit(16, 96, 16, 16, seed=7)
    y = layer(x)
    assert y.std().item() == pytest.approx(1.0, abs=TOL)
    with torch.no_grad():
        layer.weight.mul_(13.0)  # the forward pass normalises: the stored scale does not matter
    assert torch.allclose(layer(x), y, rtol=1e-3, atol=1e-3)
    assert layer(x, gain=0.5).std().item() == pytest.approx(0.5, abs=TOL)


def test_fourier_embedding_has_unit_variance():
    torch.manual_seed(0)
    emb = MPFourier(256)
    y = emb(unit(4096) * 1.5)
    assert y.std().item() == pytest.approx(1.0, abs=TOL)
    assert not any(p.requires_grad for p in emb.parameters())  # fixed frequencies, buffers only


@pytest.mark.parametrize(("flavor", "attention", "resample"), [("enc", False, "down"), ("dec", True, "up")])
def test_blocks_keep_unit_variance(flavor, attention, resample):
    """A whole block (residual branch, MP-sum, attention), on unit-variance inputs with the embedding's
    gain switched on (after training it is not zero)."""
    torch.manual_seed(0)
    block = Block(64, 128, 32, flavor=flavor, resample=resample, attention=attention)
    with torch.no_grad():
        block.emb_gain.fill_(0.5)
    y = block(unit(32, 64, 16, 16, seed=5), mp_silu(unit(32, 32, seed=6)))
    assert y.std().item() == pytest.approx(1.0, abs=0.1)


def test_weights_stay_normalised_after_an_optimiser_step():
    torch.manual_seed(0)
    cfg = tiny()
    net = build_network(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    with torch.no_grad():
        net.out_gain.fill_(1.0)  # so that every weight gets a gradient
    x, c = unit(4, cfg.in_channels, 16, 16), unit(4, seed=1)
    convs = [m for m in net.modules() if isinstance(m, MPConv)]

    def rms(w):
        return w.square().mean(dim=tuple(range(1, w.ndim))).sqrt()

    assert all(torch.allclose(rms(m.weight), torch.ones(m.weight.shape[0]), atol=1e-3) for m in convs)
    net(x, c).square().mean().backward()
    opt.step()
    assert any((rms(m.weight) - 1).abs().max() > 1e-3 for m in convs)  # the step moved the norms
    renormalize_weights_(net)
    for m in convs:
        assert torch.allclose(rms(m.weight), torch.ones(m.weight.shape[0]), atol=1e-3)


def test_the_training_step_renormalises(tmp_path):
    """train_step calls renormalize_weights_ for an edm2 network after the optimiser step."""
    from patchdiff.config import PatchConfig, TrainConfig
    from patchdiff.denoisers import build_denoiser
    from patchdiff.training.loop import train_step

    torch.manual_seed(0)
    cfg = TrainConfig(network=tiny(), patch=PatchConfig(), image_size=(16, 16), lr=0.05)
    denoiser = build_denoiser(cfg)
    opt = torch.optim.Adam(denoiser.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    zeros = torch.zeros(4, dtype=torch.long)
    for _ in range(2):
        train_step(
            denoiser,
            denoiser,
            opt,
            scaler,
            [(data, zeros, zeros, zeros)],
            (8, 8),
            cfg,
            torch.device("cpu"),
            1,
        )
    for m in denoiser.modules():
        if isinstance(m, MPConv):
            rms = m.weight.square().mean(dim=tuple(range(1, m.weight.ndim))).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert denoiser.net.out_gain.item() != 0.0  # it trained


def test_forward_backward_at_several_crop_sizes():
    torch.manual_seed(0)
    cfg = tiny(dropout=0.1)
    net = build_network(cfg).train()
    assert isinstance(net, EDM2UNet)
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    for h, w in ((8, 8), (16, 16), (8, 16), (2, 6)):
        y = net(unit(2, cfg.in_channels, h, w), unit(2, seed=1))
        assert y.shape == (2, 3, h, w) and torch.isfinite(y).all()
        net.zero_grad(set_to_none=True)
        y.square().sum().backward()
        assert all(p.grad is not None for p in net.parameters())  # DDP needs every parameter used


def test_output_starts_at_zero_and_depends_on_inputs():
    torch.manual_seed(0)
    cfg = tiny()
    net = build_network(cfg).eval()
    x, c = unit(2, cfg.in_channels, 16, 16), unit(2, seed=1)
    with torch.no_grad():
        assert net(x, c).abs().max() == 0  # the output gain starts at zero
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if isinstance(m, Block):
                m.emb_gain.fill_(1.0)
        y = net(x, c)
        assert torch.equal(net(x, c), y)
        assert not torch.allclose(net(x, c + 1.0), y)  # the noise level matters
        coords_moved = x.clone()
        coords_moved[:, 3:] += 0.5  # the coordinate channels enter like image channels
        assert not torch.allclose(net(coords_moved, c), y)
    # No GroupNorm, no biases anywhere.
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert not any(name.endswith("bias") for name, _ in net.named_parameters())


def test_labels_and_label_dropout():
    torch.manual_seed(0)
    cfg = tiny(label_dim=3, label_dropout=1.0)
    net = build_network(cfg)
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if isinstance(m, Block):
                m.emb_gain.fill_(1.0)
    x, c = unit(2, cfg.in_channels, 16, 16), unit(2, seed=1)
    onehot = torch.eye(3)[[0, 2]]
    net.eval()
    with torch.no_grad():
        y_label, y_null = net(x, c, onehot), net(x, c, None)
        assert not torch.allclose(y_label, y_null)
        net.train()  # label dropout 1.0: every label is dropped in training
        assert torch.allclose(net(x, c, onehot), y_null, atol=1e-5)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c, torch.eye(4)[[0, 1]])


def test_bf16_autocast():
    torch.manual_seed(0)
    cfg = tiny(label_dim=3)
    net = build_network(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(unit(2, cfg.in_channels, 8, 8), unit(2, seed=1), torch.eye(3)[[0, 1]])
    assert torch.isfinite(y).all()


def test_presets_and_bad_crops():
    xs = network_preset("edm2", 64, img_channels=4, coord_channels=0)
    # The paper's XS (125M) and S (280M) at 64x64x4 latents.
    assert count_parameters(build_network(xs)) == pytest.approx(125e6, rel=0.02)
    s = network_preset("edm2", 64, edm2_size="S", img_channels=4, coord_channels=0)
    assert math.isclose(count_parameters(build_network(s)), 280e6, rel_tol=0.02)
    assert network_preset("edm2", 16, edm2_size="tiny").model_channels == 32
    with pytest.raises(ValueError, match="--edm2-size"):
        network_preset("edm2", 64, edm2_size="XXXL")
    net = build_network(tiny(channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="multiple of 4"):
        net(unit(1, 5, 6, 6), unit(1))


def test_a_tiny_edm2_trains_patch_wise_and_samples_through_the_cli(tmp_path, landscapes):
    from PIL import Image
    from tests.conftest import TINY_TRAIN_FLAGS

    from patchdiff.cli import main

    train = [
        *f"train --data {landscapes} --outdir {tmp_path / 'runs'} --arch edm2 --duration 0.1".split(),
        *["--tick", "0.05", "--snap", "1", "--grid", "0", "--no-progress", *TINY_TRAIN_FLAGS],
    ]
    assert main(train) == 0
    (run,) = (tmp_path / "runs").iterdir()
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert min(int(size) for size in ticks[-1]["crops"]) < 16  # crops of the 16x16 images were trained
    out = tmp_path / "out"
    assert (
        main(["generate", "--model", str(run), "--outdir", str(out), "--seeds", "0-1", "--steps", "4"]) == 0
    )
    assert Image.open(out / "000001.png").size == (16, 16)
