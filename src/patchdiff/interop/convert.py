"""Published EDM / Patch Diffusion networks (as `Record`s, see published.py) -> our networks' weights.

Supported: the EDM wrapper `EDMPrecond` (no coordinates) and Patch Diffusion's `Patch_EDMPrecond` (two
coordinate channels appended to c_in x), around a DDPM++ or NCSN++ `SongUNet` or an ADM `DhariwalUNet`,
pixel or latent, with or without classes. Both wrappers compute EDM's preconditioning (Karras et al.
2022, Table 1), which precond.Denoiser computes too; only the backbone's weights need mapping. EDM's
`VPPrecond` and `VEPrecond` (its published -vp / -ve snapshots) compute Table 1's VP and VE columns,
NetworkConfig.precond "vp" / "ve", with the paper's constants (anything else is refused).

The published layouts differ from ours in five places. Two are orderings, handled here by permuting
weights: the DDPM++/NCSN++ noise embedding comes as [sin, cos] (ours [cos, sin]), and the fused qkv
projection interleaves q, k, v per channel (ours stacks q, k, v). Three change what is computed and are
NetworkConfig options (edm_noise_endpoint, edm_aux_conv_first, edm_attn_full_heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from patchdiff.config import NetworkConfig
from patchdiff.interop.published import PublishedError, Record
from patchdiff.networks import build_network
from patchdiff.precond import VE_SIGMA_MAX, VE_SIGMA_MIN, VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, VP_M

# The wrappers we can import: class name -> whether it appends coordinate channels.
WRAPPERS = {"EDMPrecond": False, "Patch_EDMPrecond": True, "VPPrecond": False, "VEPrecond": False}
# Their preconditioning (NetworkConfig.precond), and the constants VP / VE wrappers record, with the
# paper's values (Table 1): our VP / VE preconditioning computes with those.
PRECONDS = {"EDMPrecond": "edm", "Patch_EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
WRAPPER_CONSTANTS: dict[str, dict[str, float]] = {
    "VPPrecond": dict(beta_d=VP_BETA_D, beta_min=VP_BETA_MIN, M=VP_M, epsilon_t=VP_EPSILON_T),
    "VEPrecond": dict(sigma_min=VE_SIGMA_MIN, sigma_max=VE_SIGMA_MAX),
}
# The published constructors' defaults (EDM, Appendix F.2), for arguments a snapshot does not record.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "SongUNet": dict(
        label_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16],
        dropout=0.10, label_dropout=0.0, embedding_type="positional", channel_mult_noise=1,
        encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
    ),
    "DhariwalUNet": dict(
        label_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
        attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0.0,
    ),
}  # fmt: skip
BACKBONES = tuple(BACKBONE_DEFAULTS)
# SongUNet settings that make DDPM++ and NCSN++ (EDM, Appendix F.2).
SONG_VARIANTS = {
    "ddpmpp": dict(
        embedding_type="positional", encoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1]
    ),
    "ncsnpp": dict(
        embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
    ),
}


@dataclass(frozen=True)
class Converted:
    """A published network as ours: its configuration, EDM's sigma_data and the backbone's state_dict."""

    network: NetworkConfig
    sigma_data: float
    state: dict[str, torch.Tensor]
    source: str  # e.g. "Patch_EDMPrecond(SongUNet)", for messages and the snapshot's info


def convert(ema: Record) -> Converted:
    """Map a published denoiser (the snapshot's `ema`) onto our backbone; anything else is refused with a
    PublishedError naming what it found."""
    try:
        return _convert(ema)
    except (AttributeError, TypeError) as error:  # a record whose state is not what a module holds
        raise PublishedError(f"{ema.class_name}: malformed network record ({error})") from None


def _convert(ema: Record) -> Converted:
    if ema.class_name not in WRAPPERS:
        raise PublishedError(
            f"network class {ema.class_name} is not supported; importable: {', '.join(WRAPPERS)}"
        )
    model = ema.modules.get("model")
    if not isinstance(model, Record):
        raise PublishedError(f"{ema.class_name} holds no backbone 'model'")
    source = f"{ema.class_name}({model.class_name})"
    if model.class_name not in BACKBONES:
        raise PublishedError(
            f"backbone class {model.class_name} is not supported; importable: {', '.join(BACKBONES)}"
        )
    kw = {**BACKBONE_DEFAULTS[model.class_name], **model.init_kwargs}
    try:
        common = backbone_settings(kw, coords=WRAPPERS[ema.class_name])
        check_wrapper_constants(ema, source)
    except (KeyError, TypeError, ValueError) as error:
        raise PublishedError(
            f"{source}: unreadable constructor arguments ({type(error).__name__}: {error})"
        ) from None
    if model.class_name == "SongUNet":
        arch = song_variant(kw, source)
        extra = dict(edm_noise_endpoint=arch == "ddpmpp", edm_aux_conv_first=arch == "ncsnpp")
        cfg = NetworkConfig(arch=arch, **common, **extra, precond=PRECONDS[ema.class_name])
        names = song_names(cfg)
    elif model.class_name == "DhariwalUNet":
        if int(kw.get("channels_per_head", 64)) != 64:
            raise PublishedError(f"{source} uses {kw['channels_per_head']} channels per head; ours 64")
        cfg = NetworkConfig(arch="adm", **common, edm_attn_full_heads=True, precond=PRECONDS[ema.class_name])
        names = adm_names(cfg)
    try:
        net = build_network(cfg)
    except ValueError as error:
        raise PublishedError(f"{source}: {error}") from None
    state = map_weights(
        net, model.tensors(), names, flip_embedding=model.class_name == "SongUNet", source=source
    )
    sigma_data = float(ema.state.get("sigma_data", 0.5))
    return Converted(cfg, sigma_data, state, source)


def check_wrapper_constants(ema: Record, source: str) -> None:
    """A VP / VE wrapper's recorded constants (its constructor's keyword arguments, else its attributes)
    must be the paper's, which our preconditioning uses."""
    for name, paper in WRAPPER_CONSTANTS.get(ema.class_name, {}).items():
        value = float(ema.init_kwargs.get(name, ema.state.get(name, paper)))
        if abs(value - paper) > 1e-9 * abs(paper):
            raise PublishedError(
                f"{source} has {name}={value:g}; only the paper's {name}={paper:g} is supported"
            )


