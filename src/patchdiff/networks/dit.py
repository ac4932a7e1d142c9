"""DiT: a diffusion transformer with adaLN-Zero blocks (Peebles & Xie, arXiv 2212.09748), as a Patch
Diffusion backbone.

    tokens = PatchEmbed_p(x) + pos(global token centres)                   [N, T, D], T = (h/p)(w/p)
    c      = MLP(timestep_embedding(c_noise)) + W_label y                  [N, D]
    block: (shift, scale, gate) x 2 = Linear(SiLU(c))  (zero-initialised: each block starts as identity)
           x = x + gate1 * Attn(LN(x) (1 + scale1) + shift1)
           x = x + gate2 * MLP(LN(x) (1 + scale2) + shift2)
    out:   Linear(LN(x) (1 + scale) + shift) -> p x p x C per token -> [N, C, h, w]   (zero-initialised)

The token patch size p is named `dit_patch`, apart from the crops that this project calls patches.

Positions. With coordinate channels, the position code of a token is the 2-D sin-cos code (as in DiT)
of its centre, read from the coordinate channels and expressed in units of the FULL image's token
grid: a token of a crop gets exactly the code that the same place has in the full image. This is the
transformer's form of Patch Diffusion's coordinate channels; the channels themselves are not embedded
as pixels. Without coordinate channels (`--no-coords`) the code comes from the crop's local token grid
(0 .. h/p - 1), so a crop looks to the network like the top-left corner of an image.
For non-square images both axes are scaled by `resolution` = min(H, W): the longer axis's positions
are compressed by (R - 1)/(W - 1), the same for a crop as for the full image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.networks.layers import PositionalEmbedding, check_input, label_input

INIT = "xavier_uniform"
FREQ_CHANNELS = 256  # width of the sinusoidal noise-level embedding, as in DiT
MAX_PERIOD = 10_000.0


# --------------------------------------------------------------------------- position codes (pure)


def token_centres(coords: torch.Tensor, p: int, resolution: int) -> torch.Tensor:
    """Global token-grid positions of the tokens of a crop.

    coords [N, 2, h, w] (x, y in [-1, 1] over the full image of size `resolution`) -> [N, 2, h/p, w/p],
    where the full image's tokens sit at 0, 1, ..., resolution/p - 1. A pixel's column is
    (x + 1)/2 (R - 1); a token's mean column is j p + (p - 1)/2."""
    centre = F.avg_pool2d(coords.to(torch.float32), p)  # mean x, y of each token's p x p pixels
    return ((centre + 1) / 2 * (resolution - 1) - (p - 1) / 2) / p


def local_token_grid(n: int, h: int, w: int, device=None) -> torch.Tensor:
    """[n, 2, h, w] positions (x = column, y = row) of an h x w token grid starting at 0."""
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([x, y])[None].expand(n, -1, -1, -1)


