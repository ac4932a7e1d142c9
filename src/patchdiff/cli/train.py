"""`patchdiff train`: flags -> TrainConfig -> training.loop.train."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys

from patchdiff.config import (
    DIT_SIZES,
    EDM2_SIZES,
    LatentConfig,
    LossConfig,
    PatchConfig,
    TrainConfig,
    network_preset,
)
from patchdiff.presets import TRAIN_PRESETS, add_preset_flag
from patchdiff.training.loggers import parse_logger_names


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


def add_network_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument(
        "--arch",
        choices=["ddpmpp", "ncsnpp", "adm", "dit", "diffusers-unet", "edm2"],
        default="ddpmpp",
        help="backbone preset",
    )
    g.add_argument("--cbase", type=int, help="base channels (preset: 128 ddpmpp/ncsnpp, 192 adm)")
    g.add_argument("--cres", type=int_list, help="channel multipliers per level, e.g. 1,2,2,2")
    g.add_argument("--blocks", type=int, help="residual blocks per level")
    g.add_argument("--attn", type=int_list, help="full-image resolutions with self-attention, e.g. 16")
    g.add_argument("--dropout", type=float, help="dropout probability (preset: 0.10; dit, edm2 0)")
    g.add_argument(
        "--edm2-size",
        choices=list(EDM2_SIZES),
        help="EDM2 preset width/depth (default XS; tiny for a CPU); --cbase etc. override it",
    )
    add_backbone_flags(p)


def add_backbone_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transformer (--arch dit) and diffusers UNet (--arch diffusers-unet)")
    g.add_argument("--dit-size", choices=list(DIT_SIZES), help="DiT preset depth/width/heads (default S)")
    g.add_argument("--depth", type=int, help="DiT blocks (overrides --dit-size)")
    g.add_argument("--width", type=int, help="DiT hidden width (overrides --dit-size)")
    g.add_argument("--heads", type=int, help="DiT attention heads (overrides --dit-size)")
    g.add_argument(
        "--dit-patch", type=int, help="DiT token size p in pixels (2 on latents, 2 or 4 on pixels; default 2)"
    )
    g.add_argument(
        "--init-from",
        help="pretrained diffusers UNet2DModel to fine-tune: a hub id or a save_pretrained folder",
    )
    g.add_argument(
        "--init-snapshot",
        metavar="SNAPSHOT",
        default="",
        help="start a new run from this patchdiff snapshot's network and weights (fine-tuning, e.g. one "
        "made by `patchdiff import`); the network flags then do not apply",
    )
    g.add_argument(
        "--prediction",
        choices=["edm", "epsilon", "v_prediction"],
        help="what the diffusers UNet predicts (default: edm; with --init-from, its scheduler's type)",
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a data set",
        description="Train an EDM denoiser patch-wise (Patch Diffusion). "
        "Run under torchrun for several GPUs or nodes.",
    )
    p.add_argument("--data", required=True, help="data set: a folder or zip made by `patchdiff dataset`")
    p.add_argument("--outdir", required=True, help="where run directories are created")
    add_network_flags(p)
    g = p.add_argument_group("patches")
    g.add_argument(
        "--patch-schedule",
        choices=["stochastic", "progressive", "full", "fixed"],
        default=PatchConfig.schedule,
        help="crop sizes drawn at random (the paper's default), grown with training (our default: best "
        "in docs/evidence.md), whole images (the EDM baseline), or fixed: growing crops for --crop-kimg, "
        "then whole images",
    )
    g.add_argument(
        "--crop-kimg",
        type=float,
        default=0.0,
        help="--patch-schedule fixed: length of the crop phase in kimg; it does not grow with --duration",
    )
    g.add_argument(
        "--min-crop",
        type=int,
        default=0,
        help="leave out the default R/4 crops when R/4 is below this many pixels (e.g. 16: sizes R/2,R at "
        "R=32; 0 = the paper's sizes)",
    )
    g.add_argument(
        "--real-p", type=float, default=PatchConfig.real_p, help="probability (share) of full-size images"
    )
    g.add_argument("--patch-sizes", type=int_list, default=(), help="crop sizes, default R/4,R/2,R")
    g.add_argument("--patch-probs", type=float_list, default=(), help="their probabilities (sum to 1)")
    g.add_argument(
        "--batch-mult", type=float_list, default=(), help="images per base image for each size (default R/P)"
    )
    g.add_argument("--latent", action="store_true", help="latent-space default sizes R/2,R")
    g.add_argument("--no-coords", action="store_true", help="leave out the coordinate channels")
    g.add_argument(
        "--coord-embed",
        type=int,
        metavar="K",
        help="also feed K sine/cosine frequencies of each coordinate (the published --embed_fq; 4K more "
        "input channels; U-Nets only; default 0)",
    )
    g.add_argument(
        "--finish-full",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="train the last SHARE of the images (e.g. 0.3) on whole images (stochastic schedule; see "
        "docs/evidence.md)",
    )
    g.add_argument(
        "--noise-bands",
        action="store_true",
        help="smaller crops train on lower noise levels, whole images on the highest (stochastic "
        "schedule; the overall noise distribution is unchanged; see docs/evidence.md)",
    )
    g.add_argument(
        "--latent-norm",
        choices=["sd", "channel"],
        default="sd",
        help="latent sets: scale by the VAE's 0.18215 (sd, the paper) or per-channel mean/std (channel)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--duration", type=float, default=200_000, help="training length in kimg (fractions allowed)"
    )
    g.add_argument("--batch", type=int, default=512, help="full-size images per step, all processes")
    g.add_argument("--batch-gpu", type=int, default=0, help="per process and round (gradient accumulation)")
    g.add_argument(
        "--lr", type=float, help="Adam learning rate (default 10e-4; edm2 0.012, the paper's XS lr_ref)"
    )
    g.add_argument("--lr-rampup", type=float, default=10_000, help="learning-rate warm-up in kimg")
    g.add_argument(
        "--lr-cooldown",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="decay the learning rate to 0 over the last SHARE of the steps (e.g. 0.2; 0 = off)",
    )
    g.add_argument(
        "--lr-cooldown-shape", choices=["linear", "cosine"], default="linear", help="shape of --lr-cooldown"
    )
    g.add_argument(
        "--ema-unit",
        choices=["images", "steps"],
        default="images",
        help="count --ema and --lr-rampup in images seen (the paper) or in steps of --batch images, so "
        "configurations average over the same steps whatever their crops",
    )
    g.add_argument("--ema", type=float, default=500, help="EMA half-life in kimg")
    g.add_argument(
        "--ema-rampup", type=float, default=0.05, help="EMA half-life cap as a share of images seen"
    )
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="mixed precision (default: bf16 on CUDA, fp32 on a CPU)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network, one static graph per crop size (for GPUs; on a CPU compiling "
        "takes minutes and gained nothing in docs/benchmarks.md)",
    )
    g.add_argument("--grad-clip", type=float, default=0.0, help="gradient norm clip (0 = off)")
    g.add_argument(
        "--lr-schedule",
        choices=["rampup", "isqrt"],
        help="after the warm-up: constant (rampup, the default) or EDM2's lr / sqrt(max(t / t_ref, 1)) "
        "(isqrt, the default with --arch edm2)",
    )
    g.add_argument(
        "--lr-ref-kimg",
        type=float,
        default=0.0,
        help="t_ref of --lr-schedule isqrt in kimg (0 = 70,000 steps of --batch, as in EDM2)",
    )
    g.add_argument(
        "--loss-weighting",
        choices=["edm", "learned"],
        help="EDM's lambda(sigma) (the default), or EDM2's learned log-variance per sigma on top of it "
        "(the default with --arch edm2)",
    )
    g.add_argument(
        "--posthoc-ema",
        type=float_list,
        metavar="SIGMA_REL,...",
        help="power-function EMA profiles stored at every snapshot, for `patchdiff ema` (default none; "
        "0.05,0.10 with --arch edm2; '' = none)",
    )
    g.add_argument("--P-mean", type=float, default=-1.2, help="mean of ln(sigma) in training")
    g.add_argument("--P-std", type=float, default=1.2, help="std of ln(sigma) in training")
    g.add_argument(
        "--loss-scaling",
        choices=["mean", "published"],
        default="mean",
        help="loss per pixel (mean), or per crop summed over its pixels / full-image pixels (published)",
    )
    g = p.add_argument_group("data and conditioning")
    g.add_argument("--cond", action="store_true", help="class-conditional (labels from dataset.json)")
    g.add_argument(
        "--label-dropout",
        type=float,
        default=0.0,
        help="probability of dropping the label, for classifier-free guidance (e.g. 0.1)",
    )
    g.add_argument("--xflip", action="store_true", help="add left-right flipped images")
    g.add_argument(
        "--augment",
        type=float,
        default=0.0,
        help="non-leaking geometric augmentation (EDM): probability of each transform, e.g. 0.12 (0 = off)",
    )
    g.add_argument("--subset", type=int, default=0, help="train on this many images of --data (0 = all)")
    g.add_argument(
        "--subset-seed",
        type=int,
        default=-1,
        help="--subset: the first images (-1) or a random set with this seed",
    )
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--no-cache", action="store_true", help="do not keep decoded images in memory")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--tick", type=float, default=50, help="log every this many kimg")
    g.add_argument("--snap", type=int, default=50, help="snapshot every this many ticks")
    g.add_argument(
        "--checkpoint",
        type=float,
        default=0.0,
        help="also write the resumable state every this many kimg (0 = only the clock and snapshots)",
    )
    g.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=10.0,
        help="write the resumable state at least this often (0 = off): a crash loses at most this much",
    )
    g.add_argument(
        "--grid", type=int, default=64, help="images in the sample grid at each snapshot (0 = none)"
    )
    g.add_argument("--metrics", default="", help="metrics at snapshots, e.g. fid,kid")
    g.add_argument(
        "--metric-num",
        type=int,
        default=TrainConfig.metric_num,
        help="generated images per metric evaluation",
    )
    g.add_argument(
        "--detector", default="", help="FID detector file (default: cached, installed or downloaded)"
    )
    g.add_argument(
        "--metric-ref", default="", help="reference statistics .npz (default: computed from --data once)"
    )
    g.add_argument(
        "--resume",
        help="a training state file, a run directory, or 'auto' (the newest run under --outdir, or a new "
        "run when there is none). A resumed run keeps its saved settings; flags given now override them",
    )
    g.add_argument(
        "--replan",
        action="store_true",
        help="with --resume and a new --duration: move the progressive phase boundaries not yet reached "
        "to where the new duration puts them (by default a resumed run keeps its phases)",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument(
        "--logger",
        action="append",
        default=[],
        metavar="NAME",
        help="also log to tensorboard and/or wandb (repeat or comma-separate; needs patchdiff[NAME])",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and parameter count, write nothing"
    )
    add_preset_flag(p, TRAIN_PRESETS)  # last: it checks the flags it sets exist
    p.set_defaults(func=run)
    # Note which flags this command line gives, so that a resumed run can tell them (which override
    # its saved settings) from defaults (which must not): every action also records its dest.
    for action in p._actions:
        if action.dest not in ("help", "func"):
            action.__class__ = type(type(action).__name__, (type(action),), {"__call__": _record_given})


def _record_given(self, parser, namespace, values, option_string=None):
    super(type(self), self).__call__(parser, namespace, values, option_string)
    namespace.__dict__.setdefault("given_flags", set()).add(self.dest)


# Flags that set a TrainConfig field of another name; a flag named like its field needs no entry, and
# flags that are not settings (--resume, --grid, --device, ...) have none.
FIELD_OF_FLAG = {
    "arch": "network.arch",
    "cbase": "network.model_channels",
    "cres": "network.channel_mult",
    "blocks": "network.num_blocks",
    "attn": "network.attn_resolutions",
    "dropout": "network.dropout",
    "label_dropout": "network.label_dropout",
    "patch_schedule": "patch.schedule",
    "real_p": "patch.real_p",
    "patch_sizes": "patch.sizes",
    "patch_probs": "patch.probs",
    "batch_mult": "patch.batch_mult",
    "latent": "patch.latent",
    "no_coords": "patch.coords",
    "coord_embed": "network.coord_embed",
    "noise_bands": "patch.noise_bands",
    "finish_full": "patch.finish_full",
    "crop_kimg": "patch.crop_kimg",
    "min_crop": "patch.min_crop",
    "duration": "duration_kimg",
    "lr_rampup": "lr_rampup_kimg",
    "ema": "ema_halflife_kimg",
    "ema_rampup": "ema_rampup_ratio",
    "P_mean": "loss.P_mean",
    "P_std": "loss.P_std",
    "loss_scaling": "loss.scaling",
    "loss_weighting": "loss.weighting",
    "tick": "tick_kimg",
    "snap": "snap_ticks",
    "checkpoint": "checkpoint_kimg",
    "no_cache": "cache",
    "depth": "network.depth",
    "width": "network.width",
    "heads": "network.heads",
    "dit_patch": "network.dit_patch",
    "init_from": "network.init_from",
    "prediction": "network.prediction",
    "latent_norm": "latent.norm",
    "logger": "loggers",
}


def explicit_fields(args: argparse.Namespace) -> frozenset[str]:
    """The TrainConfig field paths set by flags given on the command line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    paths = (FIELD_OF_FLAG.get(dest, dest) for dest in getattr(args, "given_flags", ()))
    return frozenset(path for path in paths if "." in path or path in fields)


