"""Building blocks shared by the U-Net backbones: init, resampling, noise embeddings, the residual
block with optional self-attention, and the input / label handling every backbone does the same way.

Shapes: images are [N, C, H, W] (either memory format), embeddings [N, E].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff.config import NetworkConfig

InitMode = Literal["xavier_uniform", "kaiming_uniform"]
ResampleMode = Literal["none", "up", "down"]

# Scale of the "zero" init of the last layer of each residual branch and of the output conv: the network
# starts as (nearly) the identity on its skip paths and outputs ~0, yet gradients reach every layer
# from the first step (an exact zero would block them until the first update).
ZERO_INIT = 1e-5


# --------------------------------------------------------------------------- construction helpers


def init_layer(layer: nn.Conv2d | nn.Linear, mode: InitMode, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    """Xavier-uniform with zero bias (Song et al. 2021), or PyTorch's default Kaiming-uniform (as in ADM);
    the weight (and bias) are then multiplied by `scale`."""
    if mode == "xavier_uniform":
        nn.init.xavier_uniform_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    elif mode == "kaiming_uniform":
        layer.reset_parameters()
    else:
        raise ValueError(f"unknown init mode {mode!r}; choose xavier_uniform or kaiming_uniform")
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)
    return layer


def conv(c_in: int, c_out: int, kernel: int, mode: InitMode, scale: float = 1.0) -> nn.Conv2d:
    """A 'same' convolution (odd kernel)."""
    return init_layer(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), mode, scale)


def linear(c_in: int, c_out: int, mode: InitMode, scale: float = 1.0, bias: bool = True) -> nn.Linear:
    return init_layer(nn.Linear(c_in, c_out, bias=bias), mode, scale)


def augment_map(augment_dim: int, c_out: int) -> nn.Linear | None:
    """The augmentation labels' map into the noise embedding (--augment; None without): linear, no bias,
    so the zero label (no transform, as at sampling time) adds nothing. Weights ~ N(0, 1/augment_dim),
    which gives a unit-scale label a unit-scale embedding."""
    if not augment_dim:
        return None
    layer = nn.Linear(augment_dim, c_out, bias=False)
    nn.init.normal_(layer.weight, std=augment_dim**-0.5)
    return layer


def group_norm(
    channels: int, eps: float, max_groups: int = 32, min_channels_per_group: int = 4
) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels; the largest such count dividing `channels`
    (so odd channel counts such as concatenated skips still work)."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


# --------------------------------------------------------------------------- resampling


class Resample(nn.Module):
    """2x up- or downsampling with a separable FIR filter (the 'resample filter' of Song et al. / EDM).

    [1, 1] is a box filter: average pooling down, nearest-neighbour up (computed as such, it is faster).
    Longer filters such as [1, 3, 3, 1] run as a depthwise (transposed) convolution.
    """

    def __init__(self, mode: ResampleMode, resample_filter: tuple[int, ...] = (1, 1)):
        super().__init__()
        if len(resample_filter) % 2:
            raise ValueError(f"resample filter {resample_filter} must have an even length (2x resampling)")
        self.mode = mode
        self.box = tuple(resample_filter) == (1, 1)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f) / f.sum() ** 2  # [k, k], sums to 1
        self.register_buffer("f", f[None, None], persistent=False)  # a constant, not state
        self.pad = (len(resample_filter) - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        if self.box:
            if self.mode == "down":
                return F.avg_pool2d(x, 2)
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        C = x.shape[1]
        w = self.f.to(x.dtype).expand(C, 1, -1, -1).contiguous()  # one filter per channel
        if self.mode == "down":
            return F.conv2d(x, w, stride=2, padding=self.pad, groups=C)
        return F.conv_transpose2d(x, w * 4, stride=2, padding=self.pad, groups=C)  # *4 keeps the mean


# --------------------------------------------------------------------------- noise embeddings


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar (Vaswani et al. 2017), as in DDPM / DDPM++ / ADM:
    [cos(c f_i), sin(c f_i)] with frequencies f_i = max_positions^(-i / half), i = 0 .. half-1; with
    `endpoint`, f_i = max_positions^(-i / (half - 1)), so the last frequency is exactly 1 / max_positions."""

    def __init__(self, num_channels: int, max_positions: float = 10_000.0, endpoint: bool = False):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"embedding size {num_channels} must be even")
        half = num_channels // 2
        steps = max(half - 1, 1) if endpoint else half
        freqs = max_positions ** (-torch.arange(half, dtype=torch.float32) / steps)
        self.register_buffer("freqs", freqs, persistent=False)  # deterministic: not state

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = torch.outer(c.to(torch.float32), self.freqs)  # [N, half]
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (Tancik et al. 2020) as in NCSN++: [cos(2 pi c f_i), sin(2 pi c f_i)] with
    f_i ~ N(0, scale^2) drawn once; they are saved with the weights (a persistent buffer)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"embedding size {num_channels} must be even")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = torch.outer(c.to(torch.float32), (2 * math.pi) * self.freqs)  # [N, half]
        return torch.cat([x.cos(), x.sin()], dim=1)


