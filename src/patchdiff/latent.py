"""The VAE of latent Patch Diffusion: Stable Diffusion's AutoencoderKL, through diffusers (imported lazily).

The paper trains on the latents of `stabilityai/sd-vae-ft-ema` at 256x256 pixels (32x32x4 latents). Images
are encoded once into the posterior's mean and std (data/latents.py); training draws z = mean + std * eps
each time it uses an image, and the network sees x = (z - shift) * scale per channel:

    norm "sd":      shift 0, scale = the VAE's scaling_factor (0.18215), as the paper and Stable Diffusion
    norm "channel": shift = E[z_c], scale = sigma_data / std(z_c), as EDM2 does

Generated x go back through z = x / scale + shift and the decoder, where images leave the library.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchdiff.config import LatentConfig, TrainConfig

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the paper's VAE
INSTALL = 'pip install "patchdiff[latent]"'


class VAEUnavailableError(RuntimeError):
    """diffusers is missing, or the VAE cannot be found."""


def import_autoencoder() -> type:
    """diffusers' AutoencoderKL, or a one-line error saying what to install."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise VAEUnavailableError(
            f"latent space needs diffusers, which is not installed ({error}); {INSTALL}"
        ) from error
    return AutoencoderKL


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- the scaling (pure functions)


def latent_scaling(
    norm: str,
    scaling_factor: float,
    channel_mean: tuple[float, ...],
    channel_std: tuple[float, ...],
    sigma_data: float,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(shift, scale) per channel for the normalisation `norm` (see the module docstring)."""
    C = len(channel_mean)
    if norm == "sd":
        return (0.0,) * C, (float(scaling_factor),) * C
    if norm == "channel":
        return tuple(map(float, channel_mean)), tuple(sigma_data / max(float(s), 1e-8) for s in channel_std)
    raise ValueError(f"--latent-norm {norm!r}: choose sd or channel")


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def to_network(z: torch.Tensor, latent: LatentConfig) -> torch.Tensor:
    """VAE latents -> what the network denoises: (z - shift) * scale."""
    return (z - _per_channel(latent.shift, z)) * _per_channel(latent.scale, z)


def from_network(x: torch.Tensor, latent: LatentConfig) -> torch.Tensor:
    """The inverse of to_network."""
    return x / _per_channel(latent.scale, x) + _per_channel(latent.shift, x)


def prepare_batch(data: torch.Tensor, device: torch.device, cfg: TrainConfig) -> torch.Tensor:
    """A training batch of crops (or whole images) -> the network's input, float32 on `device`.

    Pixels: uint8 [B, C, h, w] -> [-1, 1]. Latents: float16 [B, 2, C, h, w] (posterior mean, std, cut at
    the same place) -> a fresh posterior sample of the crop, scaled. eps comes from the global torch RNG,
    which the loop seeds per (seed, rank, step), so a resumed run draws the same latents."""
    data = data.to(device, non_blocking=True)
    if not cfg.latent.vae:
        return data.to(torch.float32) / 127.5 - 1
    mean, std = data.to(torch.float32).unbind(1)
    return to_network(mean + std * torch.randn_like(mean), cfg.latent)


# --------------------------------------------------------------------------- the VAE


@dataclass
class VAE:
    """An AutoencoderKL in eval mode, with where it came from. Pixels are floats in [-1, 1]."""

    model: Any
    source: str  # the hub id or the folder it was loaded from
    device: torch.device

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion's VAE)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] -> the posterior's (mean, std), float32 [B, C, H/f, W/f] on the CPU."""
        x = images.to(self.device).to(torch.float32) / 127.5 - 1
        posterior = self.model.encode(x).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> pixels float32 [B, 3, h*f, w*f] in about [-1, 1], on z's device."""
        return self.model.decode(z.to(self.device, torch.float32)).sample.float().to(z.device)


def load_vae(source: str, device: str | torch.device | None = None) -> VAE:
    """An AutoencoderKL from a folder written by `save_pretrained`, or from the Hugging Face hub (or its
    cache). Weights load from safetensors only (never pickles)."""
    AutoencoderKL = import_autoencoder()
    device = torch.device(device) if device else default_device()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--vae {source}: the folder has no config.json; write it with AutoencoderKL.save_pretrained"
            )
        model = AutoencoderKL.from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False)
        source = str(path.resolve())
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(
            f"--vae {source}: not a save_pretrained folder nor a hub id like {DEFAULT_VAE}"
        )
    else:
        try:
            with warnings.catch_warnings():  # huggingface_hub's own deprecation notices are not the user's
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                model = AutoencoderKL.from_pretrained(source, use_safetensors=True, low_cpu_mem_usage=False)
        except (OSError, ValueError) as error:  # hub errors subclass OSError; offline misses too
            cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
            raise VAEUnavailableError(
                f"--vae {source}: cannot load it from the hub or from the cache under HF_HOME={cache} "
                f"({type(error).__name__}); download it once where there is a network (it lands in the "
                f"HF_HOME cache; HF_HUB_OFFLINE=1 then uses the cache only), or pass a folder written by "
                f"AutoencoderKL.save_pretrained"
            ) from None
    return VAE(model.to(device).eval().requires_grad_(False), source, device)


def decode_to_pixels(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Samples of a generation.Model -> pixels in [-1, 1]; latents go through the model's VAE (loaded on
    first use from the snapshot's record, unless the caller gave one)."""
    latent = model.config.latent
    if not latent.vae:
        return x
    if model.vae is None:
        model.vae = load_vae(latent.vae, model.device)
    return model.vae.decode(from_network(x, latent))