def default_precision(device: str | None) -> str:
    """bf16 where training runs on CUDA (the --device given, else CUDA when present), fp32 on a CPU."""
    import torch

    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    return "bf16" if on_cuda else "fp32"


EDM2_LR = 0.012  # EDM2's lr_ref for XS (Karras et al. 2024, Table 5)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    net = network_preset(
        args.arch,
        model_channels=args.cbase,
        channel_mult=args.cres,
        num_blocks=args.blocks,
        attn_resolutions=args.attn,
        dropout=args.dropout,
        label_dropout=args.label_dropout,
        dit_size=args.dit_size,
        edm2_size=args.edm2_size,
        depth=args.depth,
        width=args.width,
        heads=args.heads,
        dit_patch=args.dit_patch,
        init_from=args.init_from,
        coord_embed=args.coord_embed,
    )
    if args.coord_embed and args.no_coords:
        raise ValueError(
            f"--coord-embed {args.coord_embed} embeds the coordinates that --no-coords leaves out; drop one"
        )
    network_flags = sorted(
        f for f in getattr(args, "given_flags", ()) if FIELD_OF_FLAG.get(f, "").startswith("network.")
    )
    if args.init_snapshot and network_flags:
        flags = ", ".join("--" + f.replace("_", "-") for f in network_flags)
        raise ValueError(f"--init-snapshot takes the network from the snapshot; drop {flags}")
    if (args.init_from or args.prediction) and args.arch != "diffusers-unet":
        raise ValueError(f"--init-from and --prediction need --arch diffusers-unet, not {args.arch!r}")
    if args.arch == "diffusers-unet" and not args.resume:  # a resumed run keeps its saved network config
        from patchdiff.networks.diffusers_unet import resolve_unet

        net = resolve_unet(net, args.prediction)  # stores the UNet config: snapshots rebuild without the hub
    edm2 = args.arch == "edm2"  # its training dynamics are the defaults (EDM2, Karras et al. 2024)
    patch = PatchConfig(
        schedule=args.patch_schedule,
        real_p=args.real_p,
        sizes=args.patch_sizes,
        probs=args.patch_probs,
        batch_mult=args.batch_mult,
        latent=args.latent,
        coords=not args.no_coords,
        noise_bands=args.noise_bands,
        finish_full=args.finish_full,
        crop_kimg=args.crop_kimg,
        min_crop=args.min_crop,
    )
    return TrainConfig(
        data=args.data,
        outdir=args.outdir,
        network=net,
        patch=patch,
        loss=LossConfig(
            P_mean=args.P_mean,
            P_std=args.P_std,
            scaling=args.loss_scaling,
            weighting=args.loss_weighting or ("learned" if edm2 else "edm"),
        ),
        latent=LatentConfig(norm=args.latent_norm),
        duration_kimg=args.duration,
        batch=args.batch,
        batch_gpu=args.batch_gpu,
        lr=args.lr if args.lr is not None else (EDM2_LR if edm2 else 10e-4),
        lr_rampup_kimg=args.lr_rampup,
        ema_halflife_kimg=args.ema,
        ema_rampup_ratio=args.ema_rampup,
        cond=args.cond,
        xflip=args.xflip,
        precision=args.precision or default_precision(args.device),
        seed=args.seed,
        tick_kimg=args.tick,
        snap_ticks=args.snap,
        workers=args.workers,
        cache=not args.no_cache,
        metrics=tuple(m for m in args.metrics.split(",") if m),
        metric_num=args.metric_num,
        detector=args.detector,
        metric_ref=args.metric_ref,
        grad_clip=args.grad_clip,
        checkpoint_kimg=args.checkpoint,
        checkpoint_minutes=args.checkpoint_minutes,
        loggers=parse_logger_names(args.logger),
        augment=args.augment,
        lr_cooldown=args.lr_cooldown,
        lr_cooldown_shape=args.lr_cooldown_shape,
        ema_unit=args.ema_unit,
        subset=args.subset,
        subset_seed=args.subset_seed,
        init_snapshot=args.init_snapshot,
        lr_schedule=args.lr_schedule or ("isqrt" if edm2 else "rampup"),
        lr_ref_kimg=args.lr_ref_kimg,
        posthoc_ema=args.posthoc_ema if args.posthoc_ema is not None else ((0.05, 0.10) if edm2 else ()),
    )


