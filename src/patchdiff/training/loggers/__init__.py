"""Optional training loggers: `--logger tensorboard` and `--logger wandb`, beside stats.jsonl.

Each backend is one module, imported only when chosen, so a plain install works without them; a chosen
backend whose package is missing is refused before training starts, in one line naming the extra.
Only rank 0 logs (the Run opens loggers on the main process only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from patchdiff.training.loggers.base import Logger, global_step, scalars_of

# name -> (module the backend needs, the extra that installs it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def parse_logger_names(names) -> tuple[str, ...]:
    """Names from repeated or comma-separated --logger values, checked, without repeats, in order."""
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in LOGGERS:
                raise ValueError(f"--logger {name}: unknown logger; choose from {', '.join(LOGGERS)}")
            if name not in out:
                out.append(name)
    return tuple(out)


def check_loggers(names) -> None:
    """Refuse, before anything is written, a logger whose package is not installed."""
    for name in parse_logger_names(names):
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(
                f'--logger {name} needs the {module} package: pip install "patchdiff[{extra}]"'
            )


class Loggers:
    """The chosen loggers as one sink: `record(stats record)`, `image(tag, HxWxC uint8, kimg)`."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def record(self, record: dict) -> None:
        values = scalars_of(record)
        if values:
            for logger in self.loggers:
                logger.scalars(values, global_step(record))

    def image(self, tag: str, image: np.ndarray, kimg: float) -> None:
        for logger in self.loggers:
            logger.image(tag, image, round(kimg * 1000))

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_loggers(names, run_dir: Path, config: dict, resume_kimg: float | None = None) -> Loggers:
    """Open the named loggers for a run; `resume_kimg` is where a resumed run continues."""
    check_loggers(names)
    resume_step = None if resume_kimg is None else round(resume_kimg * 1000)
    loggers: list[Logger] = []
    for name in parse_logger_names(names):
        if name == "tensorboard":
            from patchdiff.training.loggers.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir, resume_step))
        elif name == "wandb":
            from patchdiff.training.loggers.wandb import WandbLogger

            loggers.append(WandbLogger(run_dir, config))
    return Loggers(loggers)


__all__ = [
    "LOGGERS",
    "Logger",
    "Loggers",
    "check_loggers",
    "open_loggers",
    "parse_logger_names",
    "scalars_of",
]
