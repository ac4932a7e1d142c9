"""Non-leaking geometric augmentation (Karras et al. 2022, EDM, Appendix C), written from the paper.

Each training image is transformed as a whole, before its crop is cut: an x-flip, an integer
translation, an isotropic scaling, a rotation and an anisotropic scaling, each applied with probability
p. The network is told what was done: the transform's parameters, as a vector of `AUGMENT_DIM` numbers,
enter as a conditioning input (like a class label). At sampling time that vector is zero, which is the
identity transform, so the samples follow the un-augmented data: the augmentation does not leak.

Parameters of one image, float64 [PARAM_DIM] (all zero = identity):

    0  flip       1 = mirror left-right
    1  tx, ty     integer translation in pixels (uniform in +-1/8 of the image size)
    3  iso        log2 of the isotropic scale factor, ~ N(0, 0.2^2)
    4  theta      rotation angle in radians, uniform in [-pi, pi)
    5  aniso      log2 of the anisotropic stretch, ~ N(0, 0.2^2): 2^aniso along the direction phi,
    6  phi        2^-aniso across it (phi uniform in [-pi, pi))

The network's label (`augment_labels`, float32 [AUGMENT_DIM], zero = identity):

    flip, tx / W, ty / H, iso, cos(theta) - 1, sin(theta), aniso cos(2 phi), aniso sin(2 phi)

The angle enters through its cosine and sine (no jump at +-pi), the stretch direction through 2 phi
(a stretch along phi and along phi + pi is the same transform).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PARAM_DIM = 7
AUGMENT_DIM = 8
TRANSLATE_MAX = 0.125  # of the image size
SCALE_STD = 0.2  # of log2 of the scale factors


def draw_params(rng: np.random.Generator, p: float, count: int, image_size: tuple[int, int]) -> np.ndarray:
    """Parameters of `count` images, float64 [count, PARAM_DIM]; each transform with probability p.

    All draws are made whatever p is (the same number of draws per image), so an image's parameters depend
    on its slot and p only."""
    H, W = image_size
    on = rng.random((count, 5)) < p  # flip, translation, iso, rotation, aniso
    flip = rng.random(count) < 0.5
    tmax_x, tmax_y = round(TRANSLATE_MAX * W), round(TRANSLATE_MAX * H)
    tx = rng.integers(-tmax_x, tmax_x + 1, count)
    ty = rng.integers(-tmax_y, tmax_y + 1, count)
    iso = rng.normal(0.0, SCALE_STD, count)
    theta = rng.uniform(-math.pi, math.pi, count)
    aniso = rng.normal(0.0, SCALE_STD, count)
    phi = rng.uniform(-math.pi, math.pi, count)
    out = np.zeros((count, PARAM_DIM))
    out[:, 0] = on[:, 0] & flip
    out[:, 1] = np.where(on[:, 1], tx, 0)
    out[:, 2] = np.where(on[:, 1], ty, 0)
    out[:, 3] = np.where(on[:, 2], iso, 0.0)
    out[:, 4] = np.where(on[:, 3], theta, 0.0)
    out[:, 5] = np.where(on[:, 4], aniso, 0.0)
    out[:, 6] = np.where(on[:, 4], phi, 0.0)
    return out


def augment_labels(params: np.ndarray | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The network's conditioning vector(s), float32 [..., AUGMENT_DIM], from parameters [..., PARAM_DIM]."""
    q = torch.as_tensor(np.asarray(params), dtype=torch.float64)
    H, W = image_size
    flip, tx, ty, iso, theta, aniso, phi = q.unbind(-1)
    labels = [
        flip,
        tx / W,
        ty / H,
        iso,
        theta.cos() - 1,
        theta.sin(),
        aniso * (2 * phi).cos(),
        aniso * (2 * phi).sin(),
    ]
    return torch.stack(labels, dim=-1).to(torch.float32)


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def transform_matrix(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A [2, 2], t [2]) of the map from an input pixel to its output position, both as (x, y) offsets
    from the image centre: out = A @ in + t. The order: flip, translate, scale, rotate, stretch (the
    translation, applied to the image before the linear maps, is moved through them)."""
    flip, tx, ty, iso, theta, aniso, phi = (float(v) for v in params)
    F_ = np.diag([-1.0 if flip else 1.0, 1.0])
    L = (
        _rotation(phi)
        @ np.diag([2.0**aniso, 2.0**-aniso])
        @ _rotation(-phi)
        @ _rotation(theta)
        @ (2.0**iso * np.eye(2))
    )
    return L @ F_, L @ np.array([tx, ty])


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into 0..n-1 about the border (symmetric: -1 -> 0, n -> n-1)."""
    period = 2 * n
    index = index % period
    return torch.where(index >= n, period - 1 - index, index)


def apply(image: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """The image [C, H, W] (any dtype) transformed by `params` [PARAM_DIM]; the same dtype and shape.

    The border is filled by reflection, so no constant frame appears. A flip with an integer translation
    only moves pixels: it is done exactly. Anything else resamples bilinearly (in float32; integer images
    are rounded back to their own type, the precision the data has)."""
    _C, H, W = image.shape
    if not np.any(params):  # no transform drawn (most images at small p)
        return image
    flip, tx, ty, iso, theta, aniso, _phi = (float(v) for v in params)
    if iso == theta == aniso == 0:
        # Output pixel (r, c) comes from input (r - ty, c - tx), mirrored in x for a flip.
        rows = _reflect(torch.arange(H) - round(ty), H)
        cols = _reflect(torch.arange(W) - round(tx), W)
        if flip:
            cols = (W - 1) - cols
        return image[:, rows[:, None], cols[None, :]]
    A, t = transform_matrix(params)
    A_inv = np.linalg.inv(A)
    # Source position of each output pixel: src = A^-1 (out - t) in pixel offsets from the centre. In
    # grid_sample's units (align_corners=False: -1 and 1 are the outer edges of the border pixels) an
    # offset x is 2x/W, so with S = diag(W/2, H/2) the map is S^-1 A^-1 S out - S^-1 A^-1 t.
    S = np.diag([W / 2, H / 2])
    M = np.linalg.inv(S) @ A_inv
    theta = torch.as_tensor(np.concatenate([M @ S, -(M @ t)[:, None]], axis=1), dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 1, H, W], align_corners=False)
    x = image.to(torch.float32)[None]
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    if image.dtype.is_floating_point:
        return y.to(image.dtype)
    info = torch.iinfo(image.dtype)
    return y.round().clamp(info.min, info.max).to(image.dtype)