# --------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels: GroupNorm, 1x1 qkv, fused attention, 1x1 projection.
    Returns the branch only; the caller adds the residual."""

    def __init__(self, channels: int, num_heads: int, eps: float, init: InitMode, qkv_scale: float = 1.0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps)
        self.qkv = conv(channels, 3 * channels, 1, init, qkv_scale)
        self.proj = conv(channels, channels, 1, init, ZERO_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))  # [N, 3C, H, W]
        # Pixels as tokens, head channels last and contiguous (what the fused kernels want); this is a
        # view for channels_last inputs.
        qkv = qkv.permute(0, 2, 3, 1).reshape(N, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, HW, C/heads]
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        a = a.transpose(1, 2).reshape(N, H, W, C).permute(0, 3, 1, 2)  # [N, C, H, W]
        return self.proj(a)


class ResBlock(nn.Module):
    """A U-Net residual block, optionally resampling and optionally followed by self-attention.

        h = conv0(resample(SiLU(GN(x))))
        h = SiLU(GN(h) * (1 + scale) + shift)        adaptive_scale (ADM), or
        h = SiLU(GN(h + shift))                       (DDPM++ / NCSN++), with [scale, shift] = A emb
        x = (conv1(dropout(h)) + skip(resample(x))) * skip_scale
        x = (x + attn(x)) * skip_scale                 if attention

    The skip path is a 1x1 conv when the channel count changes (or, with `resample_proj`, whenever the
    block resamples), otherwise the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        resample: ResampleMode = "none",
        resample_filter: tuple[int, ...] = (1, 1),
        resample_proj: bool = False,  # 1x1 conv on a resampled skip even if channels match (Song et al.)
        adaptive_scale: bool = True,  # scale and shift from the embedding (ADM) or shift only
        attention: bool = False,
        head_channels: int = 0,  # channels per attention head; 0 = a single head
        dropout: float = 0.0,
        skip_scale: float = 1.0,  # 1/sqrt(2) in DDPM++ / NCSN++ keeps the variance of the sum
        eps: float = 1e-5,
        init: InitMode = "xavier_uniform",
        attn_qkv_scale: float = 1.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.adaptive_scale = adaptive_scale
        self.skip_scale = skip_scale
        self.resample = Resample(resample, resample_filter)
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = conv(in_channels, out_channels, 3, init)
        self.affine = linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init)
        self.norm1 = group_norm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(out_channels, out_channels, 3, init, ZERO_INIT)
        needs_proj = out_channels != in_channels or (resample_proj and resample != "none")
        self.skip = conv(in_channels, out_channels, 1, init) if needs_proj else nn.Identity()
        self.attn = None
        if attention:
            heads = 1 if head_channels <= 0 else max(1, out_channels // head_channels)
            while out_channels % heads:
                heads -= 1
            self.attn = SelfAttention(out_channels, heads, eps, init, attn_qkv_scale)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        p = self.affine(emb)[:, :, None, None]  # [N, out or 2*out, 1, 1]
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + p))
        # In place on fresh outputs (conv1's, attention's projection): neither backward needs them.
        x = self.conv1(self.dropout(h)).add_(self.skip(self.resample(x))).mul_(self.skip_scale)
        if self.attn is not None:
            x = self.attn(x).add_(x).mul_(self.skip_scale)
        return x


