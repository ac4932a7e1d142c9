"""Frechet Inception Distance (Heusel et al. 2017), reference statistics files, and scoring.

FID is the squared Wasserstein-2 distance between Gaussians fitted to detector features:

    FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

Reference files are .npz in the layout of EDM's published references (`mu` [D], `sigma` [D, D],
float64), so those files score our models directly. Ours may also hold `features` [M, D], a random
subset of the reference features, which KID needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdiff import distributed
from patchdiff.files import atomic_write
from patchdiff.metrics.detector import Detector, load_detector
from patchdiff.metrics.features import generated_features
from patchdiff.metrics.kid import kernel_inception_distance

METRICS = ("fid", "kid")
ArrayLike = np.ndarray | torch.Tensor

# --------------------------------------------------------------------------- math


def _float64(a: ArrayLike) -> np.ndarray:
    return (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float64)


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (as np.cov) of features [N, D], in float64."""
    f = _float64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"statistics need features [N >= 2, D]; got shape {list(f.shape)}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (len(f) - 1)
    return mu, sigma


def _psd_eigenvalues_sqrt(w: np.ndarray) -> np.ndarray:
    """sqrt of a PSD matrix's computed eigenvalues. Those below the rounding level D * eps * max |w|
    are zeros in disguise (possibly negative): taken as 0, not as sqrt(noise) ~ 1e-8 each."""
    noise = len(w) * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    return np.sqrt(np.where(w > noise, w, 0.0))


def _psd_sqrt(S: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, V = np.linalg.eigh(S)
    return (V * _psd_eigenvalues_sqrt(w)) @ V.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2); exact for singular covariances.

    tr (S1 S2)^{1/2} is the sum of square roots of the eigenvalues of S1 S2, which equal those of the
    symmetric PSD matrix S1^{1/2} S2 S1^{1/2}: two symmetric eigendecompositions, no complex sqrtm."""
    mu1, mu2, S1, S2 = _float64(mu1), _float64(mu2), _float64(sigma1), _float64(sigma2)
    D = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (D,) or S1.shape != (D, D) or S2.shape != (D, D):
        raise ValueError(
            f"FID needs mu [D] and sigma [D, D] of one D for both sets; got mu {list(mu1.shape)}, "
            f"sigma {list(S1.shape)} and mu {list(mu2.shape)}, sigma {list(S2.shape)} "
            "(were both made with the same detector?)"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, S1, S2)):
        raise ValueError("FID statistics contain NaN or infinity")
    S1, S2 = (S1 + S1.T) / 2, (S2 + S2.T) / 2
    root1 = _psd_sqrt(S1)
    M = root1 @ S2 @ root1
    tr_sqrt = _psd_eigenvalues_sqrt(np.linalg.eigvalsh((M + M.T) / 2)).sum()
    fid = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2.0 * tr_sqrt
    return max(float(fid), 0.0)  # a squared distance: only rounding makes it negative


# --------------------------------------------------------------------------- reference files


@dataclass(frozen=True)
class Reference:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    features: np.ndarray | None = None  # [M, D] float32, a random subset for KID; None in EDM's files
    path: str = ""

    @property
    def feature_dim(self) -> int:
        return self.mu.shape[0]


def reference_from_features(features: ArrayLike, kid_features: int = 5000, seed: int = 0) -> Reference:
    """Statistics of all features, plus a random subset of at most `kid_features` of them (0: none)."""
    f = _float64(features)
    mu, sigma = feature_statistics(f)
    subset = None
    if kid_features > 0:
        keep = np.sort(np.random.default_rng(seed).permutation(len(f))[:kid_features])
        subset = f[keep].astype(np.float32)
    return Reference(mu=mu, sigma=sigma, features=subset)


def save_reference(ref: Reference, path: str | os.PathLike) -> None:
    """Write ref as .npz atomically."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": ref.mu.astype(np.float64), "sigma": ref.sigma.astype(np.float64)}
    if ref.features is not None:
        arrays["features"] = ref.features
    atomic_write(dest, lambda tmp: _savez(tmp, arrays))


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: given a name, numpy would append ".npz" to it
        np.savez(f, **arrays)


