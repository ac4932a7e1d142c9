"""`patchdiff train`: flags -> TrainConfig -> training.loop.train."""

from __future__ import annotations

import argparse

from patchdiff.config import LossConfig, PatchConfig, TrainConfig, network_preset


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
    g.add_argument("--arch", choices=["ddpmpp", "ncsnpp", "adm"], default="ddpmpp", help="backbone preset")
    g.add_argument("--cbase", type=int, help="base channels (preset: 128 ddpmpp/ncsnpp, 192 adm)")
    g.add_argument("--cres", type=int_list, help="channel multipliers per level, e.g. 1,2,2,2")
    g.add_argument("--blocks", type=int, help="residual blocks per level")
    g.add_argument("--attn", type=int_list, help="full-image resolutions with self-attention, e.g. 16")
    g.add_argument("--dropout", type=float, default=0.10, help="dropout probability")


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
        choices=["stochastic", "progressive", "full"],
        default="stochastic",
        help="crop sizes drawn at random, grown with training, or whole images (the EDM baseline)",
    )
    g.add_argument("--real-p", type=float, default=0.5, help="probability (share) of full-size images")
    g.add_argument("--patch-sizes", type=int_list, default=(), help="crop sizes, default R/4,R/2,R")
    g.add_argument("--patch-probs", type=float_list, default=(), help="their probabilities (sum to 1)")
    g.add_argument(
        "--batch-mult", type=float_list, default=(), help="images per base image for each size (default R/P)"
    )
    g.add_argument("--latent", action="store_true", help="latent-space default sizes R/2,R")
    g.add_argument("--no-coords", action="store_true", help="leave out the coordinate channels")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--duration", type=float, default=200_000, help="training length in kimg (fractions allowed)"
    )
    g.add_argument("--batch", type=int, default=512, help="full-size images per step, all processes")
    g.add_argument("--batch-gpu", type=int, default=0, help="per process and round (gradient accumulation)")
    g.add_argument("--lr", type=float, default=10e-4, help="Adam learning rate")
    g.add_argument("--lr-rampup", type=float, default=10_000, help="learning-rate warm-up in kimg")
    g.add_argument("--ema", type=float, default=500, help="EMA half-life in kimg")
    g.add_argument(
        "--ema-rampup", type=float, default=0.05, help="EMA half-life cap as a share of images seen"
    )
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="mixed precision")
    g.add_argument("--grad-clip", type=float, default=0.0, help="gradient norm clip (0 = off)")
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
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--no-cache", action="store_true", help="do not keep decoded images in memory")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--tick", type=float, default=50, help="log every this many kimg")
    g.add_argument("--snap", type=int, default=50, help="snapshot every this many ticks")
    g.add_argument(
        "--grid", type=int, default=64, help="images in the sample grid at each snapshot (0 = none)"
    )
    g.add_argument("--metrics", default="", help="metrics at snapshots, e.g. fid,kid")
    g.add_argument("--metric-num", type=int, default=10_000, help="generated images per metric evaluation")
    g.add_argument(
        "--detector", default="", help="FID detector file (default: cached, installed or downloaded)"
    )
    g.add_argument(
        "--metric-ref", default="", help="reference statistics .npz (default: computed from --data once)"
    )
    g.add_argument(
        "--resume", help="a training state file, a run directory, or 'auto' (the newest under --outdir)"
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and parameter count, write nothing"
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    net = network_preset(
        args.arch,
        model_channels=args.cbase,
        channel_mult=args.cres,
        num_blocks=args.blocks,
        attn_resolutions=args.attn,
        dropout=args.dropout,
        label_dropout=args.label_dropout,
    )
    patch = PatchConfig(
        schedule=args.patch_schedule,
        real_p=args.real_p,
        sizes=args.patch_sizes,
        probs=args.patch_probs,
        batch_mult=args.batch_mult,
        latent=args.latent,
        coords=not args.no_coords,
    )
    return TrainConfig(
        data=args.data,
        outdir=args.outdir,
        network=net,
        patch=patch,
        loss=LossConfig(P_mean=args.P_mean, P_std=args.P_std, scaling=args.loss_scaling),
        duration_kimg=args.duration,
        batch=args.batch,
        batch_gpu=args.batch_gpu,
        lr=args.lr,
        lr_rampup_kimg=args.lr_rampup,
        ema_halflife_kimg=args.ema,
        ema_rampup_ratio=args.ema_rampup,
        cond=args.cond,
        xflip=args.xflip,
        precision=args.precision,
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
    )


def run(args: argparse.Namespace) -> int:
    from patchdiff.training.loop import train

    cfg = config_from_args(args)
    run_dir = train(
        cfg,
        resume=args.resume,
        progress=not args.no_progress,
        device=args.device,
        dry_run=args.dry_run,
        grid=args.grid,
    )
    if run_dir is not None:
        print(f"done: {run_dir}")
    return 0
