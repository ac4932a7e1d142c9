"""Kernel Inception Distance (Binkowski et al. 2018, arXiv 1801.01401).

KID is the squared maximum mean discrepancy between two feature sets under the cubic polynomial
kernel k(x, y) = (x.y / d + 1)^3, estimated without bias on random subsets of equal size m:

    MMD^2_u = sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1))  -  2 sum_{i,j} k(x_i, y_j) / m^2

Unlike FID it has an unbiased estimator, so small samples do not inflate it; it can be slightly
negative when the two distributions agree.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_features(f: ArrayLike, name: str) -> np.ndarray:
    array = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    if array.ndim != 2:
        raise ValueError(f"{name} must be features [N, D]; got shape {list(array.shape)}")
    return array.astype(np.float64, copy=False)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all pairs: [m, d] x [n, d] -> [m, n]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples [m, d] (diagonal terms k(x_i, x_i) left out)."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(
    f1: ArrayLike,
    f2: ArrayLike,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of
    m = min(N1, N2, max_subset_size) features drawn without replacement from each set."""
    x, y = _as_features(f1, "f1"), _as_features(f2, "f2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features of one size; got D={x.shape[1]} and D={y.shape[1]}")
    m = min(len(x), len(y), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set; got {len(x)} and {len(y)}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1; got {num_subsets}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    estimates = np.array(
        [
            mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
            for _ in range(num_subsets)
        ]
    )
    std = float(estimates.std(ddof=1)) if num_subsets > 1 else 0.0
    return float(estimates.mean()), std
