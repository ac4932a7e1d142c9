"""The logger interface: sinks of the records that go to stats.jsonl, plus each snapshot's sample grid.

A logger sees the same dicts `Run.append_stats` writes, so stats.jsonl stays the one source of truth and
a backend only chooses how to show them. The global step of every backend is the number of images seen
as the paper counts them (kimg * 1000): it does not depend on the batch or the crop schedule, and a
resumed run continues it without repeating steps.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Logger(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: uint8 [H, W, C] with C in {1, 3}."""

    def close(self) -> None: ...


def global_step(record: dict) -> int:
    """A record's step for the backends: images seen (kimg * 1000), an integer."""
    return round(record["kimg"] * 1000)


# Tick fields shown as scalars, and the names they get (grouped the way dashboards sort them).
TICK_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "kimg": "progress/kimg",
    "s_per_kimg": "speed/s_per_kimg",
    "steps_per_s": "speed/steps_per_s",
    "tflops": "speed/tflops",
    "mfu": "speed/mfu",
    "mem_gb": "resources/mem_gb",
}


def scalars_of(record: dict) -> dict[str, float]:
    """The scalars of one stats.jsonl record: a tick's loss (overall and by crop size), learning rate,
    kimg, speed and memory; a metrics record's FID / KID."""
    out: dict[str, float] = {}
    if record.get("kind") == "tick":
        for key, name in TICK_SCALARS.items():
            if isinstance(record.get(key), (int, float)):
                out[name] = float(record[key])
        if record.get("s_per_kimg"):
            out["speed/images_per_s"] = 1000.0 / record["s_per_kimg"]
        for size, loss in record.get("loss_by_size", {}).items():
            out[f"train/loss_crop{size}"] = float(loss)
    elif record.get("kind") == "metrics":
        skip = {"kind", "step", "kimg", "time_s"}
        for key, value in record.items():
            if key not in skip and isinstance(value, (int, float)):
                out[f"metrics/{key}"] = float(value)
    return out
