"""The denoiser backbones: DDPM++ and NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021), all as
configured by EDM. Every backbone is called as

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
from patchdiff.networks.songunet import SongUNet, ddpmpp, ncsnpp

__all__ = ["ARCHITECTURES", "ADMUNet", "SongUNet", "build_network", "count_parameters"]

# The explicit map from cfg.arch to a constructor.
ARCHITECTURES: dict[str, Callable[[NetworkConfig], nn.Module]] = {
    "ddpmpp": ddpmpp,
    "ncsnpp": ncsnpp,
    "adm": ADMUNet,
}


def build_network(cfg: NetworkConfig) -> nn.Module:
    """The backbone named by cfg.arch, freshly initialised (on the CPU, float32)."""
    build = ARCHITECTURES.get(cfg.arch)
    if build is None:
        raise ValueError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return build(cfg)


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters (buffers such as Fourier frequencies are not counted)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
