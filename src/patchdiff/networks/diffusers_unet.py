"""A diffusers `UNet2DModel` as a backbone, new or pretrained (an optional dependency:
`pip install 'patchdiff[diffusers]'`; `import patchdiff` works without it).

- New: `--arch diffusers-unet` lays the UNet out from --cbase/--cres/--blocks/--attn (attention blocks at
  the levels whose full-image size is in --attn) and trains it with EDM's preconditioning.
- Pretrained: `--init-from ID|PATH` (a hub model or a `save_pretrained` folder, with its UNet at the top
  or in `unet/`) reads its config, and its scheduler's prediction type and beta schedule, into the
  NetworkConfig when the run is configured, so a snapshot rebuilds without the hub. The weights are
  loaded when training starts. An epsilon- or v-prediction model is wrapped by precond_vp.VPDenoiser.

The coordinate channels widen `conv_in`: conv([x, coords]) = conv_image(x) + conv_coords(coords), with
conv_coords zero-initialised and bias-free. It is kept as a separate convolution so that a pretrained
model fed the coordinates starts bit for bit as it was (a wider GEMM could sum in another order).
Labels are one-hot, mapped by a zero-initialised bias-free linear layer into the UNet's time embedding
(class_embed_type "identity"): the all-zero row is the null label, and a pretrained unconditional model
starts unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.networks.layers import check_input, label_input

# The parts of a UNet config the NetworkConfig decides at build time (data channels, size, labels).
BUILD_KEYS = ("in_channels", "out_channels", "sample_size", "class_embed_type", "num_class_embeds")


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise RuntimeError(
            "--arch diffusers-unet needs the diffusers package: pip install 'patchdiff[diffusers]'"
        ) from None
    return diffusers


# --------------------------------------------------------------------------- configs (pure)


def layout_config(cfg: NetworkConfig) -> dict[str, Any]:
    """A UNet2DModel layout from the U-Net flags, like DDPM++ at the same settings."""
    levels = range(len(cfg.channel_mult))
    attn = [cfg.resolution >> level in cfg.attn_resolutions for level in levels]
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    return dict(
        block_out_channels=channels,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        layers_per_block=cfg.num_blocks,
        norm_num_groups=math.gcd(32, *channels),  # must divide every level's channels
        attention_head_dim=min(64, cfg.model_channels),
        dropout=cfg.dropout,
    )


def unet_build_config(cfg: NetworkConfig) -> dict[str, Any]:
    """The full UNet2DModel config for cfg: the stored layout plus what the data decide."""
    layout = json.loads(cfg.unet_config) if cfg.unet_config else layout_config(cfg)
    return {
        **layout,
        "in_channels": cfg.img_channels,  # the coordinates come in through conv_in's second conv
        "out_channels": cfg.img_channels,
        "sample_size": cfg.resolution,
        "class_embed_type": "identity" if cfg.label_dim else None,
        "num_class_embeds": None,
    }


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config without its private keys (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# --------------------------------------------------------------------------- the network


class CoordConvIn(nn.Module):
    """conv_in widened by the coordinate channels (see the module docstring)."""

    def __init__(self, image: nn.Conv2d, coord_channels: int):
        super().__init__()
        self.image = image
        self.coords = nn.Conv2d(
            coord_channels, image.out_channels, image.kernel_size, padding=image.padding, bias=False
        )
        nn.init.zeros_(self.coords.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.image.in_channels
        return self.image(x[:, :C]) + self.coords(x[:, C:])


class DiffusersUNet(nn.Module):
    """y = net(x, noise_labels, class_labels) around a UNet2DModel; noise_labels are its timesteps
    (EDM's c_noise, or the discrete t that precond_vp.VPDenoiser passes)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        diffusers = require_diffusers()
        if cfg.coord_channels not in (0, 2) or cfg.img_channels < 1:
            raise ValueError(f"img_channels={cfg.img_channels} must be >= 1, coord_channels 0 or 2")
        if cfg.coord_embed:
            raise ValueError(f"--coord-embed {cfg.coord_embed} is not offered for --arch diffusers-unet")
        self.cfg = cfg
        config = unet_build_config(cfg)
        try:
            self.unet = diffusers.UNet2DModel.from_config(config)
        except (ValueError, TypeError) as error:
            raise ValueError(f"cannot build a UNet2DModel from its config ({error})") from error
        if cfg.coord_channels:
            self.unet.conv_in = CoordConvIn(self.unet.conv_in, cfg.coord_channels)
        emb_dim = self.unet.time_embedding.linear_2.out_features
        self.map_label = nn.Linear(cfg.label_dim, emb_dim, bias=False) if cfg.label_dim else None
        if self.map_label is not None:
            nn.init.zeros_(self.map_label.weight)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        noise_labels = check_input(self.cfg, x, noise_labels)
        labels = label_input(self.cfg, class_labels, x.shape[0], x.device, self.training)
        dtype = self.unet.time_embedding.linear_1.weight.dtype
        emb = self.map_label(labels.to(dtype)) if self.map_label is not None else None
        return self.unet(x.to(dtype), noise_labels, class_labels=emb, return_dict=False)[0]


# --------------------------------------------------------------------------- pretrained models


def _from_pretrained(load, source: str, subfolder: str):
    """load(source) at the top of the folder / repo, else in `subfolder`; one clear line on failure."""
    errors = []
    for kwargs in ({}, {"subfolder": subfolder}):
        try:
            with warnings.catch_warnings():  # diffusers passes hf_hub_download a deprecated argument
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                return load(source, **kwargs)
        except (OSError, ValueError) as error:  # diffusers raises both (EnvironmentError is OSError)
            errors.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    if Path(source).is_dir():
        reason = f"cannot load the {subfolder} from this folder: {errors[-1]}"
    elif hub_offline():
        reason = "no local folder of that name, and the hub is offline (HF_HUB_OFFLINE) with no cached copy"
    else:
        reason = f"no local folder of that name, and the hub model could not be loaded: {errors[-1]}"
    raise ValueError(
        f"--init-from {source!r}: {reason}; pass a folder written by save_pretrained, "
        "or download the model while online"
    )


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def resolve_unet(cfg: NetworkConfig, prediction: str | None = None) -> NetworkConfig:
    """Store the UNet's layout (and, with init_from, the pretrained model's config and VP schedule) in
    the NetworkConfig. prediction: None = the pretrained scheduler's (epsilon if it has none), 'edm'
    for a new UNet."""
    if not cfg.init_from:
        return dataclasses.replace(
            cfg, unet_config=json.dumps(layout_config(cfg)), prediction=prediction or "edm"
        )
    diffusers = require_diffusers()
    unet = clean_config(_from_pretrained(diffusers.UNet2DModel.load_config, cfg.init_from, "unet"))
    if unet.get("time_embedding_type", "positional") != "positional":
        raise ValueError(
            f"--init-from {cfg.init_from!r} has a {unet['time_embedding_type']!r} time embedding (a VE/score "
            "model); only discrete-time DDPM UNets (epsilon or v) are supported"
        )
    if unet.get("num_class_embeds") or unet.get("class_embed_type"):
        raise ValueError(
            f"--init-from {cfg.init_from!r} is a class-conditional UNet ({unet.get('class_embed_type')}); "
            "only unconditional pretrained UNets are supported (labels are added by patchdiff)"
        )
    try:
        sched = clean_config(
            _from_pretrained(diffusers.DDPMScheduler.load_config, cfg.init_from, "scheduler")
        )
    except ValueError:
        sched = {}  # no scheduler saved: DDPM's defaults (linear 1e-4 .. 0.02, 1000 steps, epsilon)
    layout = {k: v for k, v in unet.items() if k not in BUILD_KEYS}
    return dataclasses.replace(
        cfg,
        unet_config=json.dumps(layout),
        prediction=prediction or sched.get("prediction_type", "epsilon"),
        beta_schedule=sched.get("beta_schedule", "linear"),
        beta_start=float(sched.get("beta_start", 0.0001)),
        beta_end=float(sched.get("beta_end", 0.02)),
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
    )


def load_pretrained(net: DiffusersUNet, source: str) -> None:
    """Copy the weights of the pretrained UNet at `source` into net (conv_in's image part included)."""
    diffusers = require_diffusers()
    pretrained = _from_pretrained(diffusers.UNet2DModel.from_pretrained, source, "unet")
    state = pretrained.state_dict()
    if isinstance(net.unet.conv_in, CoordConvIn):
        state = {
            k.replace("conv_in.", "conv_in.image.", 1) if k.startswith("conv_in.") else k: v
            for k, v in state.items()
        }
    own = net.unet.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"--init-from {source!r}: {key} has shape {tuple(value.shape)}, the network {tuple(own[key].shape)}; "
                "do the data's channels match the pretrained model's?"
            )
    missing, unexpected = net.unet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("conv_in.coords.")]
    if missing or unexpected:
        raise ValueError(
            f"--init-from {source!r} does not match its own config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
