"""A TrainConfig -> the denoiser D(x; sigma) it describes: the network wrapped in its preconditioning.

Training, sampling, FLOP counting and the importer all build their denoiser here.
"""

from __future__ import annotations

from patchdiff.config import TrainConfig
from patchdiff.loss_weighting import LogVar
from patchdiff.networks import build_network
from patchdiff.precond import Denoiser
from patchdiff.precond_vp import VPDenoiser


def build_denoiser(cfg: TrainConfig, pretrained: bool = True) -> Denoiser | VPDenoiser:
    """pretrained: load cfg.network.init_from's weights (at training start; load() passes False)."""
    net = build_network(cfg.network, pretrained=pretrained)
    learned = cfg.loss.weighting == "learned"
    if cfg.network.prediction != "edm":  # a pretrained epsilon / v network
        if learned:
            raise ValueError("--loss-weighting learned needs an EDM network, not --prediction epsilon/v")
        return VPDenoiser.from_config(net, cfg.network)
    return Denoiser(
        net,
        cfg.loss.sigma_data,
        use_coords=cfg.network.coord_channels > 0,
        label_dim=cfg.network.label_dim,
        coord_embed=cfg.network.coord_embed,
        augment_dim=cfg.network.augment_dim,
        logvar=LogVar() if learned else None,
        precond=cfg.network.precond,
    )
