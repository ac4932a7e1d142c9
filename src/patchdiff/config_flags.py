"""`patchdiff train`'s flags as data, beside the config they set: each flag once, in --help order, with
the TrainConfig field it sets, its help and its check. A setting's default, type and choices are its
field's (config.py); defaults that depend on --arch are config.network_preset's and config.arch_defaults'.
training/flags.py builds the parser from this table and turns flags into a TrainConfig."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from patchdiff.config import (
    DIT_SIZE,
    DIT_SIZES,
    EDM2_SIZE,
    EDM2_SIZES,
    NetworkConfig,
    TrainConfig,
    arch_defaults,
    network_preset,
)


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
            flag(
                "--crop-margin",
                "patch.margin",
                "cut each crop with M more pixels of context on every side that lies inside the image: the "
                "network sees them, the loss ignores them (so a crop has no zero-padded border where the "
                "image has content); whole images are unchanged (0 = off)",
                check=non_negative,
                metavar="M",
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