def run(args: argparse.Namespace) -> int:
    from patchdiff.training.loop import train
    from patchdiff.training.signals import RunInterruptedError

    given = explicit_fields(args)
    cfg = config_from_args(args)
    try:
        run_dir = train(
            cfg,
            resume=args.resume,
            progress=not args.no_progress,
            device=args.device,
            dry_run=args.dry_run,
            grid=args.grid,
            overrides=given,
            compile=args.compile,
            replan=args.replan,
        )
    except RunInterruptedError as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"patchdiff train: {stop}", file=sys.stderr)
        return stop.exit_code
    except OSError as error:  # a missing data set, an unwritable folder, a full disk: one line
        raise RuntimeError(os_error_line(error)) from None
    if run_dir is not None:
        print(f"done: {run_dir}")
    return 0


WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)


def os_error_line(error: OSError) -> str:
    """What failed, in one line: our own messages ("dataset X does not exist") as they are; the
    system's with the file it names, as "cannot write" only when writing is what failed."""
    if error.strerror is None:  # raised with a message of ours: it already says what failed
        return str(error)
    name = f" {error.filename}" if error.filename else ""
    if error.errno in WRITE_ERRORS:
        return f"cannot write{name}: {error.strerror}"
    return f"{name.strip() or 'a file'}: {error.strerror}"
