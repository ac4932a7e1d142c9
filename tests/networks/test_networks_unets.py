"""The three backbones on tiny configurations, and the parameter counts of the paper presets."""

import dataclasses

import pytest
import torch

from patchdiff.config import NetworkConfig, network_preset
from patchdiff.networks import ADMUNet, SongUNet, build_network, count_parameters
from patchdiff.networks.layers import SelfAttention

ARCHS = ("ddpmpp", "ncsnpp", "adm")


def tiny(arch: str, **overrides) -> NetworkConfig:
    base = dict(
        arch=arch,
        resolution=16,
        img_channels=3,
        coord_channels=2,
        model_channels=16,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(8,),  # the lower level
        dropout=0.0,
    )
    base.update(overrides)
    return NetworkConfig(**base)


def inputs(cfg: NetworkConfig, n: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, h, w, generator=g)
    c_noise = torch.randn(n, generator=g)
    return x, c_noise


def wake(net: torch.nn.Module) -> None:
    """Give the near-zero-initialised convs (ends of residual branches, attention projections, output)
    ordinary weights, as after some training, so that every input visibly moves the output."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.weight.abs().max() < 1e-3:
                m.reset_parameters()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_at_several_crop_sizes(arch):
    torch.manual_seed(0)
    cfg = tiny(arch, dropout=0.1)
    net = build_network(cfg).train()
    for h, w in ((8, 8), (16, 16), (8, 16), (2, 6)):
        x, c_noise = inputs(cfg, 2, h, w)
        y = net(x, c_noise)
        assert y.shape == (2, cfg.img_channels, h, w)
        assert torch.isfinite(y).all()
        net.zero_grad(set_to_none=True)
        y.square().sum().backward()
        g = net.enc_conv.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        # Every parameter takes part (DDP without find_unused_parameters relies on it).
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_output_starts_near_zero_and_depends_on_inputs(arch):
    torch.manual_seed(0)
    cfg = tiny(arch)
    net = build_network(cfg).eval()
    x, c_noise = inputs(cfg, 2, 16, 16)
    with torch.no_grad():
        assert net(x, c_noise).abs().max() < 1e-2  # zero-ish init of the output conv
        wake(net)
        y = net(x, c_noise)
        assert torch.equal(net(x, c_noise), y)  # deterministic in eval mode
        assert not torch.allclose(net(x, c_noise + 1.0), y)  # the noise level matters
        assert not torch.allclose(net(x.flip(-1), c_noise)[0], y[0].flip(-1))  # the input matters


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_song_label_embedding_is_scaled_one_hot_plus_bias(arch):
    # EDM: the one-hot label enters as y * sqrt(label_dim) through a linear map with a bias; the null
    # label (all zeros) is then the bias alone, a learned embedding rather than a fixed zero.
    K = 4
    net = build_network(tiny(arch, label_dim=K)).eval()
    seen = []
    net.map_label.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        net.map_label.bias.normal_()  # as after training
        x, c_noise = inputs(net.cfg, 3, 8, 8)
        net(x, c_noise, torch.stack([torch.eye(K)[2], torch.eye(K)[0], torch.zeros(K)]))
    (y, emb), W, b = seen[0], net.map_label.weight, net.map_label.bias
    torch.testing.assert_close(y[0], torch.eye(K)[2] * K**0.5)  # unit mean square, like the noise embedding
    torch.testing.assert_close(emb[0], 2.0 * W[:, 2] + b)  # sqrt(4) = 2
    torch.testing.assert_close(emb[2], b)  # the null label
    # Xavier-uniform init of the weight: the scaled one-hot gives each class an embedding of the noise
    # embedding's order (unit-ish entries), not sqrt(label_dim) times smaller.
    big = build_network(tiny(arch, label_dim=1000))
    column_rms = (big.map_label.weight * 1000**0.5).pow(2).mean(dim=0).sqrt()
    assert 0.3 < column_rms.mean() < 3.0


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_and_label_dropout(arch):
    torch.manual_seed(0)
    cfg = tiny(arch, label_dim=3, label_dropout=1.0)
    net = build_network(cfg)
    wake(net)
    x, c_noise = inputs(cfg, 4, 8, 8)
    labels = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    with torch.no_grad():
        uncond = net.eval()(x, c_noise, None)
        torch.testing.assert_close(net(x, c_noise, torch.zeros(4, 3)), uncond)  # zeros = null label
        cond = net(x, c_noise, labels)
        assert (cond - uncond).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # labels change every output
        # Training mode with label_dropout=1 drops every label (dropout=0: otherwise deterministic).
        torch.testing.assert_close(net.train()(x, c_noise, labels), uncond)

    # label_dropout=0.5: each row is exactly the conditional or the unconditional output, both occur.
    net.cfg = dataclasses.replace(cfg, label_dropout=0.5)
    x, c_noise = x[:1].expand(64, -1, -1, -1), c_noise[:1].expand(64)
    labels = labels[:1].expand(64, -1)
    with torch.no_grad():
        cond1, uncond1 = net.eval()(x[:1], c_noise[:1], labels[:1]), net(x[:1], c_noise[:1])
        torch.manual_seed(1)
        y = net.train()(x, c_noise, labels)
    is_cond = torch.isclose(y, cond1, atol=1e-6).flatten(1).all(dim=1)
    is_uncond = torch.isclose(y, uncond1, atol=1e-6).flatten(1).all(dim=1)
    assert (is_cond ^ is_uncond).all()
    assert 10 < is_cond.sum() < 54


@pytest.mark.parametrize("arch", ARCHS)
def test_channel_variants(arch):
    torch.manual_seed(0)
    for cfg in (tiny(arch, coord_channels=0), tiny(arch, img_channels=4), tiny(arch, img_channels=1)):
        net = build_network(cfg)
        x, c_noise = inputs(cfg, 2, 8, 16)
        y = net(x, c_noise)
        assert y.shape == (2, cfg.img_channels, 8, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_bf16_and_channels_last(arch):
    torch.manual_seed(0)
    cfg = tiny(arch, label_dim=3)
    net = build_network(cfg).eval()
    wake(net)
    x, c_noise = inputs(cfg, 2, 16, 8)
    labels = torch.eye(3)[:2]
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        y_cl = net(x.to(memory_format=torch.channels_last), c_noise, labels)
    torch.testing.assert_close(y_cl, ref, atol=1e-5, rtol=1e-4)

    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x.to(memory_format=torch.channels_last), c_noise, labels)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    y.float().square().sum().backward()
    assert torch.isfinite(net.enc_conv.weight.grad).all() and net.enc_conv.weight.grad.abs().sum() > 0
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.1  # bf16 is close to float32


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_inputs_raise(arch):
    cfg = tiny(arch, channel_mult=(1, 2, 2))  # min_crop 4
    net = build_network(cfg)
    with pytest.raises(ValueError, match=r"6x8 is not a multiple of 4"):
        net(*inputs(cfg, 1, 6, 8))
    with pytest.raises(ValueError, match=r"expected \[N, 5, H, W\]"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="label_dim=0"):
        net(*inputs(cfg, 1, 8, 8), torch.ones(1, 4))


def test_build_network_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown --arch 'unet'"):
        build_network(tiny("unet"))
    with pytest.raises(ValueError, match="resolution=18"):
        build_network(tiny("ddpmpp", resolution=18, channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="num_blocks"):
        build_network(tiny("adm", num_blocks=0))


def test_architecture_details():
    ddpm, ncsn, adm = (build_network(tiny(a, label_dim=2)) for a in ARCHS)
    assert isinstance(ddpm, SongUNet) and isinstance(adm, ADMUNet)
    # DDPM++ vs NCSN++: embedding, progressive input path, resample filter.
    assert "map_noise.freqs" not in ddpm.state_dict() and "map_noise.freqs" in ncsn.state_dict()
    assert ddpm.enc_aux is None and len(ncsn.enc_aux) == 1
    assert ddpm.resample_filter == (1, 1) and ncsn.resample_filter == (1, 3, 3, 1)
    # Label maps as in EDM: DDPM++/NCSN++ with a bias (zero at init), ADM without one.
    assert ddpm.map_label.bias is not None and not ddpm.map_label.bias.any() and adm.map_label.bias is None
    # Attention at level 1 only (plus the bottom block): the encoder block and, in the decoder, the last
    # block of the level (Song) or every block of the level (ADM).
    for net, expected in ((ddpm, 1 + 1 + 1), (adm, 1 + 1 + 2)):
        assert sum(isinstance(m, SelfAttention) for m in net.modules()) == expected
    assert all(b.attn is None for b in adm.enc[0]) and all(b.attn is not None for b in adm.enc[1][1:])
    # ADM heads have 64 channels.
    wide = build_network(tiny("adm", model_channels=64))
    assert wide.mid[0].attn.num_heads == 2  # 128 channels


def test_fourier_buffer_round_trip():
    cfg = tiny("ncsnpp")
    torch.manual_seed(0)
    a = build_network(cfg).eval()
    torch.manual_seed(1)
    b = build_network(cfg).eval()
    b.load_state_dict(a.state_dict())
    x, c_noise = inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(b(x, c_noise), a(x, c_noise), atol=0, rtol=0)


def independent_count(net: torch.nn.Module) -> int:
    buffers = {name for name, _ in net.named_buffers()}
    return sum(v.numel() for k, v in net.state_dict().items() if k not in buffers)


# Measured once; EDM reports 55.73M for DDPM++ at CIFAR-10 and 295.9M for ADM at ImageNet-64.
PRESET_COUNTS = {
    ("ddpmpp", 0): 61_806_723,
    ("ncsnpp", 0): 62_763_395,
    ("adm", 0): 295_134_723,
    ("adm", 1000): 295_902_723,
}


@pytest.mark.parametrize(("arch", "label_dim"), list(PRESET_COUNTS))
def test_preset_parameter_counts(arch, label_dim):
    cfg = network_preset(arch, 64, img_channels=3, coord_channels=2, label_dim=label_dim)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = build_network(cfg)
    n = count_parameters(net)
    assert n == PRESET_COUNTS[arch, label_dim] == independent_count(net)
    low, high = (55e6, 65e6) if arch != "adm" else (280e6, 300e6)
    assert low < n < high


def test_edm_cifar_ddpmpp_count():
    # The EDM paper's DDPM++ at 32x32 (channel_mult 2,2,2, no coordinates): 55.73M parameters.
    cfg = NetworkConfig(arch="ddpmpp", resolution=32, coord_channels=0, channel_mult=(2, 2, 2))
    with torch.device("meta"):
        n = count_parameters(build_network(cfg))
    assert n == 55_732_739
