"""`patchdiff train`'s command line as a library: the parser built from config_flags.TRAIN_FLAGS, and flags ->
(TrainConfig, the settings given explicitly), resolved against the data set as a dry run resolves it.
`patchdiff train` runs what it gives; `patchdiff compare` plans its studies with it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from patchdiff import distributed as dist
from patchdiff.config import LatentConfig, LossConfig, PatchConfig, TrainConfig, arch_defaults, network_preset
from patchdiff.config_flags import SETTING_FLAGS, TRAIN_FLAGS, Flag, float_list, int_list, str_list
from patchdiff.presets import TRAIN_PRESETS, add_preset_flag
from patchdiff.training.loggers import parse_logger_names

LIST_TYPES = {int: int_list, float: float_list, str: str_list}


def field_of(path: str) -> tuple[Any, Any]:
    """(type, default) of the TrainConfig field at a path such as "network.dropout"."""
    cls, (*parents, name) = TrainConfig, path.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[name], {f.name: f for f in dataclasses.fields(cls)}[name].default


def argparse_args(f: Flag) -> dict[str, Any]:
    """add_argument's keywords for a flag: a setting's type, choices and default come from its field."""
    kwargs: dict[str, Any] = dict(help=f.help, **f.args)
    if not f.path:
        return kwargs
    hint, default = field_of(f.path)
    if hint is bool:
        return dict(kwargs, action="store_true")  # --no-X (negate) as well: False until given
    if kwargs.get("action") == "append":
        return dict(kwargs, default=list(default))
    if typing.get_origin(hint) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif typing.get_origin(hint) is tuple:
        kwargs["type"] = LIST_TYPES[typing.get_args(hint)[0]]
    elif hint in (int, float):
        kwargs["type"] = hint
    if not kwargs.get("required"):
        kwargs["default"] = None if f.preset else default
    return kwargs


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of `patchdiff train`, in its groups, then --preset. Every action also records its
    dest in `given_flags`, so that a resumed run can tell the flags given (which override its saved
    settings) from defaults (which must not)."""
    for title, flags in TRAIN_FLAGS:
        group = parser.add_argument_group(title) if title else parser
        for f in flags:
            group.add_argument(f.name, **argparse_args(f))
    add_preset_flag(parser, TRAIN_PRESETS)  # last: it checks the flags it sets exist
    for action in parser._actions:
        if action.dest != "help":
            action.__class__ = type(type(action).__name__, (type(action),), {"__call__": _record_given})


def _record_given(self, parser, namespace, values, option_string=None):
    super(type(self), self).__call__(parser, namespace, values, option_string)
    namespace.__dict__.setdefault("given_flags", set()).add(self.dest)


def given_fields(args: argparse.Namespace) -> frozenset[str]:
    """The TrainConfig field paths set by flags given on the command line (a preset's are not)."""
    given = getattr(args, "given_flags", ())
    return frozenset(f.path for f in SETTING_FLAGS if f.dest in given)


def default_precision(device: str | None) -> str:
    """bf16 where training runs on CUDA (the --device given, else CUDA when present), fp32 on a CPU."""
    import torch

    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    return "bf16" if on_cuda else "fp32"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Field path -> value of every setting flag given or with a default of its own; --arch's training
    presets fill in theirs. Left out: the network preset's, and --precision until the device is known."""
    values = {f.path: getattr(args, f.dest) for f in SETTING_FLAGS}
    values.update({f.path: not values[f.path] for f in SETTING_FLAGS if f.negate})
    for path, value in arch_defaults(values["network.arch"]).items():
        if values[path] is None:
            values[path] = value
    return {path: value for path, value in values.items() if value is not None}


def check_combinations(args: argparse.Namespace) -> None:
    """Flags that contradict each other, refused in one line that names them."""
    if args.coord_embed and args.no_coords:
        raise ValueError(
            f"--coord-embed {args.coord_embed} embeds the coordinates that --no-coords leaves out; drop one"
        )
    given = getattr(args, "given_flags", ())
    network_flags = sorted(f.dest for f in SETTING_FLAGS if f.path.startswith("network.") and f.dest in given)
    if args.init_snapshot and network_flags:
        flags = ", ".join("--" + dest.replace("_", "-") for dest in network_flags)
        raise ValueError(f"--init-snapshot takes the network from the snapshot; drop {flags}")
    if (args.init_from or args.prediction) and args.arch != "diffusers-unet":
        raise ValueError(f"--init-from and --prediction need --arch diffusers-unet, not {args.arch!r}")


def config_from_flags(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `patchdiff train` flags, before the data set fills in its part."""
    values = settings(args)
    section = {
        prefix: {p[len(prefix) + 1 :]: v for p, v in values.items() if p.startswith(prefix + ".")}
        for prefix in ("network", "patch", "loss", "latent")
    }
    arch = section["network"].pop("arch")
    net = network_preset(arch, dit_size=args.dit_size, edm2_size=args.edm2_size, **section["network"])
    check_combinations(args)
    if arch == "diffusers-unet" and not args.resume:  # a resumed run keeps its saved network config
        from patchdiff.networks.diffusers_unet import resolve_unet

        net = resolve_unet(net, args.prediction)  # stores the UNet config: snapshots rebuild without the hub
    top = {path: value for path, value in values.items() if "." not in path}
    top["loggers"] = parse_logger_names(top["loggers"])
    if "precision" not in top:
        top["precision"] = default_precision(args.device)
    return TrainConfig(
        network=net,
        patch=PatchConfig(**section["patch"]),
        loss=LossConfig(**section["loss"]),
        latent=LatentConfig(**section["latent"]),
        **top,
    )


class _Parser(argparse.ArgumentParser):
    """Refuses bad flags with a ValueError instead of exiting the process."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def train_parser() -> argparse.ArgumentParser:
    """`patchdiff train`'s flags on their own (no --help), raising ValueError on bad ones."""
    parser = _Parser(prog="patchdiff train", add_help=False)
    add_train_flags(parser)
    return parser


def config_from_argv(argv: Sequence[str], resolve: bool = True) -> tuple[TrainConfig, frozenset[str]]:
    """`patchdiff train` flags -> (the TrainConfig it trains, the field paths given explicitly). With
    `resolve`, the data set fills in image size, channels, classes and latents and everything is
    checked, as `patchdiff train --dry-run` does (with --resume: the resumed run's effective config).
    Bad flags raise ValueError."""
    args = train_parser().parse_args(list(argv))
    cfg, given = config_from_flags(args), given_fields(args)
    if resolve:
        from patchdiff.training.setup import prepare

        cfg = prepare(cfg, args.resume, dist.world_size(), given, replan=args.replan).cfg
    return cfg, given
