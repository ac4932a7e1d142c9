"""Training state: safe to load, written atomically (snapshots are in patchdiff/snapshot.py).

The training state (`state.pt`) holds state_dicts, counters and plain Python values only and is loaded
with `torch.load(weights_only=True)`. Every write goes through `patchdiff.files.atomic_write`, so a
crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from patchdiff.files import atomic_write, atomic_write_text

STATE_NAME = "state.pt"


STATE_KEYS = ("config", "denoiser", "ema", "optimizer", "counters")


class StateError(ValueError):
    """A training state that cannot be used; the message names the file."""


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the state next to the old one, flush it to disk, then rename: the old state is kept as
    `state.pt.prev` until the new one is complete, and a full disk leaves the old state in place."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    try:
        atomic_write(path.with_name(path.name + ".new"), write)
    except OSError as error:
        raise RuntimeError(
            f"could not write the training state {path}: {error.strerror or error}; "
            f"the previous state is kept{'' if path.is_file() else ' (there is none yet)'}"
        ) from error
    if path.is_file():  # a crash between these two renames leaves state.pt.prev, which resume finds
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(path.with_name(path.name + ".new"), path)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """A training state, loaded without running code; every problem is a one-line StateError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would be a second line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if re.search(r"unsupported global", str(error), re.IGNORECASE):  # it names code to run: refused
            raise StateError(f"{path} is not a patchdiff training state (it holds code, refused)") from None
        raise StateError(f"{path} is damaged or not a training state ({_refusal_reason(error)})") from None
    except Exception as error:  # the unpickler raises KeyError, EOFError, RuntimeError... on damage
        raise StateError(f"{path} is damaged or not a training state ({_refusal_reason(error)})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path} is not a patchdiff training state (a {type(state).__name__})")
    return state


def check_state(path: Path, state: dict[str, Any]) -> None:
    """The keys a run needs to resume; an older or foreign file fails here, not half-way through set-up."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise StateError(f"{path} is not a patchdiff training state: it lacks {', '.join(missing)}")


def _refusal_reason(error: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, without torch's advice around it (to re-run
    with weights_only=False, i.e. to run the file's code, which is what the refusal protects against)."""
    advice = ("weights only", "weights_only", "weightsunpickler", "documentation", "file an issue")
    lines = [line.strip() for line in str(error).splitlines()]
    reasons = [line for line in lines if line and not any(a in line.lower() for a in advice)]
    return reasons[0][:200] if reasons else type(error).__name__


def is_complete(path: Path) -> bool:
    """Whether a state file was written to its end: torch.save writes a zip archive, whose central
    directory comes last, so a torn or truncated file fails to open as one (a cheap check, no loading)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def state_in(run_dir: Path) -> Path | None:
    """A run's newest complete state: `state.pt.new` when a crash came after it was written but before
    it was renamed into place, else state.pt, else state.pt.prev (a crash between the two renames).
    Training, `--resume auto` and `patchdiff compare` all look a state up here. With none complete, the
    state.pt that is there (loading it names the damage)."""
    names = (STATE_NAME + ".new", STATE_NAME, STATE_NAME + ".prev")
    found = [run_dir / name for name in names if (run_dir / name).is_file()]
    complete = [p for p in found if is_complete(p)]
    fallback = [p for p in found if p.name == STATE_NAME]
    return (complete or fallback or [None])[0]


def settle_state(run_dir: Path) -> Path | None:
    """Finish a save that a crash interrupted, so the run's state is state.pt again: a complete
    `state.pt.new` is renamed into place (the old state.pt becomes .prev), a torn one is removed.
    Returns the state now in use."""
    new, path = run_dir / (STATE_NAME + ".new"), run_dir / STATE_NAME
    if new.is_file():
        if is_complete(new):
            if path.is_file():
                os.replace(path, path.with_name(path.name + ".prev"))
            os.replace(new, path)
        else:
            new.unlink(missing_ok=True)
    return state_in(run_dir)


def find_resume_state(resume: str, outdir: str | os.PathLike) -> Path | None:
    """--resume PATH (a state file or a run directory) or --resume auto: the newest state under outdir,
    or None when there is none yet (the run starts fresh, so job scripts can always pass auto)."""
    if resume != "auto":
        p = Path(resume)
        found = state_in(p) if p.is_dir() else (p if p.is_file() else None)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no training state at {p}")
        return found
    outdir = Path(outdir)
    states = [s for d in outdir.glob("*/") if d.is_dir() and (s := state_in(d))] if outdir.is_dir() else []
    return max(states, key=lambda p: p.stat().st_mtime) if states else None


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Half-written `.NAME.*.tmp` files of atomic writes that a killed run left behind (a complete
    `state.pt.new` is a state: `settle_state` renames it into place)."""
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def truncate_stats(path: Path, step: int) -> int:
    """Drop records past `step` (work lost by a crash, to be redone) and torn lines; returns the count."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line).get("step", 0) <= step
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
