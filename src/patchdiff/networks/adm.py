"""ADM: the U-Net of Dhariwal & Nichol (arXiv 2105.05233) as configured by EDM
(Karras et al., arXiv 2206.00364, Appendix F.2).

Layout, for L = len(channel_mult) levels, level 0 at full resolution:

    emb = SiLU(W1 SiLU(W0 positional(c_noise)) + W_label y)             [N, 4 * model_channels]
    encoder: conv3x3; per level: (down ResBlock if level > 0) + num_blocks ResBlocks
    bottom:  ResBlock + attention, ResBlock
    decoder: per level from the bottom: (up ResBlock if not the bottom) + num_blocks + 1 ResBlocks on
             [x, encoder skip] concatenated
    out:     conv3x3(SiLU(GN(x)))                                        [N, img_channels, H, W]

Every ResBlock at an attention level is followed by multi-head self-attention with 64-channel heads.
ResBlocks condition by adaptive GroupNorm, GN(h) * (1 + scale) + shift, resample with average pooling /
nearest-neighbour upsampling, and use a plain (unscaled) residual sum; layers start from PyTorch's
default init, the last layer of every residual branch and the output conv from (nearly) zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.networks.layers import (
    ZERO_INIT,
    PositionalEmbedding,
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

INIT = "kaiming_uniform"
HEAD_CHANNELS = 64
EPS = 1e-5


class ADMUNet(nn.Module):
    """The ADM U-Net (class-conditional when cfg.label_dim > 0)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.dropout = cfg.dropout
        mc, L = cfg.model_channels, len(cfg.channel_mult)
        self.emb_channels = emb_channels = 4 * mc
        attn = attention_levels(cfg)

        # Noise and label embedding. The label map acts like an embedding table: a one-hot row picks a
        # column of unit-variance entries; the all-zero row (null label) adds nothing.
        self.map_noise = PositionalEmbedding(mc)
        self.map_layer0 = linear(mc, emb_channels, INIT)
        self.map_layer1 = linear(emb_channels, emb_channels, INIT)
        self.map_label = None
        self.map_augment = augment_map(cfg.augment_dim, mc)  # --augment: added to the noise embedding
        if cfg.label_dim:
            self.map_label = nn.Linear(cfg.label_dim, emb_channels, bias=False)
            nn.init.normal_(self.map_label.weight)

        # Encoder. `skips` tracks the channels of every tensor handed to the decoder.
        c = mc * cfg.channel_mult[0]
        self.enc_conv = conv(cfg.in_channels, c, 3, INIT)
        skips = [c]
        self.enc = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            if level > 0:
                blocks.append(self._block(c, c, resample="down"))
                skips.append(c)
            for _ in range(cfg.num_blocks):
                blocks.append(self._block(c, mc * mult, attention=level in attn))
                c = mc * mult
                skips.append(c)
            self.enc.append(blocks)

        # Bottom, then the decoder from the bottom level up.
        self.mid = nn.ModuleList([self._block(c, c, attention=True), self._block(c, c)])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in reversed(range(L)):
            if level < L - 1:
                self.up.append(self._block(c, c, resample="up"))
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks + 1):
                c_out = mc * cfg.channel_mult[level]
                blocks.append(self._block(c + skips.pop(), c_out, attention=level in attn))
                c = c_out
            self.dec.append(blocks)
        self.out_norm = group_norm(c, EPS)
        self.out_conv = conv(c, cfg.img_channels, 3, INIT, ZERO_INIT)

    def _block(
        self, c_in: int, c_out: int, resample: ResampleMode = "none", attention: bool = False
    ) -> ResBlock:
        if self.cfg.edm_attn_full_heads and c_out < HEAD_CHANNELS:
            attention = False  # as the published code: out // 64 = 0 heads means no attention
        return ResBlock(
            c_in,
            c_out,
            self.emb_channels,
            resample=resample,
            resample_filter=(1, 1),
            resample_proj=False,
            adaptive_scale=True,
            attention=attention,
            head_channels=HEAD_CHANNELS,
            dropout=self.dropout,
            skip_scale=1.0,
            eps=EPS,
            init=INIT,
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
        emb = self.map_noise(noise_labels).to(dtype)  # [N, model_channels]
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and labels is not None:
            emb = emb + self.map_label(labels.to(dtype))
        emb = F.silu(emb)  # [N, emb_channels]

        x = self.enc_conv(x)
        skips = [x]
        for blocks in self.enc:
            for block in blocks:
                x = block(x, emb)
                skips.append(x)

        for block in self.mid:
            x = block(x, emb)
        for i, blocks in enumerate(self.dec):
            if i > 0:
                x = self.up[i - 1](x, emb)
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(x)))
