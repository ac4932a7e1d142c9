"""The data stream and the step plan: which crop size each step uses and which images it loads.

Both are pure functions of (seed, step, position), so training resumes exactly and every process
agrees on the crop size of every step without talking to the others.

The stream is an endless sequence of epochs, each a permutation of the data set seeded by
(seed, epoch). A step's accumulation round takes the next n * world images of the stream; process k
gets the k-th block of n. The only state is the stream position (an int).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

from patchdiff.patching import PatchSchedule

STEP_STREAM, EPOCH_STREAM = 1, 2  # keep the seeds of different purposes apart


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (e.g. run seed, purpose, rank, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process's RNG for one step: crops, noise levels, noise, dropout."""
    return derive_seed(seed, STEP_STREAM, rank, step)


@dataclass(frozen=True)
class StepPlan:
    """Crop size and image count of each step; training length in steps for a duration in images.

    Images seen are counted as the paper does: the expected number of images per step (stochastic),
    or the images of the current phase (progressive, full).
    """

    schedule: PatchSchedule
    seed: int
    images_per_step: tuple[int, ...]  # per crop size: all processes and accumulation rounds together
    duration_nimg: float
    saved_bounds: tuple[int, ...] = ()  # a resumed run's phase boundaries: its phases never move

    @property
    def phase_bounds(self) -> list[int]:
        """Progressive schedule: the first step of each later phase (phase i covers share probs[i] of
        the images); the last phase lasts until the duration is reached. A resumed run keeps its
        earlier boundaries even when its duration changes, so only the last phase grows or shrinks."""
        bounds, total = [], 0
        for p, n in zip(self.schedule.probs[:-1], self.images_per_step[:-1], strict=True):
            total += math.ceil(p * self.duration_nimg / n)
            bounds.append(total)
        if len(self.saved_bounds) == len(self.images_per_step):
            bounds = list(self.saved_bounds[:-1])
        seen = sum((b - a) * n for a, b, n in zip([0, *bounds], bounds, self.images_per_step, strict=False))
        last = max(math.ceil((self.duration_nimg - seen) / self.images_per_step[-1]), 0)
        return [*bounds, (bounds[-1] if bounds else 0) + last]

    @property
    def expected_images(self) -> float:
        s = self.schedule
        if s.kind == "stochastic":
            return sum(p * n for p, n in zip(s.probs, self.images_per_step, strict=True))
        return float(self.images_per_step[-1])

    @property
    def total_steps(self) -> int:
        if self.schedule.kind == "progressive":
            return self.phase_bounds[-1]
        return max(1, math.ceil(self.duration_nimg / self.expected_images))

    def size_index(self, step: int) -> int:
        if self.schedule.kind == "progressive":
            return min(bisect.bisect_right(self.phase_bounds, step), len(self.images_per_step) - 1)
        return self.schedule.size_index(self.seed, step, 0.0)

    def nimg(self, step: int) -> float:
        """Images seen (paper count) after `step` steps."""
        if self.schedule.kind != "progressive":
            return step * self.expected_images
        total, start = 0.0, 0
        for bound, n in zip(self.phase_bounds, self.images_per_step, strict=True):
            total += (min(step, bound) - start) * n if step > start else 0
            start = bound
        return total


class StreamSampler(torch.utils.data.Sampler):
    """A batch sampler for DataLoader: yields this process's index list for each accumulation round.

    It starts at `step` and stream position `position` (both from the training state)."""

    def __init__(
        self,
        dataset_len: int,
        plan: StepPlan,
        batch_gpu: int,
        rounds: int,
        rank: int,
        world: int,
        step: int = 0,
        position: int = 0,
    ):
        self.n, self.plan, self.batch_gpu, self.rounds = dataset_len, plan, batch_gpu, rounds
        self.rank, self.world, self.step, self.position = rank, world, step, position
        self._epoch, self._perm = -1, None

    def _indices(self, start: int, count: int) -> list[int]:
        out = []
        for g in range(start, start + count):
            epoch, i = divmod(g, self.n)
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(derive_seed(self.plan.seed, EPOCH_STREAM, epoch))
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
            out.append(self._perm[i])
        return out

    def __iter__(self):
        step, pos = self.step, self.position
        while True:
            n = self.plan.schedule.images_per_round(self.batch_gpu, self.plan.size_index(step))
            for _ in range(self.rounds):
                yield self._indices(pos + self.rank * n, n)
                pos += n * self.world
            step += 1
