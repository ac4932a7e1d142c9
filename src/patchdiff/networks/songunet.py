"""DDPM++ and NCSN++: the U-Net of Song et al. (arXiv 2011.13456) as configured by EDM
(Karras et al., arXiv 2206.00364, Appendix F.2, Table 7).

Both variants share the layout below; they differ in three places:

                     DDPM++                    NCSN++
    noise embedding  positional (sinusoidal)   random Fourier features, 2x wider
    encoder          standard                  residual: progressive input path
    resample filter  [1, 1] (box)              [1, 3, 3, 1]

Layout, for L = len(channel_mult) levels, level 0 at full resolution:

    emb = SiLU(W1 SiLU(W0 (noise_embedding(c_noise) + W_label sqrt(K) y + b_label)))  [N, 4 * mc]
    encoder: conv3x3; per level: (down ResBlock if level > 0) + num_blocks ResBlocks
    bottom:  ResBlock + attention, ResBlock
    decoder: per level from the bottom: (up ResBlock if not the bottom) + num_blocks + 1 ResBlocks, each
             on [x, encoder skip] concatenated, attention after the last one at attention levels
    out:     conv3x3(SiLU(GN(x)))                                      [N, img_channels, H, W]

ResBlocks add the embedding as a per-channel shift before the second GroupNorm, resample inside the
block (BigGAN style) with a 1x1 conv on the skip path, and scale every residual sum by 1/sqrt(2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.networks.layers import (
    ZERO_INIT,
    FourierEmbedding,
    PositionalEmbedding,
    Resample,
    ResampleMode,
    ResBlock,
    attention_levels,
    augment_map,
    check_config,
    check_input,
    conv,
    group_norm,
    label_input,
    linear,
)

Embedding = Literal["positional", "fourier"]
Encoder = Literal["standard", "residual"]

INIT = "xavier_uniform"
SKIP_SCALE = math.sqrt(0.5)
EPS = 1e-6


class SongUNet(nn.Module):
    """The DDPM++ / NCSN++ U-Net; build it with `ddpmpp(cfg)` or `ncsnpp(cfg)`."""

    def __init__(
        self,
        cfg: NetworkConfig,
        *,
        embedding: Embedding,  # how c_noise is embedded
        encoder: Encoder,  # 'residual' adds NCSN++'s progressive input path
        resample_filter: tuple[int, ...],  # FIR filter of every up/downsampling
        noise_channel_mult: int,  # noise embedding width, in units of model_channels
    ):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.resample_filter = resample_filter
        self.dropout = cfg.dropout
        self.emb_channels = 4 * cfg.model_channels
        if encoder not in ("standard", "residual"):
            raise ValueError(f"unknown encoder {encoder!r}; choose standard or residual")
        # In the order of the layout above: parameters are created, and initialised from the RNG, in it.
        self._build_embedding(embedding, cfg.model_channels * noise_channel_mult)
        c, skips = self._build_encoder(residual=encoder == "residual")
        c = self._build_decoder(c, skips)
        self.out_norm = group_norm(c, EPS)
        self.out_conv = conv(c, cfg.img_channels, 3, INIT, ZERO_INIT)

    def _build_embedding(self, embedding: Embedding, noise_channels: int) -> None:
        """The noise embedding, the label and augmentation maps and the two-layer MLP."""
        cfg = self.cfg
        if embedding == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_channels, endpoint=cfg.edm_noise_endpoint)
        elif embedding == "fourier":
            self.map_noise = FourierEmbedding(noise_channels)
        else:
            raise ValueError(f"unknown noise embedding {embedding!r}; choose positional or fourier")
        # Labels as in EDM: one-hot y enters as y * sqrt(label_dim) through a linear map with a bias (zero at
        # init). The scale gives the one-hot input unit mean square per row, like the noise embedding. The
        # null label stays the all-zero row: it maps to the bias alone, a learned "no class" embedding that
        # label dropout trains and classifier-free guidance uses.
        self.map_label = linear(cfg.label_dim, noise_channels, INIT) if cfg.label_dim else None
        # Augmentation labels (--augment, augment.py): a linear map without bias, so the zero label of
        # sampling (no transform) adds nothing.
        self.map_augment = augment_map(cfg.augment_dim, noise_channels)
        self.map_layer0 = linear(noise_channels, self.emb_channels, INIT)
        self.map_layer1 = linear(self.emb_channels, self.emb_channels, INIT)

    def _build_encoder(self, residual: bool) -> tuple[int, list[int]]:
        """The encoder (with NCSN++'s progressive input path when `residual`); returns its output
        channels and the channels of every tensor it hands to the decoder."""
        cfg, mc, attn = self.cfg, self.cfg.model_channels, attention_levels(self.cfg)
        c = mc
        self.enc_conv = conv(cfg.in_channels, c, 3, INIT)
        skips = [c]
        self.enc = nn.ModuleList()
        self.enc_aux = nn.ModuleList() if residual else None
        c_aux = cfg.in_channels
        for level, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            if level > 0:
                blocks.append(self._block(c, c, resample="down"))
                skips.append(c)
                if self.enc_aux is not None:
                    # Progressive input: the previous level's output, downsampled and projected.
                    if cfg.edm_aux_conv_first:
                        self.enc_aux.append(ConvDown(c_aux, c, self.resample_filter))
                    else:
                        self.enc_aux.append(
                            nn.Sequential(Resample("down", self.resample_filter), conv(c_aux, c, 3, INIT))
                        )
                    c_aux = c
            for _ in range(cfg.num_blocks):
                blocks.append(self._block(c, mc * mult, attention=level in attn))
                c = mc * mult
                skips.append(c)
            self.enc.append(blocks)
        return c, skips

    def _build_decoder(self, c: int, skips: list[int]) -> int:
        """The bottom, then the decoder from the bottom level up; returns its output channels."""
        cfg, mc, attn = self.cfg, self.cfg.model_channels, attention_levels(self.cfg)
        L = len(cfg.channel_mult)
        self.mid = nn.ModuleList([self._block(c, c, attention=True), self._block(c, c)])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in reversed(range(L)):
            if level < L - 1:
                self.up.append(self._block(c, c, resample="up"))
            blocks = nn.ModuleList()
            for i in range(cfg.num_blocks + 1):
                c_out = mc * cfg.channel_mult[level]
                last = i == cfg.num_blocks
                blocks.append(self._block(c + skips.pop(), c_out, attention=last and level in attn))
                c = c_out
            self.dec.append(blocks)
        return c

    def _block(
        self, c_in: int, c_out: int, resample: ResampleMode = "none", attention: bool = False
    ) -> ResBlock:
        return ResBlock(
            c_in,
            c_out,
            self.emb_channels,
            resample=resample,
            resample_filter=self.resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            attention=attention,
            head_channels=0,  # one head over all channels
            dropout=self.dropout,
            skip_scale=SKIP_SCALE,
            eps=EPS,
            init=INIT,
            attn_qkv_scale=math.sqrt(0.2),
        )

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, in_channels, H, W], noise_labels: [N], class_labels: [N, label_dim] or None,
        augment_labels: [N, augment_dim] or None (zeros) -> [N, img_channels, H, W]."""
        noise_labels = check_input(self.cfg, x, noise_labels)
        labels = label_input(self.cfg, class_labels, x.shape[0], x.device, self.training)

        dtype = self.map_layer0.weight.dtype  # float32 unless the whole network was cast
        emb = self.map_noise(noise_labels).to(dtype)  # [N, noise_channels]
        if self.map_label is not None and labels is not None:
            emb = emb + self.map_label(labels.to(dtype) * math.sqrt(self.cfg.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # [N, emb_channels]

        aux = x
        x = self.enc_conv(x)
        skips = [x]
        for level, blocks in enumerate(self.enc):
            for i, block in enumerate(blocks):
                x = block(x, emb)
                if i == 0 and level > 0 and self.enc_aux is not None:
                    x = aux = (x + self.enc_aux[level - 1](aux)) * SKIP_SCALE
                skips.append(x)

        for block in self.mid:
            x = block(x, emb)
        for i, blocks in enumerate(self.dec):
            if i > 0:
                x = self.up[i - 1](x, emb)
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class ConvDown(nn.Module):
    """The progressive input path as the published EDM code builds it (cfg.edm_aux_conv_first): a 3x3
    conv at full resolution, padded by the filter's reach as well, then the FIR filter with stride 2 and
    no further padding. Same output size as Resample("down") followed by the conv, different values."""

    def __init__(self, c_in: int, c_out: int, resample_filter: tuple[int, ...]):
        super().__init__()
        self.pad = (len(resample_filter) - 1) // 2
        self.conv = conv(c_in, c_out, 3, INIT)
        self.conv.padding = (1 + self.pad, 1 + self.pad)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("f", (torch.outer(f, f) / f.sum() ** 2)[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        C = x.shape[1]
        return F.conv2d(x, self.f.to(x.dtype).expand(C, 1, -1, -1), stride=2, groups=C)


def ddpmpp(cfg: NetworkConfig) -> SongUNet:
    """DDPM++ (EDM's 'VP' architecture): positional embedding, standard encoder, [1, 1] filter."""
    return SongUNet(
        cfg, embedding="positional", encoder="standard", resample_filter=(1, 1), noise_channel_mult=1
    )


def ncsnpp(cfg: NetworkConfig) -> SongUNet:
    """NCSN++ (EDM's 'VE' architecture): Fourier embedding, residual encoder, [1, 3, 3, 1] filter."""
    return SongUNet(
        cfg, embedding="fourier", encoder="residual", resample_filter=(1, 3, 3, 1), noise_channel_mult=2
    )
