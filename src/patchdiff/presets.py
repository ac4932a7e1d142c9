"""Named recipes as data: `patchdiff train --preset NAME`, `patchdiff generate --preset NAME`.

A preset is a set of flag values (by their argparse names) applied as defaults: a flag given on the
command line wins, whether it comes before or after --preset. The values follow the paper's published
README for its latent-space runs (ADM on 32x32x4 Stable Diffusion VAE latents, 8 GPUs), converted to this
project's units (one deliberate difference, label dropout, is explained at the ImageNet preset): that README's --duration and --ema are in Mimg (EDM's units), ours in kimg, so
--ema=50 there is a half-life of 50,000 kimg here. Its fp16 with loss scaling becomes bf16 here.

    torchrun --standalone --nproc_per_node 8 -m patchdiff train --data LATENTS --outdir runs \\
        --preset imagenet256-latent
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Preset:
    summary: str
    flags: Mapping[str, Any] = field(default_factory=dict)  # argparse dest -> value


_LATENT_ADM = dict(
    arch="adm",  # ADM U-Net: cbase 192, cres 1,2,3,4, 3 blocks, attention at 32,16,8
    dropout=0.10,
    lr=1e-4,
    ema=50_000.0,  # kimg (the README's --ema=50 Mimg)
    precision="bf16",
    batch_gpu=32,
    patch_schedule="stochastic",  # the paper's schedule for its latent runs, not our pixel default
    real_p=0.5,
)

TRAIN_PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        # label_dropout 0.1 where the published code trains with none (0): the paper samples this model
        # with classifier-free guidance (adm-latent: cfg 1.3), and guidance needs an unconditional
        # model, which only training with dropped labels provides (Ho & Salimans 2022; 10% as in DiT).
        # With 0, the null-label output is never trained and guided samples are unreliable.
        "imagenet256-latent": Preset(
            "ImageNet-256 in the SD VAE's latent space: class-conditional ADM, label dropout 0.1, batch 4096, "
            "2.5M kimg",
            dict(_LATENT_ADM, cond=True, label_dropout=0.1, batch=4096, duration=2_500_000.0, tick=200.0),
        ),
        "lsun256-latent": Preset(
            "LSUN-256 in the SD VAE's latent space: unconditional ADM, batch 1024, 200k kimg",
            dict(_LATENT_ADM, batch=1024, duration=200_000.0, tick=200.0),
        ),
    }
)

SAMPLER_PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "adm-latent": Preset(
            "the paper's ADM latent sampler: 256 Heun steps with churn, guidance 1.3 (class-conditional)",
            dict(sampler="heun", steps=256, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003, cfg=1.3),
        ),
    }
)


class _ApplyPreset(argparse.Action):
    """Sets the preset's values on every flag still at its default. Flags parsed later overwrite them."""

    def __init__(self, option_strings, dest, presets: Mapping[str, Preset], **kwargs):
        self.presets = presets
        super().__init__(option_strings, dest, choices=sorted(presets), **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        for name, preset_value in self.presets[value].flags.items():
            if getattr(namespace, name) == parser.get_default(name):
                setattr(namespace, name, preset_value)


def add_preset_flag(parser: argparse.ArgumentParser, presets: Mapping[str, Preset]) -> None:
    known = {a.dest for a in parser._actions}
    for name, preset in presets.items():  # a typo in a preset fails at start-up, not mid-run
        missing = set(preset.flags) - known
        if missing:
            raise ValueError(f"preset {name} names unknown flags {sorted(missing)}")
    parser.add_argument(
        "--preset",
        action=_ApplyPreset,
        presets=presets,
        metavar="NAME",
        help="a named recipe (explicit flags override it): "
        + "; ".join(f"{name}: {p.summary}" for name, p in presets.items()),
    )
