"""Snapshots: one `.safetensors` file of the EMA denoiser's weights whose metadata holds the resolved
TrainConfig as JSON (plus a readable `.json` beside it). Nothing in it can run code; both files are
written atomically. Training writes snapshots, generation and the tools read them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from patchdiff.config import TrainConfig, from_json, to_json
from patchdiff.files import atomic_write, atomic_write_text

CONFIG_KEY = "patchdiff.config"
SNAPSHOT_RE = re.compile(r"snapshot-(\d+)\.safetensors$")


def save_snapshot(path: str | os.PathLike, denoiser: torch.nn.Module, cfg: TrainConfig, **info: Any) -> None:
    """Weights as safetensors with the config (and e.g. kimg, step) in the metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in denoiser.state_dict().items()}
    meta = {CONFIG_KEY: to_json(cfg), **{f"patchdiff.{k}": json.dumps(v) for k, v in info.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write_text(
        Path(path).with_suffix(".json"),
        json.dumps({"config": json.loads(meta[CONFIG_KEY]), **info}, indent=2),
    )


def read_snapshot(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TrainConfig, dict[str, Any]]:
    """(state_dict, config, info) of a snapshot file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors snapshot ({error})") from error
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no patchdiff config in its metadata; was it written by patchdiff?")
    info = {}
    for key, value in meta.items():
        try:
            decoded = from_json(TrainConfig, value) if key == CONFIG_KEY else json.loads(value)
        except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: the metadata {key!r} is not valid ({error})") from None
        if key == CONFIG_KEY:
            cfg = decoded
        else:
            info[key.removeprefix("patchdiff.")] = decoded
    check_image_size(path, cfg)
    return load_file(str(path)), cfg, info


MAX_IMAGE_SIDE = 16384  # pixels (or latents) per side: far above any trained model, far below a bad one


def check_image_size(path: Path, cfg: TrainConfig) -> None:
    """A recorded image size is checked before a network or a sample is built at that size, so a
    crafted or damaged snapshot fails with one line, not with the allocator's."""
    sides = [*cfg.image_size, cfg.network.resolution, *cfg.latent.pixel_size]
    if any(not isinstance(v, int) or not 0 < v <= MAX_IMAGE_SIDE for v in sides):
        raise ValueError(
            f"{path}: its metadata records an implausible image size {tuple(cfg.image_size)} "
            f"(sides of 1 to {MAX_IMAGE_SIDE} pixels expected); the file is damaged or not from patchdiff"
        )


def newest_snapshot(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    snaps = sorted(
        (int(m.group(1)), p)
        for p in run_dir.glob("snapshot-*.safetensors")
        if (m := SNAPSHOT_RE.search(p.name))
    )
    if not snaps:
        raise FileNotFoundError(
            f"no snapshot-*.safetensors in {run_dir}; train longer or pass a snapshot file"
        )
    return snaps[-1][1]
