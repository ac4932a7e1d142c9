"""`patchdiff dataset`: convert images (folder, zip, MNIST IDX, CIFAR-10 tarball) into a training set."""

from __future__ import annotations

import argparse

from patchdiff.data.convert import TRANSFORMS, convert_dataset, parse_resolution


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dataset",
        help="convert images into a training set (zip or folder of same-sized PNGs)",
        description=(
            "Convert an image folder, a zip of images, an MNIST-style *-images-idx3-ubyte[.gz] file (or a "
            "folder holding train-images-idx3-ubyte.gz) or cifar-10-python.tar.gz into a zip or folder of "
            "same-sized PNGs, with dataset.json when there are labels. DEST appears only when complete."
        ),
    )
    p.add_argument(
        "--source",
        required=True,
        metavar="SRC",
        help="folder, .zip, IDX images file, CIFAR-10 tarball, or a Hugging Face data set: a save_to_disk "
        "folder, .parquet file(s) (a glob is fine) or hf:NAME[:SPLIT] (needs patchdiff[hf])",
    )
    p.add_argument("--dest", required=True, metavar="DEST", help="output: a path ending in .zip, or a folder")
    p.add_argument(
        "--resolution", metavar="HxW", help="output size, e.g. 64 or 64x64 (default: keep the size)"
    )
    p.add_argument(
        "--transform",
        choices=TRANSFORMS,
        help="for a different aspect ratio: center-crop (largest centred region), center-crop-wide "
        "(keep the full width; crop rows or add black bars), pad (black borders)",
    )
    p.add_argument("--max-images", type=int, metavar="N", help="stop after N images")
    p.add_argument(
        "--class-folders", action="store_true", help="first-level sub-folder names are class labels"
    )
    p.add_argument("--channels", type=int, choices=(1, 3), help="force grayscale (1) or RGB (3)")
    p.add_argument(
        "--image-column", help="Hugging Face sources: the image column (default: the first Image column)"
    )
    p.add_argument(
        "--label-column",
        help="Hugging Face sources: class labels, ClassLabel / int / names (default: label, labels or class)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("latent space (needs patchdiff[latent])")
    g.add_argument(
        "--vae",
        nargs="?",
        const="stabilityai/sd-vae-ft-ema",
        metavar="ID|PATH",
        help="write a latent set (a folder): encode with this AutoencoderKL, a hub id or a save_pretrained "
        "folder (no value: stabilityai/sd-vae-ft-ema, the paper's)",
    )
    g.add_argument("--shard-size", type=int, default=1000, help="images per shard (the unit of resuming)")
    g.add_argument("--vae-batch", type=int, default=32, help="images per VAE batch")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common = dict(
        resolution=None if args.resolution is None else parse_resolution(args.resolution),
        transform=args.transform,
        max_images=args.max_images,
        class_folders=args.class_folders,
        image_column=args.image_column,
        label_column=args.label_column,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    if args.vae:  # the same images, then encoded once into a latent set (data/latents.py)
        from patchdiff.data.latents import encode_dataset
        from patchdiff.latent import load_vae

        if args.channels == 1:
            raise ValueError("--channels 1 does not apply with --vae: the VAE encodes RGB images")
        vae = load_vae(args.vae, args.device)
        summary = encode_dataset(
            args.source, args.dest, vae, shard_size=args.shard_size, batch=args.vae_batch, **common
        )
    else:
        summary = convert_dataset(args.source, args.dest, channels=args.channels, **common)
    print(summary.line())
    return 0
