"""Typed, frozen configuration: one dataclass per concern, presets, and JSON round trips.

The resolved configuration is written as JSON into every run directory and every snapshot, so a
snapshot alone is enough to rebuild its network (see training/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["ddpmpp", "ncsnpp", "adm"]
ScheduleKind = Literal["stochastic", "progressive", "full"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class NetworkConfig:
    """A backbone. Resolutions in `attn_resolutions` are those of the full image of size `resolution`;
    a crop of size P uses attention at the same U-Net levels (the levels, not the pixel sizes, are fixed)."""

    arch: Arch = "ddpmpp"
    resolution: int = 64  # R: the (square) image or latent size the network is built for
    img_channels: int = 3  # C: image (or latent) channels in and out
    coord_channels: int = 2  # 2 for Patch Diffusion's (x, y) channels, 0 for the baseline/ablation
    label_dim: int = 0  # number of classes; 0 = unconditional
    model_channels: int = 128  # --cbase
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # --cres
    num_blocks: int = 4  # --blocks: residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (16,)  # --attn
    dropout: float = 0.10
    label_dropout: float = 0.0  # probability of dropping the label in training (for guidance)

    @property
    def in_channels(self) -> int:
        return self.img_channels + self.coord_channels

    @property
    def min_crop(self) -> int:
        """Crop sizes must be multiples of this (one halving per U-Net level below the top)."""
        return 2 ** (len(self.channel_mult) - 1)


def network_preset(arch: Arch, resolution: int = 64, **overrides: Any) -> NetworkConfig:
    """The paper presets. DDPM++/NCSN++ as configured by EDM at 64x64; ADM as in Dhariwal & Nichol."""
    if arch in ("ddpmpp", "ncsnpp"):
        base = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,))
    elif arch == "adm":
        base = dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8))
    else:
        raise ValueError(f"unknown --arch {arch!r}; choose one of ddpmpp, ncsnpp, adm")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return NetworkConfig(arch=arch, resolution=resolution, **base)


@dataclass(frozen=True)
class PatchConfig:
    """How crops are drawn (Patch Diffusion, Sec. 3).

    `sizes` empty means the default for the resolution: (R/4, R/2, R) in pixel space, (R/2, R) in
    latent space, with probabilities from `real_p`. `batch_mult` empty means R/P images per crop.
    """

    schedule: ScheduleKind = "stochastic"
    real_p: float = 0.5  # probability of a full-size "crop"
    sizes: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    batch_mult: tuple[float, ...] = ()  # images per step per base image, one per size
    latent: bool = False  # use the latent-space default sizes
    coords: bool = True  # add the coordinate channels


@dataclass(frozen=True)
class LossConfig:
    """EDM training noise distribution, ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    scaling: Literal["mean", "published"] = "mean"  # loss reduction over a crop's pixels, see loss.py


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""
    outdir: str = "runs"
    image_size: tuple[int, ...] = ()  # (H, W) of the training images; filled in from the data set
    network: NetworkConfig = field(default_factory=NetworkConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    duration_kimg: float = 200_000.0  # length in thousands of images, counted as the paper does
    batch: int = 512  # full-size images per step, all processes together
    batch_gpu: int = 0  # per process and accumulation round; 0 = batch / world size (no accumulation)
    lr: float = 10e-4
    lr_rampup_kimg: float = 10_000.0
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float = 0.05  # EMA half-life <= this fraction of images seen (early training)
    cond: bool = False
    xflip: bool = False
    precision: Precision = "fp32"
    seed: int = 0
    tick_kimg: float = 50.0  # log every this many kimg
    snap_ticks: int = 50  # snapshot every this many ticks
    workers: int = 2
    cache: bool = True
    metrics: tuple[str, ...] = ()
    metric_num: int = 1000
    detector: str = ""  # FID detector file; empty = the cached/installed/downloaded default
    metric_ref: str = ""  # reference statistics (.npz); empty = computed from the data once per run
    grad_clip: float = 0.0  # 0 = no clipping
    max_bad_steps: int = 8  # consecutive non-finite losses before the run stops


# --------------------------------------------------------------------------- JSON round trip


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass; tuples come back as tuples, unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} fields {sorted(unknown)}; is this a newer patchdiff's file?"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def from_json(cls: type, text: str) -> Any:
    return from_dict(cls, json.loads(text))
