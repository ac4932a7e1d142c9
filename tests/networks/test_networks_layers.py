"""The building blocks: resampling, embeddings, attention, the residual block, input checks."""

import math

import pytest
import torch

from patchdiff.config import NetworkConfig
from patchdiff.networks.layers import (
    FourierEmbedding,
    PositionalEmbedding,
    Resample,
    ResBlock,
    SelfAttention,
    attention_levels,
    check_input,
    group_norm,
    label_input,
)


def test_box_resample_equals_fir_box_filter():
    # The fast path for [1, 1] (avg-pool / nearest) must equal the generic depthwise FIR path.
    x = torch.randn(2, 3, 8, 6)
    for mode in ("down", "up"):
        fast = Resample(mode, (1, 1))
        generic = Resample(mode, (1, 1))
        generic.box = False
        torch.testing.assert_close(fast(x), generic(x))
    assert Resample("down", (1, 1))(x).shape == (2, 3, 4, 3)
    assert Resample("up", (1, 1))(x).shape == (2, 3, 16, 12)


def test_fir_resample_shapes_and_keeps_constants():
    x = torch.full((1, 2, 8, 8), 3.0)
    down = Resample("down", (1, 3, 3, 1))(x)
    up = Resample("up", (1, 3, 3, 1))(x)
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    # Away from the zero-padded border a constant stays a constant (the filter sums to 1).
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 3.0))
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))
    assert Resample("none")(x) is x
    with pytest.raises(ValueError, match="even length"):
        Resample("down", (1, 2, 1))


def test_positional_embedding_closed_form():
    emb = PositionalEmbedding(8)
    c = torch.tensor([0.0, 0.5])
    e = emb(c)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = 10_000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(e[1, :4], torch.cos(0.5 * freqs))
    torch.testing.assert_close(e[1, 4:], torch.sin(0.5 * freqs))
    assert "freqs" not in emb.state_dict()  # deterministic, not state


def test_fourier_embedding_is_saved_and_bounded():
    emb = FourierEmbedding(16, scale=16.0)
    assert "freqs" in emb.state_dict()  # random: must travel with the weights
    e = emb(torch.randn(5))
    assert e.shape == (5, 16)
    torch.testing.assert_close(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(5, 8))  # cos^2 + sin^2
    with pytest.raises(ValueError):
        FourierEmbedding(15)


def test_group_norm_divides_channels():
    for c in (16, 48, 144, 1344, 20, 6):
        gn = group_norm(c, 1e-6)
        assert c % gn.num_groups == 0 and gn.num_groups <= 32
    assert group_norm(256, 1e-6).num_groups == 32


def test_attention_matches_explicit_softmax_and_channels_last():
    torch.manual_seed(0)
    attn = SelfAttention(8, num_heads=2, eps=1e-6, init="xavier_uniform")
    torch.nn.init.normal_(attn.proj.weight)  # undo the near-zero init so the branch is visible
    x = torch.randn(2, 8, 4, 3)
    y = attn(x)
    # Reference: per head, softmax(q k^T / sqrt(d)) v over the 12 pixels.
    qkv = attn.qkv(attn.norm(x)).permute(0, 2, 3, 1).reshape(2, 12, 3, 2, 4)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [N, heads, HW, d]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v
    ref = attn.proj(a.transpose(1, 2).reshape(2, 4, 3, 8).permute(0, 3, 1, 2))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn(x.to(memory_format=torch.channels_last)), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("adaptive_scale", [True, False])
def test_resblock_shapes_and_near_identity_init(adaptive_scale):
    x = torch.randn(2, 8, 8, 8)
    emb = torch.randn(2, 32)
    same = ResBlock(8, 8, 32, adaptive_scale=adaptive_scale, skip_scale=1.0)
    # The residual branch starts near zero, so an identity-skip block starts near the identity.
    torch.testing.assert_close(same(x, emb), x, atol=1e-3, rtol=0)
    down = ResBlock(
        8, 16, 32, resample="down", adaptive_scale=adaptive_scale, attention=True, head_channels=8
    )
    up = ResBlock(8, 8, 32, resample="up", resample_filter=(1, 3, 3, 1), resample_proj=True)
    assert down(x, emb).shape == (2, 16, 4, 4)
    assert down.attn is not None and down.attn.num_heads == 2
    assert up(x, emb).shape == (2, 8, 16, 16)
    assert isinstance(up.skip, torch.nn.Conv2d)  # resample_proj: 1x1 conv even with equal channels


def test_attention_levels_follow_full_image_sizes():
    cfg = NetworkConfig(resolution=64, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,))
    assert attention_levels(cfg) == {2}
    cfg = NetworkConfig(resolution=64, channel_mult=(1, 2, 3, 4), attn_resolutions=(32, 16, 8, 12))
    assert attention_levels(cfg) == {1, 2, 3}


def test_check_input_messages():
    cfg = NetworkConfig(resolution=16, channel_mult=(1, 2, 2), coord_channels=2)  # min_crop 4
    x = torch.zeros(2, 5, 8, 12)
    assert check_input(cfg, x, torch.zeros(2)).shape == (2,)
    assert check_input(cfg, x, torch.tensor(0.3)).shape == (2,)  # a scalar is broadcast
    with pytest.raises(ValueError, match=r"6x12 is not a multiple of 4"):
        check_input(cfg, torch.zeros(2, 5, 6, 12), torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected \[N, 5, H, W\]"):
        check_input(cfg, torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_labels"):
        check_input(cfg, x, torch.zeros(3))


def test_label_input_dropout_and_null_label():
    cfg = NetworkConfig(label_dim=3, label_dropout=0.5)
    y = torch.eye(3)[torch.arange(400) % 3]
    assert torch.equal(label_input(cfg, y, 400, y.device, training=False), y)
    torch.manual_seed(0)
    dropped = label_input(cfg, y, 400, y.device, training=True)
    kept = dropped.sum(dim=1)  # 1 for a kept row, 0 for a dropped one
    assert set(kept.tolist()) == {0.0, 1.0}
    assert 120 < kept.sum() < 280  # about half
    assert torch.equal(dropped[kept == 1], y[kept == 1])
    assert torch.equal(label_input(cfg, None, 4, y.device, training=True), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="class_labels"):
        label_input(cfg, torch.zeros(4, 2), 4, y.device, training=False)
    uncond = NetworkConfig(label_dim=0)
    assert label_input(uncond, None, 4, y.device, training=True) is None
    assert label_input(uncond, torch.zeros(4, 0), 4, y.device, training=True) is None
    with pytest.raises(ValueError, match="label_dim=0"):
        label_input(uncond, torch.zeros(4, 3), 4, y.device, training=True)
