"""The data stream: which images each step loads, and where each image is cropped.

The crop plan (the crop size and image count of each step) is `patching.StepPlan`; this module follows
it. All are pure functions of (seed, step, position), so training resumes exactly and every process
agrees on every step without talking to the others.

The stream is an endless sequence of epochs, each a permutation of the data set seeded by
(seed, epoch). A step's accumulation round takes the next n * world images of the stream; process k
gets the k-th block of n. The only state is the stream position (an int).

Crops are cut on the host, in the loader workers, from the uint8 image (or the float16 latent mean and
std): the sampler hands each worker a `CropKey` (image, offset, size), `CropDataset` cuts the window,
and only crops are collated, pinned and copied to the device, where `train_step` adds their coordinates.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from patchdiff import augment
from patchdiff.patching import StepPlan

STEP_STREAM, EPOCH_STREAM, CROP_STREAM, AUGMENT_STREAM = (
    1,
    2,
    3,
    4,
)  # keep the seeds of different purposes apart


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (e.g. run seed, purpose, rank, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process's torch RNG for one step: noise levels, noise, latent samples, dropout."""
    return derive_seed(seed, STEP_STREAM, rank, step)


def crop_offsets(
    seed: int, rank: int, step: int, round_: int, count: int, full: tuple[int, int], crop: tuple[int, int]
) -> np.ndarray:
    """(top, left) of each of a round's `count` crops of size crop = (h, w) in images of size full = (H, W),
    int64 [count, 2], each uniform over 0..H-h x 0..W-w (numpy's bounded integers have no modulo bias).

    Slot i takes the i-th draw of an RNG seeded by (seed, rank, step, round), so its offset depends on
    those and i only: not on the worker that cuts it, nor on the host's torch RNG, and a resumed run cuts
    the same crops. A full-size crop has the single offset (0, 0) and draws nothing."""
    (H, W), (h, w) = full, crop
    if not (0 < h <= H and 0 < w <= W):
        raise ValueError(f"crop size {h}x{w} does not fit in images of size {H}x{W}")
    if (h, w) == (H, W):
        return np.zeros((count, 2), dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, CROP_STREAM, rank, step, round_))
    return rng.integers(0, [H - h + 1, W - w + 1], size=(count, 2), dtype=np.int64)


def augment_params(
    seed: int, rank: int, step: int, round_: int, count: int, p: float, full: tuple[int, int]
) -> np.ndarray:
    """--augment p: the transform parameters of each of a round's `count` images, float64 [count,
    augment.PARAM_DIM], seeded like `crop_offsets` (slot i depends on its seed and i only)."""
    rng = np.random.default_rng(derive_seed(seed, AUGMENT_STREAM, rank, step, round_))
    return augment.draw_params(rng, p, count, full)


class CropKey(NamedTuple):
    """What the sampler hands a loader worker: an image of the data set and the window to cut from it;
    with --augment, the parameters of the transform applied to the whole image first."""

    index: int
    top: int
    left: int
    height: int
    width: int
    augment: tuple[float, ...] = ()


class Crop(NamedTuple):
    """One crop and where it lies in its image; collated, the same fields batched: data [B, ...] (uint8
    pixels [B, C, h, w] or float16 latent mean and std [B, 2, C, h, w]), label, top and left int64 [B],
    augment: the network's augmentation labels [B, AUGMENT_DIM] (with --augment; else [B, 0])."""

    data: torch.Tensor
    label: int | torch.Tensor
    top: int | torch.Tensor
    left: int | torch.Tensor
    augment: torch.Tensor | None = None


def cut(data: torch.Tensor, top: int, left: int, size: tuple[int, int]) -> torch.Tensor:
    """The window of size (h, w) at (top, left) of the last two dims of `data` (all channels; for a latent
    item [2, C, H, W] the mean and the std alike). A view: collation copies only the crop."""
    h, w = size
    if tuple(data.shape[-2:]) == (h, w):
        return data
    return data[..., top : top + h, left : left + w]


class CropDataset(torch.utils.data.Dataset):
    """A data set read through `CropKey`s: item key -> Crop of the image key.index, cut where the key says.

    It runs in the DataLoader workers (or in the main process with --workers 0: the same code), so the
    full images never leave them."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: CropKey) -> Crop:
        data, label = self.dataset[key.index]
        labels = torch.zeros(0)
        if key.augment:  # the whole image first, then its crop: the coordinates stay those of the image
            params = np.asarray(key.augment)
            data = augment.apply(data, params)
            labels = augment.augment_labels(params, tuple(data.shape[-2:]))
        return Crop(cut(data, key.top, key.left, (key.height, key.width)), label, key.top, key.left, labels)


def clock(plan: StepPlan, step: int, unit: str, batch: int) -> tuple[float, float]:
    """(images before `step`, images in it) as the learning-rate warm-up and the EMA count them: images
    seen (the paper's count), or with unit "steps" steps x `batch` (full-size images per step), so that
    every configuration warms up and averages over the same number of optimiser steps, whatever its crops.
    A whole-image run counts the same either way."""
    if unit == "steps":
        return float(step * batch), float(batch)
    if unit != "images":
        raise ValueError(f"--ema-unit {unit!r}: choose images or steps")
    nimg = plan.nimg(step)
    return nimg, plan.nimg(step + 1) - nimg


class StreamSampler(torch.utils.data.Sampler):
    """A batch sampler for DataLoader: yields this process's list of `CropKey`s for each accumulation
    round (the images of the stream, each with its crop of the step's size), for a `CropDataset`.

    It starts at `step` and stream position `position` (both from the training state); `augment` is
    --augment's probability of each geometric transform (0 = none)."""

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
        augment: float = 0.0,
    ):
        self.n, self.plan, self.batch_gpu, self.rounds = dataset_len, plan, batch_gpu, rounds
        self.rank, self.world, self.step, self.position = rank, world, step, position
        self.augment = augment
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
        schedule, step, pos = self.plan.schedule, self.step, self.position
        while True:
            index = self.plan.size_index(step)
            n, (h, w) = schedule.images_per_round(self.batch_gpu, index), schedule.crop_shape(index)
            for r in range(self.rounds):
                images = self._indices(pos + self.rank * n, n)
                offsets = crop_offsets(self.plan.seed, self.rank, step, r, n, schedule.image_size, (h, w))
                keys = [CropKey(i, t, l, h, w) for i, (t, l) in zip(images, offsets.tolist(), strict=True)]
                if self.augment > 0:
                    p, full = self.augment, schedule.image_size
                    params = augment_params(self.plan.seed, self.rank, step, r, n, p, full)
                    keys = [k._replace(augment=tuple(q)) for k, q in zip(keys, params.tolist(), strict=True)]
                yield keys
                pos += n * self.world
            step += 1
