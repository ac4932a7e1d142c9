"""Memorisation: the share of samples that are near-copies of a training image.

A sample counts as memorised when its nearest training image is much closer than the second nearest:
d1 / d2 < 1/3, distances in pixel space (the ratio test used in studies of memorisation in diffusion
models, e.g. Yoon et al. 2023, Gu et al. 2023). A novel sample lies roughly as far from its nearest
training image as from the next one; a copy lies almost on top of one.
"""

from __future__ import annotations

import torch

MEMORISED_RATIO = 1.0 / 3.0


def nearest(
    samples: torch.Tensor, train: torch.Tensor, k: int = 2, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euclidean distances [N, k] from each sample to its k nearest training images, nearest first,
    and their indices [N, k] int64.

    samples [N, ...] and train [M, ...] are flattened; computed in float64 over chunks of `chunk`
    training images (a running top-k), so memory stays O(N * chunk) for any M."""
    x = samples.reshape(len(samples), -1).to(torch.float64)
    y = train.reshape(len(train), -1).to(torch.float64)
    if len(y) < k or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"nearest: need >= {k} training images of the samples' size; got {tuple(train.shape)} "
            f"for samples {tuple(samples.shape)}"
        )
    best = torch.zeros(len(x), 0, dtype=torch.float64)
    best_index = torch.zeros(len(x), 0, dtype=torch.int64)
    x2 = (x**2).sum(1, keepdim=True)
    for start in range(0, len(y), chunk):
        part = y[start : start + chunk]
        d2 = (x2 - 2 * x @ part.T + (part**2).sum(1)[None]).clamp_min(0.0)  # squared distances [N, m]
        values, index = d2.topk(min(k, len(part)), dim=1, largest=False)
        merged, merged_index = torch.cat([best, values], 1), torch.cat([best_index, index + start], 1)
        order = merged.argsort(dim=1, stable=True)[:, :k]
        best, best_index = merged.gather(1, order), merged_index.gather(1, order)
    return best.sqrt(), best_index


def memorised(distances: torch.Tensor, ratio: float = MEMORISED_RATIO) -> torch.Tensor:
    """bool [N]: from `nearest`'s distances [N, >= 2], the samples whose nearest training image is
    `ratio` times closer than the second nearest."""
    return distances[:, 0] < ratio * distances[:, 1]


def memorised_share(
    samples: torch.Tensor, train: torch.Tensor, ratio: float = MEMORISED_RATIO, chunk: int = 1024
) -> float:
    """The share of samples that are memorised (`memorised`), distances in the space given (pixels)."""
    distances, _ = nearest(samples, train, 2, chunk)
    return float(memorised(distances, ratio).to(torch.float64).mean())
