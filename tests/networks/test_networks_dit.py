"""DiT backbone: shapes and gradients at every crop size, labels and label dropout, position codes from
global coordinates, errors, presets, and a few training steps through the CLI followed by generation."""

import math

import pytest
import torch
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.cli import main
from patchdiff.config import DIT_SIZES, latent_imagenet256_presets, network_preset
from patchdiff.networks import DiT, build_network, count_parameters
from patchdiff.networks.dit import sincos_2d, token_centres
from patchdiff.patching import coordinate_grid, crop_at


def tiny(**overrides):
    base = dict(depth=2, width=32, heads=2, dit_patch=2, label_dim=0)
    base.update(overrides)
    return network_preset("dit", 16, **base)


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in the zero-initialised layers (adaLN-Zero, output), so outputs depend on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def test_forward_backward_at_every_crop_size_with_labels():
    torch.manual_seed(0)
    net = build_network(tiny(label_dim=3, label_dropout=0.3)).train()
    assert isinstance(net, DiT)
    for P in (4, 8, 16):
        x = torch.randn(4, 5, P, P)  # 3 image channels + x, y
        coords = coordinate_grid(16, 16)[None, :, :P, :P].expand(4, -1, -1, -1)
        x[:, 3:] = coords
        y = net(x, torch.randn(4), torch.eye(3)[[0, 1, 2, 0]])
        assert y.shape == (4, 3, P, P)
        net.zero_grad()
        (y - 1).square().mean().backward()
        grads = {n: p.grad for n, p in net.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert grads["out.weight"].abs().sum() > 0  # adaLN-Zero: the output layer learns first


def test_zero_init_and_tokens_per_crop():
    net = build_network(tiny())
    x = torch.randn(2, 5, 8, 8)
    assert torch.equal(net(x, torch.zeros(2)), torch.zeros(2, 3, 8, 8))  # adaLN-Zero: F starts at 0
    assert net.positions(x).shape == (2, (8 // 2) ** 2, 32)  # (P/p)^2 tokens


def test_label_dropout_and_null_label():
    net = perturbed(build_network(tiny(label_dim=3, label_dropout=1.0)))
    x, t = torch.randn(2, 5, 8, 8), torch.randn(2)
    labels = torch.eye(3)[:2]
    null = net.eval()(x, t, torch.zeros(2, 3))
    assert torch.equal(net.eval()(x, t, None), null)  # None is the null label
    assert not torch.allclose(net.eval()(x, t, labels), null)  # labels matter at eval
    assert torch.equal(net.train()(x, t, labels), null)  # dropout 1.0 drops every label in training


def test_token_codes_of_a_crop_equal_those_of_the_same_region_of_the_full_image():
    for p in (2, 4):
        net = build_network(tiny(dit_patch=p))
        full = torch.cat([torch.randn(1, 3, 16, 16), coordinate_grid(16, 16)[None]], dim=1)
        codes = net.positions(full).reshape(1, 16 // p, 16 // p, -1)
        centres = token_centres(full[:, 3:], p, 16)
        grid = torch.arange(16 // p, dtype=torch.float32)
        assert torch.allclose(centres[0, 0], grid.expand(16 // p, -1), atol=1e-5)  # x = token column
        assert torch.allclose(centres[0, 1], grid[:, None].expand(-1, 16 // p), atol=1e-5)  # y = row
        for top, left, P in ((0, 0, 8), (4, 8, 8), (8, 4, 4), (12, 12, 4)):
            image = full[:, :3]
            crop, coords = crop_at(image, torch.tensor([top]), torch.tensor([left]), (P, P))
            crop_codes = net.positions(torch.cat([crop, coords], dim=1))
            region = codes[:, top // p : (top + P) // p, left // p : (left + P) // p].reshape(
                1, -1, codes.shape[-1]
            )
            assert torch.equal(crop_codes, region), (p, top, left, P)


def test_codes_are_2d_sincos_of_the_grid():
    pos = torch.tensor([[[[3.0]], [[5.0]]]])  # x = 3, y = 5
    code = sincos_2d(pos, 8)[0, 0]
    freqs = torch.tensor([1.0, 1e-2])
    expect = torch.cat([(3 * freqs).sin(), (3 * freqs).cos(), (5 * freqs).sin(), (5 * freqs).cos()])
    assert torch.allclose(code, expect)


def test_without_coords_positions_come_from_the_local_token_grid():
    net = build_network(tiny(coord_channels=0))
    full = net.positions(torch.randn(1, 3, 16, 16)).reshape(1, 8, 8, -1)
    crop = net.positions(torch.randn(1, 3, 8, 8))
    assert torch.equal(crop, full[:, :4, :4].reshape(1, 16, -1))  # a crop looks like the top-left corner


def test_errors_name_the_flag():
    with pytest.raises(ValueError, match="--width 30"):
        build_network(tiny(width=30, heads=4))
    with pytest.raises(ValueError, match="--dit-patch 3"):
        build_network(tiny(dit_patch=3))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        build_network(tiny(dit_patch=4))(torch.randn(1, 5, 6, 6), torch.zeros(1))
    with pytest.raises(ValueError, match="--dit-size"):
        network_preset("dit", 32, dit_size="XXL")


def test_presets():
    assert {k: DIT_SIZES[k] for k in "SB"} == {"S": (12, 384, 6), "B": (12, 768, 12)}
    assert DIT_SIZES["L"] == (24, 1024, 16) and DIT_SIZES["XL"] == (28, 1152, 16)
    xl = network_preset("dit", 32, dit_size="XL", dit_patch=4)
    assert (xl.depth, xl.width, xl.heads, xl.dit_patch, xl.min_crop, xl.dropout) == (28, 1152, 16, 4, 4, 0.0)
    latent = latent_imagenet256_presets()
    for name, size in (("DiT-B/2", "B"), ("DiT-XL/2", "XL")):
        cfg = latent[name]
        assert (cfg.depth, cfg.width, cfg.heads) == DIT_SIZES[size]
        assert (cfg.resolution, cfg.img_channels, cfg.dit_patch, cfg.label_dim) == (32, 4, 2, 1000)
    # DiT-S/2 on 32x32x4 latents has 33M parameters (Peebles & Xie, Table 1; their count includes
    # a 1000-class table, ours a bias-free one-hot map of the same size).
    small = build_network(network_preset("dit", 32, dit_size="S", img_channels=4, label_dim=1000))
    assert math.isclose(count_parameters(small) / 1e6, 33.0, rel_tol=0.02)


def test_train_a_few_steps_through_the_cli_then_generate_score_and_report(
    tmp_path, landscapes, tiny_detector
):
    runs = tmp_path / "runs"
    flags = ["--arch", "dit", "--depth", "2", "--width", "32", "--heads", "2", "--dit-patch", "2"]
    train = f"train --data {landscapes} --outdir {runs} --duration 0.05 --tick 0.05 --grid 4 --no-progress"
    assert main([*train.split(), *TINY_TRAIN_FLAGS, *flags]) == 0
    (run,) = runs.iterdir()
    assert "dit" in run.name and list(run.glob("snapshot-*.safetensors"))
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
    # A crop schedule with every size ran: crops 4, 8, 16 of 16x16 images.
    log = (run / "log.txt").read_text()
    assert "crop sizes (4, 8, 16)" in log
