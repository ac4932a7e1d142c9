"""The denoiser backbones, by --arch: ddpmpp and ncsnpp (DDPM++ and NCSN++, Song et al. 2021) and adm
(ADM, Dhariwal & Nichol 2021), all as configured by EDM; dit (DiT, Peebles & Xie 2023); diffusers-unet
(a diffusers UNet2DModel, new or pretrained); edm2 (EDM2's magnitude-preserving U-Net, Karras et al.
2024). Every backbone is called as

    y = net(x, noise_labels, class_labels=None)
    # x: [N, img_channels + coord_channels, H, W], H and W multiples of cfg.min_crop
    # noise_labels: [N] (EDM's c_noise), class_labels: [N, label_dim] one-hot or None
    # y: [N, img_channels, H, W]
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from patchdiff.config import NetworkConfig
from patchdiff.networks.adm import ADMUNet
from patchdiff.networks.diffusers_unet import DiffusersUNet, load_pretrained
from patchdiff.networks.dit import DiT
from patchdiff.networks.edm2 import EDM2UNet
from patchdiff.networks.songunet import SongUNet, ddpmpp, ncsnpp

__all__ = [
    "ARCHITECTURES",
    "ADMUNet",
    "DiT",
    "DiffusersUNet",
    "EDM2UNet",
    "SongUNet",
    "build_network",
    "count_parameters",
]

# The explicit map from cfg.arch to a constructor.
ARCHITECTURES: dict[str, Callable[[NetworkConfig], nn.Module]] = {
    "ddpmpp": ddpmpp,
    "ncsnpp": ncsnpp,
    "adm": ADMUNet,
    "dit": DiT,
    "diffusers-unet": DiffusersUNet,  # needs diffusers, imported when built
    "edm2": EDM2UNet,
}

# The backbones with an augmentation-label input (--augment, augment.py).
AUGMENT_ARCHITECTURES = ("ddpmpp", "ncsnpp", "adm")


def build_network(cfg: NetworkConfig, pretrained: bool = False) -> nn.Module:
    """The backbone named by cfg.arch, freshly initialised (on the CPU, float32); with `pretrained`, the
    weights of cfg.init_from (training start; a snapshot brings its own weights)."""
    build = ARCHITECTURES.get(cfg.arch)
    if build is None:
        raise ValueError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if cfg.augment_dim and cfg.arch not in AUGMENT_ARCHITECTURES:
        raise ValueError(
            f"--augment needs an augmentation-label input, which --arch {cfg.arch} lacks; "
            f"use --arch {', '.join(AUGMENT_ARCHITECTURES)}, or drop --augment"
        )
    net = build(cfg)
    if pretrained and cfg.init_from:
        if not isinstance(net, DiffusersUNet):
            raise ValueError(f"--init-from needs --arch diffusers-unet, not {cfg.arch!r}")
        load_pretrained(net, cfg.init_from)
    return net


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters (buffers such as Fourier frequencies are not counted)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
