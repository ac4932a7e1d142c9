"""`patchdiff generate`: sample images from a run or snapshot, one PNG per seed (torchrun-aware)."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchdiff import distributed as dist
from patchdiff.canvas import Canvas, centred_canvas, region_canvas
from patchdiff.cli.checks import writable_dir, writable_file
from patchdiff.files import atomic_write
from patchdiff.generation import check_sampling_args, image_grid, iter_images, load, parse_seeds, to_pil
from patchdiff.inpaint import Known
from patchdiff.presets import SAMPLER_PRESETS, add_preset_flag
from patchdiff.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, NETWORK_CALLS, SAMPLERS, resolve_sampler


def add_sampler_flags(p: argparse.ArgumentParser, batch_and_device: bool = True) -> None:
    """The sampler's flags (also `fid calc --model`'s, which has its own --batch and --device)."""
    g = p.add_argument_group("sampler")
    defaults = ", ".join(f"{name} {n} ({NETWORK_CALLS[name](n)} calls)" for name, n in DEFAULT_STEPS.items())
    g.add_argument("--steps", type=int, help=f"sampling steps N (default per sampler: {defaults})")
    g.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        default=DEFAULT_SAMPLER,
        help="EDM Heun (2N-1 calls) or Euler (N), both with churn, or DPM-Solver++ 2M/3M (N calls, "
        "deterministic); see docs/sampling.md (default: %(default)s)",
    )
    g.add_argument(
        "--S-churn", type=float, default=0.0, help="stochasticity (EDM S_churn), 0 = deterministic"
    )
    g.add_argument("--S-min", type=float, default=0.0, help="churn only for sigma >= S_min")
    g.add_argument("--S-max", type=float, default=float("inf"), help="churn only for sigma <= S_max")
    g.add_argument("--S-noise", type=float, default=1.0, help="noise inflation of the churn")
    g.add_argument("--class", dest="class_label", type=int, help="class index (default: random per seed)")
    g.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    if batch_and_device:
        g.add_argument("--batch", type=int, default=32, help="images per batch")
        g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")


def sampler_kwargs(args: argparse.Namespace) -> dict:
    if not (0 <= args.S_churn < math.inf and 0 <= args.S_noise < math.inf and args.S_min <= args.S_max):
        raise ValueError(
            f"--S-churn {args.S_churn}, --S-noise {args.S_noise}: need finite values >= 0, and "
            f"--S-min {args.S_min} <= --S-max {args.S_max}"
        )
    sampler, num_steps = resolve_sampler(args.sampler, args.steps)
    return dict(
        batch_size=args.batch,
        num_steps=num_steps,
        sampler=sampler,
        class_label=args.class_label,
        cfg_scale=args.cfg,
        S_churn=args.S_churn,
        S_min=args.S_min,
        S_max=args.S_max,
        S_noise=args.S_noise,
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample images from a trained model",
        description="Sample with the EDM sampler at full resolution. The image of a seed "
        "does not depend on --batch or the number of processes.",
    )
    p.add_argument(
        "--model", required=True, help="a run directory (newest snapshot) or a snapshot .safetensors"
    )
    p.add_argument("--outdir", required=True, help="folder for the PNG files")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-99 or 1,5,10-12")
    p.add_argument("--grid", help="also write all images as one grid PNG here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampler_flags(p)
    p.add_argument(
        "--vae", metavar="ID|PATH", help="latent models: decode with this VAE, not the recorded one"
    )
    add_preset_flag(p, SAMPLER_PRESETS)
    add_canvas_flags(p)
    p.set_defaults(func=run)


def add_canvas_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "regions, canvases, in- and out-painting (sizes in the model's grid: latent cells for latent models)"
    )
    g.add_argument("--region", metavar="X0,Y0,H,W", help="sample this window of the training frame")
    g.add_argument(
        "--canvas",
        metavar="H,W",
        help="sample a larger frame, the training frame in its middle (coordinates past [-1, 1])",
    )
    g.add_argument(
        "--tile",
        action="store_true",
        help="denoise the canvas as overlapping training-size windows, averaged at every step (MultiDiffusion)",
    )
    g.add_argument("--tile-stride", type=int, help="pixels between tiles (default: half the training size)")
    g.add_argument(
        "--tile-coords",
        choices=["frame", "canvas"],
        default="frame",
        help="each tile gets the training frame's coordinates, or its own part of the canvas' (default: %(default)s)",
    )
    g.add_argument("--init", metavar="IMAGE", help="in-/out-paint around this image (centred in the canvas)")
    g.add_argument(
        "--mask", metavar="MASK", help="with --init: white = generate, black = keep (default: keep all)"
    )
    g.add_argument(
        "--resample", type=int, default=0, help="with --init: resampling rounds per step (RePaint)"
    )


def int_tuple(text: str | None, flag: str, n: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{flag} {text!r}: expected {n} comma-separated integers")
    return values


def canvas_from_args(args: argparse.Namespace, frame: tuple[int, int]) -> Canvas | None:
    region = int_tuple(args.region, "--region", 4)
    size = int_tuple(args.canvas, "--canvas", 2)
    if region and (size or args.tile):
        raise ValueError(
            "--region samples a window of the training frame; it does not combine with --canvas or --tile"
        )
    if region:
        x0, y0, h, w = region
        return region_canvas(frame, x0, y0, h, w)
    if (args.tile_stride is not None or args.tile_coords != "frame") and not args.tile:
        raise ValueError("--tile-stride and --tile-coords need --tile")
    if not size and not args.tile:
        return None
    return centred_canvas(
        frame, *(size or frame), tile=args.tile, stride=args.tile_stride, tile_coords=args.tile_coords
    )


def known_from_args(args: argparse.Namespace, model) -> Known | None:
    if args.init is None:
        for flag, value in (("--mask", args.mask), ("--resample", args.resample or None)):
            if value is not None:
                raise ValueError(f"{flag} {value} needs --init IMAGE")
        return None
    mode = "L" if model.img_channels == 1 else "RGB"
    image = torch.from_numpy(np.asarray(read_image(args.init, "--init").convert(mode)).copy())
    image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
    generate = None
    if args.mask is not None:
        mask = read_image(args.mask, "--mask").convert("L")
        if mask.size != (image.shape[2], image.shape[1]):
            raise ValueError(
                f"--mask {args.mask} is {mask.size[0]}x{mask.size[1]} (WxH) but --init {args.init} is "
                f"{image.shape[2]}x{image.shape[1]}; give them one size"
            )
        generate = torch.from_numpy(np.asarray(mask) >= 128)
    return Known(image.contiguous(), generate, args.resample)


def read_image(path: str, flag: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{flag} {path}: cannot read it as an image ({type(error).__name__}: {error})"
        ) from None
    return image


def run(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)  # cheap checks first: before loading a model or making folders
    outdir = Path(args.outdir)
    dev = dist.init_from_env(args.device)
    if dist.is_main():  # one process probes, so that none removes a probe folder another is using
        writable_dir(outdir, "--outdir")
        if args.grid:
            writable_file(Path(args.grid), "--grid")
    model = load(args.model, dev, vae=args.vae)
    kwargs = sampler_kwargs(args)
    kwargs.update(canvas=canvas_from_args(args, model.image_size), known=known_from_args(args, model))
    check_sampling_args(model, seeds, args.batch, kwargs["num_steps"], args.class_label, args.cfg)
    made_outdir = not outdir.exists()
    outdir.mkdir(parents=True, exist_ok=True)
    mine = seeds[dist.rank() :: dist.world_size()]
    try:
        for batch, images in iter_images(
            model, mine, progress=dist.is_main() and not args.no_progress, **kwargs
        ):
            for seed, image in zip(batch, images.cpu(), strict=True):
                array = image.permute(1, 2, 0).numpy()
                atomic_write(
                    outdir / f"{seed:06d}.png", lambda tmp, a=array: to_pil(a).save(tmp, format="PNG")
                )
    except BaseException:
        if made_outdir:  # a failed run leaves no empty folder behind (finished images are kept)
            with contextlib.suppress(OSError):
                outdir.rmdir()
        raise
    dist.barrier()
    if dist.is_main():
        if args.grid:
            arrays = [np.asarray(Image.open(outdir / f"{s:06d}.png")) for s in seeds]
            stack = torch.from_numpy(np.stack([a if a.ndim == 3 else a[:, :, None] for a in arrays])).permute(
                0, 3, 1, 2
            )
            atomic_write(args.grid, lambda tmp: to_pil(image_grid(stack)).save(tmp, format="PNG"))
        print(f"wrote {len(seeds)} images to {outdir}" + (f" and the grid {args.grid}" if args.grid else ""))
    return 0
