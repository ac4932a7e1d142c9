"""`patchdiff import`: a published Patch Diffusion / EDM network-snapshot-*.pkl -> a patchdiff snapshot,
read without running anything stored in the file."""

from __future__ import annotations

import argparse
import warnings

from patchdiff.interop.snapshot import SD_SCALING, import_published


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "import",
        help="convert a published Patch Diffusion / EDM snapshot (.pkl) safely",
        description="Convert a network-snapshot-*.pkl of the published Patch Diffusion or EDM code "
        "(DDPM++, NCSN++ or ADM; EDMPrecond, Patch_EDMPrecond, VPPrecond or VEPrecond) into a patchdiff snapshot. The pickle is "
        "read by a restricted unpickler: the module source it carries is never run.",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT.pkl", help="the published snapshot")
    p.add_argument(
        "--dest", required=True, help="a .safetensors file, or a folder for snapshot-000000.safetensors"
    )
    p.add_argument(
        "--vae",
        metavar="ID|PATH",
        default="",
        help="latent networks: the VAE whose latents it denoises (the published ImageNet-256 latent "
        "models: stabilityai/sd-vae-ft-ema or -mse); recorded for generate and fid",
    )
    p.add_argument(
        "--latent-scale",
        type=float,
        default=SD_SCALING,
        help="latent networks: the scale z * s the network saw (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path, conv = import_published(args.snapshot, args.dest, vae=args.vae, latent_scale=args.latent_scale)
    net = conv.network
    if net.img_channels not in (1, 3) and not args.vae:
        warnings.warn(
            f"{args.snapshot} denoises {net.img_channels} channels, likely VAE latents; without --vae, "
            "generate and fid calc cannot decode them",
            stacklevel=2,
        )
    print(
        f"wrote {path}: {conv.source} as {net.arch}, {net.resolution}x{net.resolution}x{net.img_channels}"
        + (f", {net.label_dim} classes" if net.label_dim else "")
        + (", coordinates" if net.coord_channels else "")
    )
    return 0
