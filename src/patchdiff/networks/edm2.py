"""The magnitude-preserving U-Net of EDM2 (Karras et al., CVPR 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", configuration G), written from the paper.

Every layer keeps the expected magnitude of its activations: a unit-variance input gives a unit-variance
output, at initialisation and throughout training. The pieces (Sec. 3, App. B):

    MP-Conv / MP-Linear  w_hat = w / ||w||  per output channel (forced weight normalisation); the stored
                         weights are also renormalised in place to unit RMS after each optimiser step
                         (`renormalize_weights_`), so their scale cannot drift and Adam's step is relative
    MP-SiLU              silu(x) / 0.596
    MP-Sum(a, b; t)      ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)
    MP-Cat(a, b; t)      [a * (1-t)/sqrt(Na), b * t/sqrt(Nb)] * sqrt((Na + Nb) / ((1 - t)^2 + t^2))
    PixelNorm            x / sqrt(mean_c(x^2) + eps)
    MP-Fourier           sqrt(2) cos(2 pi (f c_noise + phi)), f ~ N(0, 1), phi ~ U(0, 1), both fixed

No GroupNorm, no biases. Layout, for L = len(channel_mult) levels (level 0 at full resolution):

    emb = MP-SiLU(MP-Sum(MP-Linear(MP-Fourier(c_noise)), MP-Linear(sqrt(K) y); 0.5))   [N, cemb]
    in:      x = MP-Conv3x3([x, 1])          the input gets a constant-ones channel (a bias stand-in)
    encoder: per level: (down block if level > 0) + num_blocks blocks, every output kept as a skip
    decoder: level L-1 first: two blocks; each higher level: an up block, then num_blocks + 1 blocks on
             MP-Cat(x, skip; 0.5)
    out:     MP-Conv3x3(x) * gain            gain is learned, zero at initialisation

A block (encoder flavour: resample, 1x1 conv on a channel change, then PixelNorm on the main path;
decoder flavour: resample, the 1x1 conv on the skip path, no PixelNorm):

    y = MP-Conv3x3(MP-SiLU(x));  y = MP-SiLU(y * (1 + MP-Linear(emb) * g));  y = MP-Conv3x3(dropout(y))
    x = MP-Sum(x, y; 0.3);  at attention levels: x = MP-Sum(x, attention(x); 0.3)

Attention is cosine attention: q, k and v are pixel-normalised per head before the dot products.
Resampling is a 2x2 average (down) or nearest neighbour (up), the paper's [1, 1] box filter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.networks.layers import attention_levels, check_config, check_input, label_input

RES_BALANCE = 0.3  # t of the residual MP-Sum (paper: 0.3)
ATTN_BALANCE = 0.3
CONCAT_BALANCE = 0.5
LABEL_BALANCE = 0.5
CHANNELS_PER_HEAD = 64
CLIP_ACT = 256  # activations are clamped to +-256 after each block (the paper's guard for fp16)
EPS = 1e-4

# --------------------------------------------------------------------------- magnitude-preserving math


def normalize(x: torch.Tensor, dim: tuple[int, ...] | None = None, eps: float = EPS) -> torch.Tensor:
    """x scaled to unit RMS over `dim` (default: all but the first): per output channel for weights,
    per pixel over channels for activations (PixelNorm)."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    n = math.prod(x.shape[d] for d in dim)
    return x / (eps + norm / math.sqrt(n)).to(x.dtype)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """PixelNorm over the channels of [N, C, H, W] (or [N, C])."""
    return normalize(x, dim=(1,))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS for a unit normal input (0.596)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Interpolate a -> b by t, rescaled so that unit-variance independent inputs give unit variance."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, dim: int = 1) -> torch.Tensor:
    """Concatenate along `dim`, b weighted by t against a: each half contributes in proportion to its
    balance, not to its channel count, and the result keeps unit RMS."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (C * (1 - t) / math.sqrt(Na)), b * (C * t / math.sqrt(Nb))], dim=dim)


@torch.no_grad()
def renormalize_weights_(module: nn.Module) -> None:
    """Forced weight normalisation of the stored weights (unit RMS per output channel), in place: call it
    after each optimiser step, so the weights' norm cannot grow and Adam's steps stay relative."""
    for m in module.modules():
        if isinstance(m, MPConv):
            m.weight.copy_(normalize(m.weight))


# --------------------------------------------------------------------------- layers


class MPConv(nn.Module):
    """A magnitude-preserving convolution (kernel > 0) or linear map (kernel 0), no bias. The forward pass
    divides each output channel's weights by their norm, so the layer maps unit-variance inputs to
    unit-variance outputs whatever the stored weights are; `gain` scales the output."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        shape = (c_out, c_in, kernel, kernel) if kernel else (c_out, c_in)
        self.weight = nn.Parameter(normalize(torch.randn(shape)))  # stored at unit RMS from the start

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32)) / math.sqrt(self.weight[0].numel())  # unit norm
        w = (w * gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class MPFourier(nn.Module):
    """Fourier features of the noise label with fixed random frequencies and phases (unit variance)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        y = c.to(torch.float32).ger(self.freqs) + self.phases  # [N, channels]
        return y.cos() * math.sqrt(2)


class Block(nn.Module):
    """A residual block (encoder or decoder flavour), optionally resampling, optionally with attention."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        c_emb: int,
        flavor: str,  # "enc": PixelNorm on the main path; "dec": the skip path takes the 1x1 conv
        resample: str = "none",  # "none", "down" (2x2 average) or "up" (nearest)
        attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.flavor, self.resample, self.dropout = flavor, resample, dropout
        self.conv_skip = MPConv(c_in, c_out, 1) if c_in != c_out else None
        c_res = c_out if flavor == "enc" else c_in  # the encoder branch starts after the 1x1 conv
        self.conv_res0 = MPConv(c_res, c_out, 3)
        self.emb_linear = MPConv(c_emb, c_out, 0)
        self.emb_gain = nn.Parameter(torch.zeros([]))  # the embedding's say starts at zero
        self.conv_res1 = MPConv(c_out, c_out, 3)
        self.heads = max(c_out // CHANNELS_PER_HEAD, 1) if attention else 0
        if attention:
            self.attn_qkv = MPConv(c_out, 3 * c_out, 1)
            self.attn_proj = MPConv(c_out, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # [N, c_out]
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, RES_BALANCE)
        if self.heads:
            x = mp_sum(x, self.attend(x), ATTN_BALANCE)
        return x.clamp(-CLIP_ACT, CLIP_ACT)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine self-attention over the pixels of x [N, C, H, W]."""
        N, C, H, W = x.shape
        qkv = normalize(self.attn_qkv(x).reshape(N, self.heads, C // self.heads, 3, H * W), dim=(2,))
        q, k, v = (qkv[:, :, :, i].transpose(2, 3) for i in range(3))  # [N, heads, H*W, C/heads]
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(N, C, H, W)
        return self.attn_proj(y)


class EDM2UNet(nn.Module):
    """The EDM2 U-Net for NetworkConfig(arch="edm2"); called like every backbone (see networks/__init__)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        mc, mults = cfg.model_channels, cfg.channel_mult
        c_emb = mc * max(mults)
        attn = attention_levels(cfg)
        block = dict(c_emb=c_emb, dropout=cfg.dropout)

        self.emb_fourier = MPFourier(mc)
        self.emb_noise = MPConv(mc, c_emb, 0)
        self.emb_label = MPConv(cfg.label_dim, c_emb, 0) if cfg.label_dim else None

        # Encoder; `skips` tracks the channels of every tensor handed to the decoder.
        c = mc * mults[0]
        self.conv_in = MPConv(cfg.in_channels + 1, c, 3)  # + the constant-ones channel
        skips = [c]
        self.enc = nn.ModuleList()
        for level, mult in enumerate(mults):
            if level > 0:
                self.enc.append(Block(c, c, flavor="enc", resample="down", **block))
                skips.append(c)
            for _ in range(cfg.num_blocks):
                self.enc.append(Block(c, mc * mult, flavor="enc", attention=level in attn, **block))
                c = mc * mult
                skips.append(c)

        # Decoder: blocks flagged `cat` take the next skip through MP-Cat first.
        self.dec = nn.ModuleList()
        self.dec_cat: list[bool] = []
        for level in reversed(range(len(mults))):
            if level == len(mults) - 1:
                self.dec.append(Block(c, c, flavor="dec", attention=True, **block))
                self.dec.append(Block(c, c, flavor="dec", **block))
                self.dec_cat += [False, False]
            else:
                self.dec.append(Block(c, c, flavor="dec", resample="up", **block))
                self.dec_cat.append(False)
            for _ in range(cfg.num_blocks + 1):
                c_out = mc * mults[level]
                self.dec.append(Block(c + skips.pop(), c_out, flavor="dec", attention=level in attn, **block))
                self.dec_cat.append(True)
                c = c_out
        self.conv_out = MPConv(c, cfg.img_channels, 3)
        self.out_gain = nn.Parameter(torch.zeros([]))  # the network starts by predicting zero

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [N, in_channels, H, W], noise_labels: [N], class_labels: [N, label_dim] or None
        -> [N, img_channels, H, W]."""
        noise_labels = check_input(self.cfg, x, noise_labels)
        labels = label_input(self.cfg, class_labels, x.shape[0], x.device, self.training)

        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None and labels is not None:
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.cfg.label_dim)), LABEL_BALANCE)
        emb = mp_silu(emb)  # [N, c_emb], float32

        x = self.conv_in(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))
        skips = [x]
        for block in self.enc:
            x = block(x, emb)
            skips.append(x)
        for block, cat in zip(self.dec, self.dec_cat, strict=True):
            if cat:
                x = mp_cat(x, skips.pop(), CONCAT_BALANCE)
            x = block(x, emb)
        return self.conv_out(x, gain=self.out_gain)
