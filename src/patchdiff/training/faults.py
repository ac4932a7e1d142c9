"""Fault injection for the tests and benchmarks/crash_test.py, set through environment variables.

Multi-process failures (one rank overflowing, one worker dying) cannot be staged from outside a
torchrun job, so the loop asks here once per step. Without the variables every hook is a no-op.

  PATCHDIFF_FAULT_NAN=RANK:STEP    this rank's loss is NaN from STEP on (as after an fp16 overflow)
  PATCHDIFF_FAULT_EXIT=RANK:STEP   this rank dies (os._exit(1)) at STEP, on torchrun's first attempt only
  PATCHDIFF_TRACE_SIZES=DIR        each rank appends "step crop-size" lines to DIR/sizes-RANK.txt
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _target(name: str) -> tuple[int, int] | None:
    value = os.environ.get(name)
    if not value:
        return None
    rank, step = value.split(":")
    return int(rank), int(step)


class Faults:
    def __init__(self, rank: int):
        self.rank = rank
        nan, die = _target("PATCHDIFF_FAULT_NAN"), _target("PATCHDIFF_FAULT_EXIT")
        self.nan_from = nan[1] if nan and nan[0] == rank else None
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.exit_at = die[1] if die and die[0] == rank and first_attempt else None
        trace = os.environ.get("PATCHDIFF_TRACE_SIZES")
        self.trace = Path(trace) / f"sizes-{rank}.txt" if trace else None

    def after_step(self, step: int, size: int, loss: torch.Tensor) -> torch.Tensor:
        if self.trace is not None:
            with open(self.trace, "a") as f:
                f.write(f"{step} {size}\n")
        if self.exit_at is not None and step >= self.exit_at:
            os._exit(1)
        if self.nan_from is not None and step >= self.nan_from:
            return loss * float("nan")
        return loss
