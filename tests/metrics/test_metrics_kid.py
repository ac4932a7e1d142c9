"""Kernel Inception Distance: the kernel, unbiasedness, sensitivity, errors."""

import numpy as np
import pytest
import torch

from patchdiff.metrics.kid import kernel_inception_distance, mmd2_unbiased, polynomial_kernel


def test_polynomial_kernel_values():
    x = np.array([[1.0, 2.0], [0.0, 0.0]])
    y = np.array([[3.0, -1.0]])
    # (x.y / d + 1)^3 with d = 2: (1/2 + 1)^3 and (0 + 1)^3
    np.testing.assert_allclose(polynomial_kernel(x, y), [[1.5**3], [1.0]])


def test_mmd2_unbiased_matches_explicit_double_sum():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.3
    m = len(x)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    assert mmd2_unbiased(x, y) == pytest.approx(within / (m * (m - 1)) - 2 * across / m**2, rel=1e-10)


def test_kid_is_unbiased_for_one_distribution():
    # Independent samples of one distribution: the estimates average to ~0 (within a few standard errors).
    rng = np.random.default_rng(1)
    estimates = [
        kernel_inception_distance(
            rng.standard_normal((200, 8)), rng.standard_normal((200, 8)), 20, 100, seed=s
        )[0]
        for s in range(10)
    ]
    mean, stderr = np.mean(estimates), np.std(estimates, ddof=1) / np.sqrt(len(estimates))
    assert abs(mean) < 4 * stderr + 1e-12


def test_kid_is_clearly_positive_for_shifted_distributions():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 0.5
    kid, std = kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b), 20, 100, seed=0)
    assert kid > 3 * std > 0  # std: the spread of single-subset estimates


def test_kid_is_deterministic_given_a_seed():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((60, 4))
    assert kernel_inception_distance(a, b, 5, 30, seed=7) == kernel_inception_distance(a, b, 5, 30, seed=7)
    assert kernel_inception_distance(a, b, 5, 30, seed=7) != kernel_inception_distance(a, b, 5, 30, seed=8)


def test_kid_errors():
    with pytest.raises(ValueError, match="one size"):
        kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kernel_inception_distance(np.zeros(3), np.zeros((5, 3)))