def backbone_settings(kw: dict[str, Any], coords: bool) -> dict[str, Any]:
    """NetworkConfig fields from the published backbone's constructor arguments."""
    in_channels, out_channels = int(kw["in_channels"]), int(kw["out_channels"])
    if in_channels - out_channels != (2 if coords else 0):
        raise ValueError(f"{in_channels} input and {out_channels} output channels")
    return dict(
        resolution=int(kw["img_resolution"]),
        img_channels=out_channels,
        coord_channels=in_channels - out_channels,
        label_dim=int(kw["label_dim"]),
        model_channels=int(kw["model_channels"]),
        channel_mult=tuple(int(m) for m in kw["channel_mult"]),
        num_blocks=int(kw["num_blocks"]),
        attn_resolutions=tuple(int(r) for r in kw["attn_resolutions"]),
        dropout=float(kw["dropout"]),
        label_dropout=float(kw["label_dropout"]),
    )


def song_variant(kw: dict[str, Any], source: str) -> str:
    """'ddpmpp' or 'ncsnpp' from the SongUNet's constructor arguments; other combinations are refused."""
    if kw["decoder_type"] != "standard":
        raise PublishedError(
            f"{source} uses decoder_type={kw['decoder_type']!r}; only 'standard' is supported"
        )
    for arch, settings in SONG_VARIANTS.items():
        if all((list(kw[k]) if isinstance(v, list) else kw[k]) == v for k, v in settings.items()):
            return arch
    found = {k: kw[k] for k in SONG_VARIANTS["ddpmpp"]}
    raise PublishedError(f"{source} with {found} is neither DDPM++ nor NCSN++")


# --------------------------------------------------------------------------- names: ours -> theirs


def _block_names(ours: str, theirs: str) -> dict[str, str]:
    """A residual block's sub-layers (attention ones only matter where the block has attention)."""
    pairs = {
        "norm0": "norm0", "conv0": "conv0", "affine": "affine", "norm1": "norm1", "conv1": "conv1",
        "skip": "skip", "attn.norm": "norm2", "attn.qkv": "qkv", "attn.proj": "proj",
    }  # fmt: skip
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in pairs.items()}


