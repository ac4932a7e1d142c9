"""A tiny stand-in for Stable Diffusion's VAE and 32x32 images for the latent tests (not a test module)."""

from pathlib import Path

import pytest
from PIL import Image

from patchdiff.demo import make_landscapes

NUM_IMAGES = 10  # in two class folders: a/ (first 6) and b/


def make_tiny_vae(folder: Path) -> Path:
    """An AutoencoderKL with SD's shape (four down blocks: 32 px -> 4x4x4 latents) and few channels,
    random weights, saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(folder)
    return folder


def write_class_images(folder: Path) -> Path:
    for i, image in enumerate(make_landscapes(NUM_IMAGES, 32, seed=3)):
        path = folder / ("a" if i < 6 else "b") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return folder


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def class_images(tmp_path_factory) -> Path:
    return write_class_images(tmp_path_factory.mktemp("images32"))


@pytest.fixture(scope="session")
def latent_set(tiny_vae, class_images, tmp_path_factory) -> Path:
    from patchdiff.data.latents import encode_dataset
    from patchdiff.latent import load_vae

    dest = tmp_path_factory.mktemp("latents") / "set"
    encode_dataset(
        class_images, dest, load_vae(str(tiny_vae), "cpu"), class_folders=True, shard_size=4, progress=False
    )
    return dest


def tiny_vae_path(latent_set: Path) -> str:
    """The VAE a latent set records."""
    import json

    return json.loads((latent_set / "dataset.json").read_text())["vae"]