def sincos_2d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos code (Vaswani et al. 2017 per axis, as in MAE / DiT): pos [N, 2, h, w] -> [N, h w, dim];
    the first half of the channels codes x, the second y, each as [sin(pos f_i), cos(pos f_i)] with
    f_i = MAX_PERIOD^(-i / (dim/4))."""
    quarter = dim // 4
    freqs = MAX_PERIOD ** (-torch.arange(quarter, dtype=torch.float32, device=pos.device) / quarter)
    angles = pos.flatten(2).transpose(1, 2)[..., None] * freqs  # [N, T, 2, dim/4]
    code = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [N, T, 2, dim/2]
    return code.flatten(2)  # [N, T, dim]: x's code, then y's


# --------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [N, T, D] with a per-sample shift and scale [N, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def zero_linear(c_in: int, c_out: int) -> nn.Linear:
    layer = nn.Linear(c_in, c_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def xavier_linear(c_in: int, c_out: int) -> nn.Linear:
    layer = nn.Linear(c_in, c_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """Self-attention and an MLP, each pre-normed, modulated and gated by the conditioning (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = xavier_linear(width, 3 * width)
        self.proj = xavier_linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            xavier_linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            xavier_linear(hidden, width),
        )
        self.ada = zero_linear(width, 6 * width)  # zero: the block starts as the identity

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, D/heads]
        return self.proj(y.transpose(1, 2).reshape(N, T, D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


# --------------------------------------------------------------------------- the network


def check_dit_config(cfg: NetworkConfig) -> None:
    """Reject what a DiT cannot build, naming the flag at fault."""
    if cfg.depth < 1 or cfg.heads < 1 or cfg.dit_patch < 1:
        raise ValueError(
            f"--depth {cfg.depth}, --heads {cfg.heads} and --dit-patch {cfg.dit_patch} must be positive"
        )
    if cfg.width % cfg.heads or cfg.width % 4:
        raise ValueError(
            f"--width {cfg.width} must be a multiple of --heads {cfg.heads} and of 4 (2-D sin-cos positions)"
        )
    if cfg.resolution < 1 or cfg.resolution % cfg.dit_patch:
        raise ValueError(
            f"resolution {cfg.resolution} must be a positive multiple of --dit-patch {cfg.dit_patch}"
        )
    if cfg.img_channels < 1 or cfg.coord_channels not in (0, 2):
        raise ValueError(
            f"img_channels={cfg.img_channels} must be >= 1 and coord_channels={cfg.coord_channels} 0 or 2"
        )
    if not 0.0 <= cfg.dropout < 1.0 or not 0.0 <= cfg.label_dropout <= 1.0:
        raise ValueError(
            f"dropout={cfg.dropout} must be in [0, 1), label_dropout={cfg.label_dropout} in [0, 1]"
        )
    if cfg.coord_embed:  # its coordinates are token positions already, coded with sines and cosines
        raise ValueError(
            f"--coord-embed {cfg.coord_embed} is for the U-Nets; --arch dit codes positions itself"
        )


class DiT(nn.Module):
    """y = net(x, noise_labels, class_labels): x [N, C + coord_channels, h, w] with h, w multiples of
    dit_patch; any crop size, (h/p)(w/p) tokens."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        check_dit_config(cfg)
        self.cfg = cfg
        D, p, C = cfg.width, cfg.dit_patch, cfg.img_channels
        self.patch_embed = nn.Conv2d(C, D, p, stride=p)  # the coordinates enter as positions, not pixels
        nn.init.xavier_uniform_(self.patch_embed.weight.view(D, -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.map_noise = PositionalEmbedding(FREQ_CHANNELS)
        self.map_time = nn.Sequential(nn.Linear(FREQ_CHANNELS, D), nn.SiLU(), nn.Linear(D, D))
        for layer in self.map_time[::2]:
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        # One-hot labels through a bias-free linear layer: the all-zero row is the null label.
        self.map_label = nn.Linear(cfg.label_dim, D, bias=False) if cfg.label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, dropout=cfg.dropout) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_ada = zero_linear(D, 2 * D)
        self.out = zero_linear(D, p * p * C)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, D] position codes of the tokens of x (see the module docstring)."""
        cfg, p = self.cfg, self.cfg.dit_patch
        N, _, H, W = x.shape
        if cfg.coord_channels:
            pos = token_centres(x[:, cfg.img_channels : cfg.img_channels + 2], p, cfg.resolution)
        else:
            pos = local_token_grid(N, H // p, W // p, x.device)
        return sincos_2d(pos, cfg.width)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg, p, C = self.cfg, self.cfg.dit_patch, self.cfg.img_channels
        noise_labels = check_input(cfg, x, noise_labels)
        labels = label_input(cfg, class_labels, x.shape[0], x.device, self.training)
        N, _, H, W = x.shape
        dtype = self.patch_embed.weight.dtype

        tokens = self.patch_embed(x[:, :C].to(dtype)).flatten(2).transpose(1, 2)  # [N, T, D]
        tokens = tokens + self.positions(x).to(tokens.dtype)
        c = self.map_time(self.map_noise(noise_labels).to(dtype))  # [N, D]
        if self.map_label is not None and labels is not None:
            c = c + self.map_label(labels.to(dtype))
        c = F.silu(c)  # every adaLN projection reads SiLU(c)

        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.out_ada(c).chunk(2, dim=1)
        y = self.out(modulate(self.out_norm(tokens), shift, scale))  # [N, T, p p C]
        # Unpatchify: token (i, j) holds the p x p x C pixels of rows i p .., columns j p ..
        y = y.reshape(N, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(N, C, H, W)