def _unet_names(cfg: NetworkConfig) -> dict[str, str]:
    """The encoder / bottom / decoder blocks that DDPM++, NCSN++ and ADM name alike."""
    R, L = cfg.resolution, len(cfg.channel_mult)
    names: dict[str, str] = {}
    for level in range(L):
        res = f"{R >> level}x{R >> level}"
        offset = 1 if level > 0 else 0
        if level > 0:
            names.update(_block_names(f"enc.{level}.0", f"enc.{res}_down"))
        for i in range(cfg.num_blocks):
            names.update(_block_names(f"enc.{level}.{i + offset}", f"enc.{res}_block{i}"))
    bottom = f"{R >> (L - 1)}x{R >> (L - 1)}"
    names.update(_block_names("mid.0", f"dec.{bottom}_in0"))
    names.update(_block_names("mid.1", f"dec.{bottom}_in1"))
    for i, level in enumerate(reversed(range(L))):
        res = f"{R >> level}x{R >> level}"
        if i > 0:
            names.update(_block_names(f"up.{i - 1}", f"dec.{res}_up"))
        for j in range(cfg.num_blocks + 1):
            names.update(_block_names(f"dec.{i}.{j}", f"dec.{res}_block{j}"))
    names["enc_conv"] = f"enc.{R}x{R}_conv"
    for m in ("map_noise", "map_label", "map_layer0", "map_layer1"):
        names[m] = m
    return names


def song_names(cfg: NetworkConfig) -> dict[str, str]:
    names = _unet_names(cfg)
    R = cfg.resolution
    for level in range(1, len(cfg.channel_mult)):
        names[f"enc_aux.{level - 1}.conv"] = f"enc.{R >> level}x{R >> level}_aux_residual"
    names["out_norm"] = f"dec.{R}x{R}_aux_norm"
    names["out_conv"] = f"dec.{R}x{R}_aux_conv"
    return names


def adm_names(cfg: NetworkConfig) -> dict[str, str]:
    return {**_unet_names(cfg), "out_norm": "out_norm", "out_conv": "out_conv"}


def _theirs(key: str, names: dict[str, str]) -> str | None:
    """The published name of our parameter `key` (module path, then the parameter's own name)."""
    module, _, leaf = key.rpartition(".")
    return f"{names[module]}.{leaf}" if module in names else None


# Buffers of theirs that are constants of the architecture (our layers compute them).
IGNORED_LEAVES = ("resample_filter",)


def map_weights(
    net: torch.nn.Module,
    theirs: dict[str, torch.Tensor],
    names: dict[str, str],
    *,
    flip_embedding: bool,
    source: str,
) -> dict[str, torch.Tensor]:
    """Our state_dict filled from theirs; every tensor must find its counterpart with the same shape, and
    every published tensor must be used (else the architectures differ and the output would be wrong)."""
    theirs = {k.removeprefix("model."): v for k, v in theirs.items()}
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    for key, ours in net.state_dict().items():
        name = _theirs(key, names)
        if name is None or name not in theirs:
            raise PublishedError(f"{source}: no published weight for our {key} (expected {name})")
        t = theirs[name].detach().to(torch.float32)
        if tuple(t.shape) != tuple(ours.shape):
            raise PublishedError(
                f"{source}: {name} has shape {tuple(t.shape)}, ours {key} {tuple(ours.shape)}"
            )
        module = key.rpartition(".")[0]
        if module.endswith("attn.qkv"):
            t = t[qkv_order(modules[module.removesuffix(".qkv")].num_heads, ours.shape[0] // 3)]
        if flip_embedding and (key == "map_layer0.weight"):
            t = t.roll(t.shape[1] // 2, dims=1)  # their [sin, cos] inputs -> our [cos, sin]
        if flip_embedding and module == "map_label":
            t = t.roll(t.shape[0] // 2, dims=0)  # added to the embedding: same reordering
        state[key] = t.contiguous()
        used.add(name)
    unused = [
        k
        for k in theirs
        if k not in used and not k.endswith(IGNORED_LEAVES) and not k.startswith("map_augment.")
    ]
    if unused:
        raise PublishedError(
            f"{source}: {len(unused)} published weight(s) have no place in our network, e.g. {unused[0]}"
        )
    return state


def qkv_order(heads: int, channels: int) -> torch.Tensor:
    """Rows of the published qkv projection in our order. Theirs: per head, per channel, (q, k, v)
    adjacent; ours: all q, then all k, then all v, each head after head."""
    d = channels // heads
    return torch.tensor([h * 3 * d + c * 3 + j for j in range(3) for h in range(heads) for c in range(d)])
