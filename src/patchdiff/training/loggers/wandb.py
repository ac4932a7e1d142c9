"""Weights & Biases (needs the `wandb` package). The run id is kept in `<run>/wandb-id.txt`, so a resumed
training run continues the same W&B run (resume="allow"). WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE and
WANDB_DIR are honoured as usual; files go to the run directory unless WANDB_DIR says otherwise."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from patchdiff.files import atomic_write

ID_FILE = "wandb-id.txt"


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict) -> None:
        import wandb

        self.wandb = wandb
        run_dir = Path(run_dir)
        id_path = run_dir / ID_FILE
        run_id = (
            id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(4)
        )  # W&B ids: short, [a-z0-9]
        if not id_path.is_file():
            atomic_write(id_path, lambda tmp: Path(tmp).write_text(run_id + "\n"))
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "patchdiff"),
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=os.environ.get("WANDB_DIR", str(run_dir)),
                config=config,
            )
        except Exception as error:  # no API key, no network, a bad entity: W&B raises many kinds
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise RuntimeError(
                f"--logger wandb: could not start the W&B run ({reason}); run `wandb login`, or set "
                "WANDB_MODE=offline and `wandb sync` later"
            ) from None

    def log(self, values: dict, step: int) -> None:
        # A resumed run repeats the steps it logged between its last state and a crash; W&B refuses
        # steps below its current one, so those are skipped here, quietly.
        if step >= self.run.step:
            self.run.log(values, step=step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        pixels = image[:, :, 0] if image.shape[2] == 1 else image
        self.log({tag: self.wandb.Image(pixels)}, step)

    def close(self) -> None:
        self.run.finish()