# --------------------------------------------------------------------------- shared input handling


def check_config(cfg: NetworkConfig) -> None:
    """Reject configurations no backbone can build, naming the field at fault."""
    if cfg.img_channels < 1 or cfg.coord_channels < 0 or cfg.coord_embed < 0:
        raise ValueError(
            f"img_channels={cfg.img_channels} must be >= 1, coord_channels={cfg.coord_channels} and "
            f"coord_embed={cfg.coord_embed} >= 0"
        )
    if cfg.model_channels < 1 or not cfg.channel_mult or min(cfg.channel_mult) < 1:
        raise ValueError(
            f"model_channels={cfg.model_channels} and channel_mult={cfg.channel_mult} must be positive "
            "(channel_mult: one entry per U-Net level)"
        )
    if cfg.num_blocks < 1:
        raise ValueError(f"num_blocks={cfg.num_blocks} must be >= 1")
    if cfg.resolution < 1 or cfg.resolution % cfg.min_crop:
        raise ValueError(
            f"resolution={cfg.resolution} must be a positive multiple of {cfg.min_crop} "
            f"(one halving per level of channel_mult={cfg.channel_mult})"
        )
    if not 0.0 <= cfg.dropout < 1.0 or not 0.0 <= cfg.label_dropout <= 1.0:
        raise ValueError(
            f"dropout={cfg.dropout} must be in [0, 1), label_dropout={cfg.label_dropout} in [0, 1]"
        )


def attention_levels(cfg: NetworkConfig) -> set[int]:
    """U-Net levels (0 = top) whose full-image size R / 2**level is in attn_resolutions. Fixed by level,
    so a crop of any size gets attention at the same depths; resolutions matching no level are unused."""
    return {
        level for level in range(len(cfg.channel_mult)) if cfg.resolution >> level in cfg.attn_resolutions
    }


def check_input(cfg: NetworkConfig, x: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
    """Validate the shapes (host-side only, no device sync); returns noise_labels as [N]."""
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(
            f"network input has shape {tuple(x.shape)}; expected [N, {cfg.in_channels}, H, W] "
            f"(img_channels={cfg.img_channels} + coord_channels={cfg.coord_channels} with "
            f"coord_embed={cfg.coord_embed} frequencies)"
        )
    H, W = x.shape[2], x.shape[3]
    m = cfg.min_crop
    if H % m or W % m or min(H, W) < m:
        raise ValueError(
            f"crop size {H}x{W} is not a multiple of {m}; this network (channel_mult={cfg.channel_mult}) "
            f"needs height and width that are multiples of {m}"
        )
    N = x.shape[0]
    if noise_labels.numel() == 1:
        return noise_labels.reshape(1).expand(N)
    if noise_labels.numel() != N:
        raise ValueError(
            f"noise_labels has shape {tuple(noise_labels.shape)}; expected [{N}] for a batch of {N}"
        )
    return noise_labels.reshape(N)


def label_input(
    cfg: NetworkConfig, class_labels: torch.Tensor | None, N: int, device: torch.device, training: bool
) -> torch.Tensor | None:
    """The [N, label_dim] float32 labels to embed, or None for an unconditional network. None in means the
    null label (zeros); in training each row is zeroed with probability cfg.label_dropout (for
    classifier-free guidance; drawn on the device, no host sync)."""
    if cfg.label_dim == 0:
        if class_labels is not None and class_labels.numel() > 0:
            raise ValueError(
                f"class_labels of shape {tuple(class_labels.shape)} given to an unconditional network "
                "(label_dim=0); build it with label_dim > 0 or pass class_labels=None"
            )
        return None
    if class_labels is None:
        return torch.zeros(N, cfg.label_dim, device=device)
    if tuple(class_labels.shape) != (N, cfg.label_dim):
        raise ValueError(
            f"class_labels has shape {tuple(class_labels.shape)}; expected [{N}, {cfg.label_dim}] "
            f"(one-hot rows, label_dim={cfg.label_dim})"
        )
    class_labels = class_labels.to(torch.float32)
    if training and cfg.label_dropout > 0:
        keep = torch.rand(N, 1, device=class_labels.device) >= cfg.label_dropout
        class_labels = class_labels * keep
    return class_labels
