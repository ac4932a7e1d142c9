"""A published `network-snapshot-*.pkl` -> a patchdiff snapshot that `generate`, `fid calc --model` and
`train --init-snapshot` load like one written by training."""

from __future__ import annotations

from pathlib import Path

from patchdiff.config import LatentConfig, LossConfig, PatchConfig, TrainConfig
from patchdiff.interop.convert import Converted, convert
from patchdiff.interop.published import read_published

SD_SCALING = 0.18215  # Stable Diffusion's VAE scaling factor, which the published latent models use
VAE_FACTOR = 8  # pixels per latent along each side (Stable Diffusion's VAE)


def snapshot_config(conv: Converted, vae: str = "", latent_scale: float = SD_SCALING) -> TrainConfig:
    """The TrainConfig a patchdiff snapshot of `conv` records. A latent network (`vae` given) sees
    z * latent_scale, as the published latent Patch Diffusion code feeds it."""
    net = conv.network
    R = net.resolution
    latent = LatentConfig()
    if vae:
        C = net.img_channels
        latent = LatentConfig(
            vae=vae, norm="sd", shift=(0.0,) * C, scale=(float(latent_scale),) * C,
            pixel_size=(R * VAE_FACTOR, R * VAE_FACTOR),
        )  # fmt: skip
    return TrainConfig(
        data="",
        image_size=(R, R),
        network=net,
        patch=PatchConfig(coords=net.coord_channels > 0, latent=bool(vae)),
        loss=LossConfig(sigma_data=conv.sigma_data),
        latent=latent,
        cond=net.label_dim > 0,
    )


def import_published(
    source: str | Path, dest: str | Path, vae: str = "", latent_scale: float = SD_SCALING
) -> tuple[Path, Converted]:
    """Read `source` without running it, convert it and write `dest` (a .safetensors file, or a folder
    that gets snapshot-000000.safetensors). Nothing is written unless the conversion succeeds."""
    from patchdiff.denoisers import build_denoiser  # light module import for `patchdiff --help`
    from patchdiff.snapshot import save_snapshot

    dest = Path(dest)
    path = dest if dest.suffix == ".safetensors" else dest / "snapshot-000000.safetensors"
    if path.exists():
        raise ValueError(f"--dest {path} exists; choose another destination")
    conv = convert(read_published(source)["ema"])
    cfg = snapshot_config(conv, vae, latent_scale)
    denoiser = build_denoiser(cfg, pretrained=False)
    denoiser.net.load_state_dict(conv.state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_snapshot(path, denoiser, cfg, kimg=0, imported_from=str(Path(source).name), network=conv.source)
    return path, conv