def load_reference(path: str | os.PathLike) -> Reference:
    """Read a reference .npz (ours or EDM's); arrays only, never pickles."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"--ref {path}: no such file; make one with `patchdiff fid ref --data DATASET --dest {path}`"
        )
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # OSError, ValueError, BadZipFile, EOFError, or a bare .npy (no `with`)
        raise ValueError(f"--ref {path}: not a readable .npz reference file ({error})") from error
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"--ref {path}: needs arrays 'mu' and 'sigma'; found {sorted(arrays)}")
    mu, sigma, features = arrays["mu"], arrays["sigma"], arrays.get("features")
    D = mu.shape[0] if mu.ndim == 1 else -1
    if sigma.shape != (D, D) or (features is not None and (features.ndim != 2 or features.shape[1] != D)):
        raise ValueError(
            f"--ref {path}: inconsistent shapes mu {list(mu.shape)}, sigma {list(sigma.shape)}"
            + ("" if features is None else f", features {list(features.shape)}")
        )
    numeric = all(
        np.issubdtype(a.dtype, np.number) for a in (mu, sigma, *([] if features is None else [features]))
    )
    if D < 1 or not numeric:
        raise ValueError(f"--ref {path}: mu, sigma (and features) must be non-empty numeric arrays")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if features is not None:
        features = features.astype(np.float32)
    problem = covariance_problem(sigma) or (None if np.isfinite(mu).all() else "mu holds NaN or infinity")
    if problem is None and features is not None and not np.isfinite(features).all():
        problem = "features hold NaN or infinity"
    if problem:
        raise ValueError(f"--ref {path}: {problem}; the file is damaged or was not made as FID statistics")
    return Reference(mu, sigma, features, str(path))


# A covariance from float32 features, saved as float64, is symmetric to rounding and PSD up to rounding
# (its smallest eigenvalues may be ~-1e-12 of the largest); anything beyond this is not a covariance.
COVARIANCE_TOL = 1e-6


def covariance_problem(sigma: np.ndarray, tol: float = COVARIANCE_TOL) -> str | None:
    """Why `sigma` [D, D] is not a covariance matrix (not finite, not symmetric, not PSD), or None.

    PSD is tested with a Cholesky factorisation of sigma + tol * scale * I, which succeeds exactly when
    the smallest eigenvalue is above -tol * scale: one n^3/3 factorisation instead of an eigensolve."""
    if not np.isfinite(sigma).all():
        return "sigma holds NaN or infinity"
    scale = max(float(np.abs(sigma).max(initial=0.0)), 1e-300)
    if np.abs(sigma - sigma.T).max(initial=0.0) > tol * scale:
        return "sigma is not symmetric"
    try:
        np.linalg.cholesky((sigma + sigma.T) / 2 + tol * scale * np.eye(len(sigma)))
    except np.linalg.LinAlgError:
        return "sigma is not positive semi-definite (it has clearly negative eigenvalues)"
    return None


# --------------------------------------------------------------------------- scoring


def parse_metric_names(names: Sequence[str] | str) -> tuple[str, ...]:
    """'fid,kid' or ["fid", "kid"] -> ("fid", "kid"); unknown names are an error."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [name.strip().lower() for name in items if name.strip()]
    unknown = [name for name in items if name not in METRICS]
    if unknown or not items:
        raise ValueError(f"unknown --metrics {unknown or names!r}; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(items))


def check_reference(names: Sequence[str], ref: Reference) -> None:
    """Fail before any expensive work if ref cannot give the requested metrics."""
    if "kid" in names and ref.features is None:
        raise ValueError(
            f"--ref {ref.path or '(reference)'} stores no features, which KID needs; rebuild it with "
            "`patchdiff fid ref --data DATASET --dest REF.npz --kid-features 5000` or ask only for --metrics fid"
        )


def check_features(features: ArrayLike, ref: Reference) -> None:
    if features.ndim != 2 or features.shape[1] != ref.feature_dim:
        raise ValueError(
            f"the detector gives features of shape {list(features.shape)} but reference {ref.path or ''} has "
            f"D={ref.feature_dim}; use the same detector for the reference and the images"
        )


def score_features(
    names: Sequence[str], features: ArrayLike, ref: Reference, seed: int = 0
) -> dict[str, float]:
    """{"fid": ..., "kid": ..., "kid_std": ...} (those asked for) of features [N, D] against ref."""
    names = parse_metric_names(names)
    check_reference(names, ref)
    check_features(features, ref)
    f = _float64(features)
    results: dict[str, float] = {}
    if "fid" in names:
        results["fid"] = frechet_distance(*feature_statistics(f), ref.mu, ref.sigma)
    if "kid" in names:
        results["kid"], results["kid_std"] = kernel_inception_distance(f, ref.features, seed=seed)
    return results


def score_on_main(
    names: Sequence[str], features: torch.Tensor, ref: Reference, seed: int
) -> dict[str, float]:
    """Every rank holds all features; rank 0 does the (CPU-heavy) scoring and shares the numbers."""
    check_features(features, ref)  # on every rank, so that no rank waits for one that failed
    results = score_features(names, features, ref, seed) if distributed.is_main() else None
    return distributed.broadcast_object(results)


def scoring_setup(
    names: Sequence[str],
    ref: str | Reference,
    num: int,
    detector: str | Detector | None,
    device: str | torch.device | None,
) -> tuple[list[str], Reference, torch.device, Detector]:
    """Checked metric names, the loaded reference, the device and the detector for scoring `num`
    generated images: every check before the first sample."""
    names = parse_metric_names(names)
    reference = ref if isinstance(ref, Reference) else load_reference(ref)
    check_reference(names, reference)
    if num < 2:
        raise ValueError(f"metrics need at least 2 generated images; got num={num}")
    device = torch.device(device) if device is not None else distributed.default_device()
    if not isinstance(detector, Detector):
        detector = load_detector(detector or None, device)
    return names, reference, device, detector


def compute_metrics(
    names: Sequence[str],
    model: Any,
    ref: str | Reference,
    num: int,
    detector: str | Detector | None,
    batch: int,
    seed: int = 0,
    progress: bool = False,
    *,
    num_steps: int | None = None,  # None: the default sampler's steps, as `patchdiff generate` uses
    class_label: int | None = None,
    cfg_scale: float = 1.0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Generate `num` images from seeds seed, seed + 1, ... with `model` (a run dir / snapshot path or
    what patchdiff.generation.load returns) and score them against `ref`. Same result on every rank."""
    names, reference, device, detector = scoring_setup(names, ref, num, detector, device)
    if isinstance(model, (str, os.PathLike)):
        from patchdiff.generation import load  # imported late: only this path needs the generator

        model = load(str(model), device)
    features = generated_features(
        model,
        detector,
        range(seed, seed + num),
        batch=batch,
        num_steps=num_steps,
        class_label=class_label,
        cfg_scale=cfg_scale,
        progress=progress,
    )
    return score_on_main(names, features, reference, seed)
