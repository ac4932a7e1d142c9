"""Typed, frozen configuration: one dataclass per concern, presets, and JSON round trips.

The resolved configuration is written as JSON into every run directory and every snapshot, so a
snapshot alone is enough to rebuild its network (see snapshot.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
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


# --------------------------------------------------------------------------- `patchdiff train` flags


def comma_list(cast: type, example: str):
    """An argparse type for comma-separated values, e.g. comma_list(int, "1,2,2") for --cres."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in text.split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated values like {example}, got {text!r}"
            ) from None

    return parse


int_list = comma_list(int, "1,2,2")
float_list = comma_list(float, "0.2,0.3,0.5")
str_list = comma_list(str, "fid,kid")


# Checks of a setting's value: what it must be, or None when it is fine.
def positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "a finite number > 0"


def non_negative(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "a finite number >= 0"


def share_of_run(value: float) -> str | None:
    return None if math.isfinite(value) and 0.0 <= value <= 1.0 else "a share of the run in [0, 1]"


@dataclass(frozen=True)
class Flag:
    """One `patchdiff train` flag. `path` is the TrainConfig field it sets ("network.dropout"); a flag
    without one is not a setting (the run's own: --resume, --device, ...; or a preset's choice). A
    setting's default, type and choices are its field's; `preset` ones have no default of their own
    (None) until --arch's presets (network_preset, arch_defaults) or, for --precision, the device
    decide. `negate`: a --no-X switch that sets the field False. `args`: further argparse arguments."""

    name: str
    path: str = ""
    help: str = ""
    check: Callable[[Any], str | None] | None = None
    preset: bool = False
    negate: bool = False
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


def flag(name: str, path: str = "", help: str = "", **kwargs: Any) -> Flag:
    """A Flag; keywords other than check, preset and negate go to argparse."""
    own = {k: kwargs.pop(k) for k in ("check", "preset", "negate") if k in kwargs}
    return Flag(name, path, help, **own, args=MappingProxyType(kwargs))


_DDPMPP, _ADM, _DIT = network_preset("ddpmpp"), network_preset("adm"), network_preset("dit")
_EDM2 = arch_defaults("edm2")

# The command line of `patchdiff train`, in --help order: (group title, flags); "" = no group.
TRAIN_FLAGS: tuple[tuple[str, tuple[Flag, ...]], ...] = (
    (
        "",
        (
            flag("--data", "data", "data set: a folder or zip made by `patchdiff dataset`", required=True),
            flag("--outdir", "outdir", "where run directories are created", required=True),
        ),
    ),
    (
        "network",
        (
            flag("--arch", "network.arch", "backbone preset"),
            flag(
                "--cbase",
                "network.model_channels",
                f"base channels (preset: {_DDPMPP.model_channels} ddpmpp/ncsnpp, {_ADM.model_channels} adm)",
                preset=True,
            ),
            flag(
                "--cres", "network.channel_mult", "channel multipliers per level, e.g. 1,2,2,2", preset=True
            ),
            flag("--blocks", "network.num_blocks", "residual blocks per level", preset=True),
            flag(
                "--attn",
                "network.attn_resolutions",
                "full-image resolutions with self-attention, e.g. 16",
                preset=True,
            ),
            flag(
                "--dropout",
                "network.dropout",
                f"dropout probability (preset: {NetworkConfig.dropout:.2f}; dit, edm2 {_DIT.dropout:g})",
                preset=True,
            ),
            flag(
                "--edm2-size",
                help=f"EDM2 preset width/depth (default {EDM2_SIZE}; tiny for a CPU); --cbase etc. override it",
                choices=list(EDM2_SIZES),
            ),
        ),
    ),
    (
        "transformer (--arch dit) and diffusers UNet (--arch diffusers-unet)",
        (
            flag(
                "--dit-size",
                help=f"DiT preset depth/width/heads (default {DIT_SIZE})",
                choices=list(DIT_SIZES),
            ),
            flag("--depth", "network.depth", "DiT blocks (overrides --dit-size)", preset=True),
            flag("--width", "network.width", "DiT hidden width (overrides --dit-size)", preset=True),
            flag("--heads", "network.heads", "DiT attention heads (overrides --dit-size)", preset=True),
            flag(
                "--dit-patch",
                "network.dit_patch",
                f"DiT token size p in pixels (2 on latents, 2 or 4 on pixels; default {_DIT.dit_patch})",
                preset=True,
            ),
            flag(
                "--init-from",
                "network.init_from",
                "pretrained diffusers UNet2DModel to fine-tune: a hub id or a save_pretrained folder",
            ),
            flag(
                "--init-snapshot",
                "init_snapshot",
                "start a new run from this patchdiff snapshot's network and weights (fine-tuning, e.g. one "
                "made by `patchdiff import`); the network flags then do not apply",
                metavar="SNAPSHOT",
            ),
            flag(
                "--prediction",
                "network.prediction",
                f"what the diffusers UNet predicts (default: {NetworkConfig.prediction}; with --init-from, its "
                "scheduler's type)",
                preset=True,
            ),
        ),
    ),
    (
        "patches",
        (
            flag(
                "--patch-schedule",
                "patch.schedule",
                "crop sizes drawn at random (the paper's default), grown with training (our default: best "
                "in docs/evidence.md), whole images (the EDM baseline), or fixed: growing crops for --crop-kimg, "
                "then whole images",
            ),
            flag(
                "--crop-kimg",
                "patch.crop_kimg",
                "--patch-schedule fixed: length of the crop phase in kimg; it does not grow with --duration",
            ),
            flag(
                "--min-crop",
                "patch.min_crop",
                "leave out the default R/4 crops when R/4 is below this many pixels (e.g. 16: sizes R/2,R at "
                "R=32; 0 = the paper's sizes)",
            ),
            flag("--real-p", "patch.real_p", "probability (share) of full-size images"),
            flag("--patch-sizes", "patch.sizes", "crop sizes, default R/4,R/2,R"),
            flag("--patch-probs", "patch.probs", "their probabilities (sum to 1)"),
            flag("--batch-mult", "patch.batch_mult", "images per base image for each size (default R/P)"),
            flag("--latent", "patch.latent", "latent-space default sizes R/2,R"),
            flag("--no-coords", "patch.coords", "leave out the coordinate channels", negate=True),
            flag(
                "--coord-embed",
                "network.coord_embed",
                "also feed K sine/cosine frequencies of each coordinate (the published --embed_fq; 4K more "
                f"input channels; U-Nets only; default {NetworkConfig.coord_embed})",
                metavar="K",
            ),
            flag(
                "--finish-full",
                "patch.finish_full",
                "train the last SHARE of the images (e.g. 0.3) on whole images (stochastic schedule; see "
                "docs/evidence.md)",
                metavar="SHARE",
            ),
            flag(
                "--noise-bands",
                "patch.noise_bands",
                "smaller crops train on lower noise levels, whole images on the highest (stochastic "
                "schedule; the overall noise distribution is unchanged; see docs/evidence.md)",
            ),
            flag(
                "--latent-norm",
                "latent.norm",
                "latent sets: scale by the VAE's 0.18215 (sd, the paper) or per-channel mean/std (channel)",
            ),
        ),
    ),
    (
        "optimisation",
        (
            flag(
                "--duration", "duration_kimg", "training length in kimg (fractions allowed)", check=positive
            ),
            flag("--batch", "batch", "full-size images per step, all processes", check=positive),
            flag(
                "--batch-gpu",
                "batch_gpu",
                "per process and round (gradient accumulation)",
                check=non_negative,
            ),
            flag(
                "--lr",
                "lr",
                f"Adam learning rate (default {TrainConfig.lr:g}; edm2 {_EDM2['lr']:g}, the paper's XS lr_ref)",
                check=positive,
                preset=True,
            ),
            flag("--lr-rampup", "lr_rampup_kimg", "learning-rate warm-up in kimg", check=non_negative),
            flag(
                "--lr-cooldown",
                "lr_cooldown",
                "decay the learning rate to 0 over the last SHARE of the steps (e.g. 0.2; 0 = off)",
                check=share_of_run,
                metavar="SHARE",
            ),
            flag("--lr-cooldown-shape", "lr_cooldown_shape", "shape of --lr-cooldown"),
            flag(
                "--ema-unit",
                "ema_unit",
                "count --ema and --lr-rampup in images seen (the paper) or in steps of --batch images, so "
                "configurations average over the same steps whatever their crops",
            ),
            flag("--ema", "ema_halflife_kimg", "EMA half-life in kimg", check=non_negative),
            flag(
                "--ema-rampup",
                "ema_rampup_ratio",
                "EMA half-life cap as a share of images seen",
                check=non_negative,
            ),
            flag(
                "--precision",
                "precision",
                "mixed precision (default: bf16 on CUDA, fp32 on a CPU)",
                preset=True,
            ),
            flag(
                "--compile",
                help="torch.compile the network, one static graph per crop size (for GPUs; on a CPU compiling "
                "takes minutes and gained nothing in docs/benchmarks.md)",
                action="store_true",
            ),
            flag("--grad-clip", "grad_clip", "gradient norm clip (0 = off)", check=non_negative),
            flag(
                "--lr-schedule",
                "lr_schedule",
                f"after the warm-up: constant ({TrainConfig.lr_schedule}, the default) or EDM2's lr / "
                f"sqrt(max(t / t_ref, 1)) ({_EDM2['lr_schedule']}, the default with --arch edm2)",
                preset=True,
            ),
            flag(
                "--lr-ref-kimg",
                "lr_ref_kimg",
                "t_ref of --lr-schedule isqrt in kimg (0 = 70,000 steps of --batch, as in EDM2)",
                check=non_negative,
            ),
            flag(
                "--loss-weighting",
                "loss.weighting",
                "EDM's lambda(sigma) (the default), or EDM2's learned log-variance per sigma on top of it "
                "(the default with --arch edm2)",
                preset=True,
            ),
            flag(
                "--posthoc-ema",
                "posthoc_ema",
                "power-function EMA profiles stored at every snapshot, for `patchdiff ema` (default none; "
                f"{','.join(f'{s:.2f}' for s in _EDM2['posthoc_ema'])} with --arch edm2; '' = none)",
                preset=True,
                metavar="SIGMA_REL,...",
            ),
            flag("--P-mean", "loss.P_mean", "mean of ln(sigma) in training"),
            flag("--P-std", "loss.P_std", "std of ln(sigma) in training"),
            flag(
                "--loss-scaling",
                "loss.scaling",
                "loss per pixel (mean), or per crop summed over its pixels / full-image pixels (published)",
            ),
        ),
    ),
    (
        "data and conditioning",
        (
            flag("--cond", "cond", "class-conditional (labels from dataset.json)"),
            flag(
                "--label-dropout",
                "network.label_dropout",
                "probability of dropping the label, for classifier-free guidance (e.g. 0.1)",
            ),
            flag("--xflip", "xflip", "add left-right flipped images"),
            flag(
                "--augment",
                "augment",
                "non-leaking geometric augmentation (EDM): probability of each transform, e.g. 0.12 (0 = off)",
            ),
            flag("--subset", "subset", "train on this many images of --data (0 = all)"),
            flag(
                "--subset-seed",
                "subset_seed",
                "--subset: the first images (-1) or a random set with this seed",
            ),
            flag("--workers", "workers", "DataLoader worker processes", check=non_negative),
            flag("--no-cache", "cache", "do not keep decoded images in memory", negate=True),
        ),
    ),
    (
        "run",
        (
            flag("--seed", "seed", "random seed"),
            flag("--tick", "tick_kimg", "log every this many kimg", check=positive),
            flag("--snap", "snap_ticks", "snapshot every this many ticks", check=non_negative),
            flag(
                "--checkpoint",
                "checkpoint_kimg",
                "also write the resumable state every this many kimg (0 = only the clock and snapshots)",
                check=non_negative,
            ),
            flag(
                "--checkpoint-minutes",
                "checkpoint_minutes",
                "write the resumable state at least this often (0 = off): a crash loses at most this much",
                check=non_negative,
            ),
            flag(
                "--grid", help="images in the sample grid at each snapshot (0 = none)", type=int, default=64
            ),
            flag("--metrics", "metrics", "metrics at snapshots, e.g. fid,kid"),
            flag("--metric-num", "metric_num", "generated images per metric evaluation"),
            flag("--detector", "detector", "FID detector file (default: cached, installed or downloaded)"),
            flag(
                "--metric-ref", "metric_ref", "reference statistics .npz (default: computed from --data once)"
            ),
            flag(
                "--resume",
                help="a training state file, a run directory, or 'auto' (the newest run under --outdir, or a new "
                "run when there is none). A resumed run keeps its saved settings; flags given now override them",
            ),
            flag(
                "--replan",
                help="with --resume and a new --duration: move the progressive phase boundaries not yet reached "
                "to where the new duration puts them (by default a resumed run keeps its phases)",
                action="store_true",
            ),
            flag("--device", help="cpu, cuda, cuda:1 (default: cuda if available)"),
            flag(
                "--logger",
                "loggers",
                "also log to tensorboard and/or wandb (repeat or comma-separate; needs patchdiff[NAME])",
                action="append",
                metavar="NAME",
            ),
            flag("--no-progress", help="no progress bar", action="store_true"),
            flag(
                "--dry-run",
                help="print the resolved config and parameter count, write nothing",
                action="store_true",
            ),
        ),
    ),
)
SETTING_FLAGS: tuple[Flag, ...] = tuple(f for _, flags in TRAIN_FLAGS for f in flags if f.path)


def setting(cfg: Any, path: str) -> Any:
    """The value at a field path such as "network.dropout"."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_settings(cfg: TrainConfig) -> None:
    """Values that would silently train on nonsense (a NaN learning rate, zero steps) are refused, in
    one line that names the flag."""
    for f in SETTING_FLAGS:
        need = f.check(setting(cfg, f.path)) if f.check else None
        if need:
            raise ValueError(f"{f.name} {setting(cfg, f.path)}: must be {need}")


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
