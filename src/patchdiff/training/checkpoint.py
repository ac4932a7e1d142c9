"""Snapshots and training state: safe to load, portable, written atomically.

- A snapshot is one `.safetensors` file of the EMA denoiser's weights whose metadata holds the resolved
  TrainConfig as JSON (plus a readable `.json` beside it). Nothing in it can run code.
- The training state (`state.pt`) holds state_dicts, counters and plain Python values only and is
  loaded with `torch.load(weights_only=True)`.
Every write goes to a temporary file in the same folder and is renamed into place, so a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from patchdiff.config import TrainConfig, from_json, to_json

CONFIG_KEY = "patchdiff.config"
SNAPSHOT_RE = re.compile(r"snapshot-(\d+)\.safetensors$")
STATE_NAME = "state.pt"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
    cfg = from_json(TrainConfig, meta[CONFIG_KEY])
    info = {k.removeprefix("patchdiff."): json.loads(v) for k, v in meta.items() if k != CONFIG_KEY}
    return load_file(str(path)), cfg, info


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


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_state(resume: str, outdir: str | os.PathLike) -> Path:
    """--resume PATH (a state file or a run directory) or --resume auto (the newest state under outdir)."""
    if resume != "auto":
        p = Path(resume)
        p = p / STATE_NAME if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"--resume {resume}: no training state at {p}")
        return p
    states = [p for p in Path(outdir).glob(f"*/{STATE_NAME}") if p.is_file()]
    if not states:
        raise FileNotFoundError(
            f"--resume auto: no run under {outdir} has a {STATE_NAME} yet; start without --resume"
        )
    return max(states, key=lambda p: p.stat().st_mtime)
