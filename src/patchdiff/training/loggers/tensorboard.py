"""TensorBoard: event files in `<run>/tensorboard` (needs the `tensorboard` package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events past the resumed state (work lost in a crash) are hidden when the files are
        # read back, so a resumed run shows each step once.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
