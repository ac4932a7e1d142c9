"""Typed, frozen configuration: one dataclass per concern, presets, and JSON round trips.

The resolved configuration is written as JSON into every run directory and every snapshot, so a
snapshot alone is enough to rebuild its network (see snapshot.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["ddpmpp", "ncsnpp", "adm", "dit", "diffusers-unet", "edm2"]
# What the backbone predicts: EDM's F (preconditioned as in EDM Table 1), or a pretrained VP model's
# noise (epsilon) or velocity (v), wrapped by precond_vp.VPDenoiser.
Prediction = Literal["edm", "epsilon", "v_prediction"]
ScheduleKind = Literal["stochastic", "progressive", "full", "fixed"]
EmaUnit = Literal["images", "steps"]
Precision = Literal["fp32", "bf16", "fp16"]
LatentNorm = Literal["sd", "channel"]


@dataclass(frozen=True)
class NetworkConfig:
    """A backbone. Resolutions in `attn_resolutions` are those of the full image of size `resolution`;
    a crop of size P uses attention at the same U-Net levels (the levels, not the pixel sizes, are fixed)."""

    arch: Arch = "ddpmpp"
    resolution: int = 64  # R: the (square) image or latent size the network is built for
    img_channels: int = 3  # C: image (or latent) channels in and out
    coord_channels: int = 2  # 2 for Patch Diffusion's (x, y) channels, 0 for the baseline/ablation
    coord_embed: int = (
        0  # K sine/cosine frequencies of each coordinate as more inputs (patching.coordinate_features)
    )
    label_dim: int = 0  # number of classes; 0 = unconditional
    model_channels: int = 128  # --cbase
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # --cres
    num_blocks: int = 4  # --blocks: residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (16,)  # --attn
    dropout: float = 0.10
    label_dropout: float = 0.0  # probability of dropping the label in training (for guidance)
    # DiT (arch "dit"): transformer depth, width, attention heads, token patch size p (apart from crops).
    depth: int = 12
    width: int = 384
    heads: int = 6
    dit_patch: int = 2
    # diffusers UNet2DModel (arch "diffusers-unet"): its config as JSON, stored so a snapshot rebuilds
    # without the hub; empty = built from model_channels / channel_mult / num_blocks / attn_resolutions.
    unet_config: str = ""
    init_from: str = ""  # pretrained weights (hub id or save_pretrained folder), loaded at training start
    prediction: Prediction = "edm"
    # The pretrained model's discrete VP schedule (diffusers scheduler config), for prediction != "edm".
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    augment_dim: int = 0  # --augment: length of the augmentation label (augment.AUGMENT_DIM); 0 = none
    # Where networks imported from the published EDM / Patch Diffusion code differ from ours (see
    # interop/convert.py); all False builds our own layout. DDPM++: positional-embedding frequencies
    # spanning max_positions^0 .. max_positions^-1 inclusive. NCSN++: the progressive input's conv runs
    # before its downsampling, not after. ADM: blocks narrower than one 64-channel head get no attention.
    edm_noise_endpoint: bool = False
    edm_aux_conv_first: bool = False
    edm_attn_full_heads: bool = False
    # The preconditioning of D (precond.py): EDM's own, or EDM's VP / VE columns (imported EDM snapshots).
    precond: Literal["edm", "vp", "ve"] = "edm"

    @property
    def in_channels(self) -> int:
        """C image channels, then each coordinate channel and its 2K sines and cosines."""
        return self.img_channels + self.coord_channels * (1 + 2 * self.coord_embed)

    @property
    def min_crop(self) -> int:
        """Crop sizes must be multiples of this (one halving per U-Net level below the top; the token
        patch size of a DiT)."""
        if self.arch == "dit":
            return self.dit_patch
        if self.arch == "diffusers-unet" and self.unet_config:
            return 2 ** (unet_levels(self.unet_config) - 1)
        return 2 ** (len(self.channel_mult) - 1)


@functools.lru_cache(maxsize=8)
def unet_levels(unet_config: str) -> int:
    """Resolution levels of a stored diffusers UNet config (parsed once: min_crop is read every forward)."""
    return len(json.loads(unet_config)["block_out_channels"])


# DiT sizes (Peebles & Xie 2023, Table 1): depth, width, heads; DIT_SIZE when none is named.
DIT_SIZE = "S"
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


# EDM2 sizes (Karras et al. 2024, Table 2 widths; 3 blocks per level, channels 1,2,3,4 x base, attention
# at 16 and 8), and a tiny one for a CPU: model_channels, channel_mult, num_blocks, attn_resolutions;
# EDM2_SIZE when none is named.
EDM2_SIZE = "XS"
EDM2_SIZES: dict[str, tuple[int, tuple[int, ...], int, tuple[int, ...]]] = {
    "XS": (128, (1, 2, 3, 4), 3, (16, 8)),
    "S": (192, (1, 2, 3, 4), 3, (16, 8)),
    "tiny": (32, (1, 2, 2, 2), 1, (16,)),  # laid out like the CPU DDPM++ of benchmarks/throughput.py
}


def network_preset(
    arch: Arch,
    resolution: int = 64,
    dit_size: str | None = None,
    edm2_size: str | None = None,
    **overrides: Any,
) -> NetworkConfig:
    """The paper presets. DDPM++/NCSN++ as configured by EDM at 64x64; ADM as in Dhariwal & Nichol; DiT
    sizes S/B/L/XL (`dit_size`, default S) with patch 2 and no dropout, as in Peebles & Xie; a diffusers
    UNet2DModel laid out like DDPM++ (its attention at 16x16)."""
    if arch in ("ddpmpp", "ncsnpp"):
        base = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,))
    elif arch == "adm":
        base = dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8))
    elif arch == "dit":
        if (dit_size or DIT_SIZE) not in DIT_SIZES:
            raise ValueError(f"unknown --dit-size {dit_size!r}; choose one of {', '.join(DIT_SIZES)}")
        depth, width, heads = DIT_SIZES[dit_size or DIT_SIZE]
        base = dict(depth=depth, width=width, heads=heads, dit_patch=2, dropout=0.0)
    elif arch == "diffusers-unet":
        base = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,))
    elif arch == "edm2":
        if (edm2_size or EDM2_SIZE) not in EDM2_SIZES:
            raise ValueError(f"unknown --edm2-size {edm2_size!r}; choose one of {', '.join(EDM2_SIZES)}")
        mc, mult, blocks, attn = EDM2_SIZES[edm2_size or EDM2_SIZE]
        base = dict(
            model_channels=mc, channel_mult=mult, num_blocks=blocks, attn_resolutions=attn, dropout=0.0
        )
    else:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(typing.get_args(Arch))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return NetworkConfig(arch=arch, resolution=resolution, **base)


def latent_imagenet256_presets() -> dict[str, NetworkConfig]:
    """DiT-B/2 and DiT-XL/2 on ImageNet-256 latents (the SD VAE's 32x32x4), 1000 classes with label
    dropout 0.1 for classifier-free guidance, as in DiT. Not the Patch Diffusion paper's latent runs,
    which used ADM (`--preset imagenet256-latent`): a transformer alternative, untested against it."""
    common = dict(img_channels=4, label_dim=1000, label_dropout=0.1, dit_patch=2)
    return {
        "DiT-B/2": network_preset("dit", 32, dit_size="B", **common),
        "DiT-XL/2": network_preset("dit", 32, dit_size="XL", **common),
    }


@dataclass(frozen=True)
class PatchConfig:
    """How crops are drawn (Patch Diffusion, Sec. 3).

    `sizes` empty means the default for the resolution: (R/4, R/2, R) in pixel space, (R/2, R) in
    latent space, with probabilities from `real_p`. `batch_mult` empty means R/P images per crop
    (sqrt(frame pixels / crop pixels) for an H x W frame; patching.default_batch_mult).
    """

    # progressive: the best crop schedule in every comparison of docs/evidence.md (the paper's default
    # is stochastic; the ImageNet-256 preset keeps it)
    schedule: ScheduleKind = "progressive"
    real_p: float = 0.5  # probability of a full-size "crop"
    sizes: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    batch_mult: tuple[float, ...] = ()  # images per step per base image, one per size
    latent: bool = False  # use the latent-space default sizes
    coords: bool = True  # add the coordinate channels
    noise_bands: bool = False  # smaller crops train on lower noise levels (patching.noise_band)
    finish_full: float = 0.0  # share of the training images, at the end, on whole images (stochastic)
    crop_kimg: float = (
        0.0  # fixed: the crop phases span this many kimg whatever the duration; then whole images
    )
    min_crop: int = 0  # default sizes below this many pixels are left out (their share goes to the next size)
    margin: int = 0  # context around each crop: the network sees it, the loss ignores it (patching.loss_mask)


@dataclass(frozen=True)
class LossConfig:
    """EDM training noise distribution, ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    scaling: Literal["mean", "published"] = "mean"  # loss reduction over a crop's pixels, see loss.py
    weighting: Literal["edm", "learned"] = (
        "edm"  # "learned": EDM2's log-variance weighting (loss_weighting.py)
    )


@dataclass(frozen=True)
class LatentConfig:
    """Latent space (filled in from a latent data set; see latent.py). The network sees (z - shift) * scale
    per channel, z a posterior sample of the VAE; `vae` empty means pixel space."""

    vae: str = ""  # hub id or save_pretrained folder of the AutoencoderKL that made the data
    norm: LatentNorm = "sd"  # "sd": z * 0.18215 (the paper); "channel": per-channel mean/std to sigma_data
    shift: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    pixel_size: tuple[int, ...] = ()  # (H, W) of the decoded images


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""
    outdir: str = "runs"
    image_size: tuple[int, ...] = ()  # (H, W) of the training images; filled in from the data set
    network: NetworkConfig = field(default_factory=NetworkConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
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
    metric_num: int = 10_000  # generated images per metric evaluation (the --metric-num default)
    detector: str = ""  # FID detector file; empty = the cached/installed/downloaded default
    metric_ref: str = ""  # reference statistics (.npz); empty = computed from the data once per run
    grad_clip: float = 0.0  # 0 = no clipping
    max_bad_steps: int = 8  # consecutive non-finite losses before the run stops
    checkpoint_kimg: float = 0.0  # also write the resumable state every this many kimg (0 = off)
    checkpoint_minutes: float = 10.0  # ... and at least this often in wall-clock time (0 = off)
    loggers: tuple[str, ...] = ()  # also log to "tensorboard" and/or "wandb" (training/loggers)
    augment: float = 0.0  # non-leaking geometric augmentation: probability of each transform (augment.py)
    subset: int = 0  # train on this many images of the data set (0 = all; data/subset.py)
    subset_seed: int = -1  # ... the first ones (< 0) or a random choice with this seed
    # A snapshot whose network and weights a new run starts from (fine-tuning, e.g. an imported one).
    init_snapshot: str = ""
    lr_cooldown: float = 0.0  # the learning rate decays to 0 over this last share of the steps (stream.py)
    lr_cooldown_shape: Literal["linear", "cosine"] = "linear"
    ema_unit: EmaUnit = "images"  # "steps": EMA half-life and warm-up in steps of --batch images (stream.py)
    # EDM2 (Karras et al. 2024): "isqrt" divides the learning rate by sqrt(max(images / ref, 1)) after the
    # warm-up, ref = lr_ref_kimg (0: 70,000 steps of `batch`, the paper's t_ref); sigma_rel of the power-
    # function EMA profiles stored at every snapshot for post-hoc EMA (training/posthoc_ema.py; () = none).
    lr_schedule: Literal["rampup", "isqrt"] = "rampup"
    lr_ref_kimg: float = 0.0
    posthoc_ema: tuple[float, ...] = ()


def arch_defaults(arch: str) -> dict[str, Any]:
    """Training settings (field paths) whose default depends on the backbone: with --arch edm2, EDM2's
    own dynamics (Karras et al. 2024): lr_ref of XS (Table 5), the inverse square-root schedule, the
    learned loss weighting and post-hoc EMA profiles. The network's own presets are network_preset's."""
    if arch == "edm2":
        return {"lr": 0.012, "lr_schedule": "isqrt", "loss.weighting": "learned", "posthoc_ema": (0.05, 0.10)}
    return {}


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
