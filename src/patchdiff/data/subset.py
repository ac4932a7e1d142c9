"""Training subsets: the first N images of a data set, or N drawn at random with a seed (--subset N
--subset-seed S). For studies of data efficiency and memorisation: the same N images every run, and
`subset_indices` says which, so the memorisation metric can compare samples with exactly them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def subset_indices(num_images: int, n: int, seed: int = -1) -> np.ndarray:
    """Indices (int64, increasing) of the n images of a data set of num_images: the first n for seed < 0,
    else n distinct ones drawn uniformly with that seed."""
    if not 0 < n <= num_images:
        raise ValueError(f"--subset {n}: must lie in 1..{num_images}, the images of the data set")
    if seed < 0:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_images, n, replace=False)).astype(np.int64)


class SubsetDataset(torch.utils.data.Dataset):
    """A view of some images of a data set; everything else (resolution, labels, ...) is the data set's.

    With --xflip (a data set of 2N items, item i + N the mirror of item i) the mirrors of the chosen
    images are kept too."""

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset = dataset
        base = int(getattr(dataset, "num_images", len(dataset)))
        mirrored = len(dataset) == 2 * base
        chosen = [int(i) for i in indices]
        self.indices = chosen + ([i + base for i in chosen] if mirrored else [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset" or name.startswith("__"):  # unpickling: not set yet
            raise AttributeError(name)
        return getattr(self.dataset, name)


def training_subset(dataset: Any, n: int, seed: int = -1) -> Any:
    """The data set itself for n = 0, else the view of its n images (subset_indices)."""
    if n == 0:
        return dataset
    base = int(getattr(dataset, "num_images", len(dataset)))
    return SubsetDataset(dataset, subset_indices(base, n, seed))
