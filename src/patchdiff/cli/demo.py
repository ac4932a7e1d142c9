"""`patchdiff demo`: the README's main job — data made in code, CPU training, samples, loss plot."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny model on toy landscapes made in code (CPU, minutes)",
        description="No download: makes 2000 toy 32x32 landscapes, trains a tiny DDPM++ "
        "with the Patch Diffusion schedule, writes samples.png and loss.png.",
    )
    p.add_argument("--outdir", default="demo-run", help="where everything is written")
    p.add_argument("--kimg", type=float, default=40.0, help="training length in thousands of images")
    p.add_argument("--images", type=int, default=2000, help="size of the toy data set")
    p.add_argument("--samples", type=int, default=64, help="images in the sample grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from patchdiff.demo import run_demo

    out = run_demo(
        args.outdir,
        kimg=args.kimg,
        num_images=args.images,
        progress=not args.no_progress,
        samples=args.samples,
    )
    print(f"trained in {out['train_s']:.0f} s (total {out['total_s']:.0f} s); run: {out['run_dir']}")
    print(
        f"samples: {out['samples']}  data preview: {out['data'].parent / 'data-preview.png'}  "
        f"loss plot: {out['loss_plot']}"
    )
    return 0
