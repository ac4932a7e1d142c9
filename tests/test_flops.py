import pytest
import torch

from patchdiff.config import NetworkConfig, PatchConfig, TrainConfig, network_preset
from patchdiff.flops import (
    attention_backward_flops,
    attention_flops,
    kimg_for_budget,
    schedule_flops_per_image,
    step_flops_per_image,
    training_flops,
)
from patchdiff.patching import resolve_schedule
from patchdiff.precond import Denoiser


class TwoConvs(torch.nn.Module):
    """A conv-only network with the U-Net calling convention, for a closed-form FLOP count."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.a = torch.nn.Conv2d(cin, hidden, 3, padding=1)
        self.b = torch.nn.Conv2d(hidden, cout, 1)

    def forward(self, x, noise_labels, class_labels=None):
        return self.b(torch.relu(self.a(x)))


def test_conv_only_count_matches_closed_form():
    C, hidden, h, w = 3, 8, 6, 10
    denoiser = Denoiser(TwoConvs(C + 2, hidden, C), use_coords=True)
    fa = 2 * (C + 2) * 9 * hidden * h * w  # multiply-adds of the 3x3 conv, per image
    fb = 2 * hidden * C * h * w
    # Backward: the weight gradients of both convs, the input gradient of the second only (the
    # network's input needs no gradient).
    expected = (fa + fb) + fa + 2 * fb
    assert step_flops_per_image(denoiser, C, (h, w), batch=3) == expected


class ConvAttention(torch.nn.Module):
    """A 1x1 conv, then self-attention over the pixels (one head, the channels as its width)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x, noise_labels, class_labels=None):
        N, C, h, w = x.shape
        # [N, heads, tokens, C], contiguous: a strided last dimension would take the unfused (bmm) path.
        t = self.conv(x).reshape(N, 1, C, h * w).transpose(2, 3).contiguous()
        y = torch.nn.functional.scaled_dot_product_attention(t, t, t)
        return y.transpose(2, 3).reshape(N, C, h, w)


def test_attention_is_counted_on_the_cpu():
    """The CPU's fused attention op counts as its closed form 4 B H L^2 D forward (Q K^T and P V) and
    10 B H L^2 D backward, as torch counts the GPU's; before, it counted 0."""
    C, h, w = 4, 3, 5
    L = h * w
    denoiser = Denoiser(ConvAttention(C), use_coords=False)
    conv = 2 * C * C * L  # forward, and again for the weight gradient (the input needs none)
    expected = 2 * conv + 4 * L * L * C + 10 * L * L * C
    assert step_flops_per_image(denoiser, C, (h, w), batch=2) == expected


def test_attention_closed_form_matches_torchs_gpu_formula():
    from torch.utils import flop_counter

    q, k, v = (2, 4, 9, 8), (2, 4, 7, 8), (2, 4, 7, 16)
    assert attention_flops(q, k, v) == flop_counter.sdpa_flop_count(q, k, v) == 2 * 2 * 4 * 9 * 7 * (8 + 16)
    assert attention_backward_flops((2, 4, 9, 16), q, k, v) == flop_counter.sdpa_backward_flop_count(
        (2, 4, 9, 16), q, k, v
    )


def test_half_size_crop_costs_a_quarter_on_a_unet():
    net = network_preset(
        "ddpmpp", 16, img_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()
    )
    from patchdiff.networks import build_network

    torch.manual_seed(0)
    denoiser = Denoiser(build_network(net), use_coords=True)
    full = step_flops_per_image(denoiser, 1, (16, 16))
    half = step_flops_per_image(denoiser, 1, (8, 8))
    assert full > 1e6
    assert half / full == pytest.approx(0.25, abs=0.01)  # only the per-image embedding MLP is size-free


def test_schedule_expectations():
    f = {4: 1.0, 8: 4.0, 16: 16.0}
    stochastic = resolve_schedule(PatchConfig(schedule="stochastic", real_p=0.5), (16, 16))
    # p = (0.2, 0.3, 0.5), images per base image n = (4, 2, 1): sum p n f / sum p n
    assert schedule_flops_per_image(stochastic, f) == pytest.approx((0.8 * 1 + 0.6 * 4 + 0.5 * 16) / 1.9)
    progressive = resolve_schedule(PatchConfig(schedule="progressive", real_p=0.5), (16, 16))
    assert schedule_flops_per_image(progressive, f) == pytest.approx(0.2 * 1 + 0.3 * 4 + 0.5 * 16)
    full = resolve_schedule(PatchConfig(schedule="full"), (16, 16))
    assert schedule_flops_per_image(full, f) == 16.0
    # --finish-full 0.25: the last quarter of the images whole.
    finish = resolve_schedule(PatchConfig(schedule="stochastic", finish_full=0.25), (16, 16))
    expected = 0.75 * schedule_flops_per_image(stochastic, f) + 0.25 * 16.0
    assert schedule_flops_per_image(finish, f) == pytest.approx(expected)


def test_training_flops_of_a_config_and_the_budget_in_kimg():
    net = NetworkConfig(
        resolution=16,
        img_channels=3,
        model_channels=8,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(),
    )
    cfg = TrainConfig(network=net, image_size=(16, 16), duration_kimg=2.0)
    out = training_flops(cfg)
    assert set(out["by_size"]) == {4, 8, 16}
    assert out["by_size"][4] < out["by_size"][8] < out["by_size"][16]
    assert out["total"] == pytest.approx(out["per_image"] * 2000)
    assert kimg_for_budget(out["total"], out["per_image"]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="resolved config"):
        training_flops(TrainConfig(network=net))
    with pytest.raises(ValueError, match="must be > 0"):
        kimg_for_budget(0, 1.0)
