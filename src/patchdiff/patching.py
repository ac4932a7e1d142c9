"""Patch Diffusion's crops (Wang et al. 2023, Sec. 3): coordinate grids, crops, and the crop plan.

The crop plan lives here and only here: the schedule's sizes, probabilities and images per base image
(`resolve_schedule` -> `PatchSchedule`), the crop size and image count of each step, phase boundaries
and training length (`StepPlan`), and the expectations over the plan that length and FLOPs are
counted with (`expected_images`, `mean_per_image`). Training's data stream (training/stream.py),
flops.py and the benchmarks use it.

One convention everywhere (training, sampling, tests): a pixel at (row, col) of an H x W image has
x = 2*col/(W-1) - 1 and y = 2*row/(H-1) - 1, so the full image spans [-1, 1] and a pixel keeps its
coordinates in every crop. Channel 0 is x, channel 1 is y.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patchdiff.config import PatchConfig, ScheduleKind


def _unit(positions: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """Pixel positions along an axis of n pixels mapped to [-1, 1] (0 -> -1, n-1 -> 1); a single pixel
    sits at 0."""
    if n == 1:
        return torch.zeros_like(positions, dtype=dtype)
    return positions.to(dtype) * (2.0 / (n - 1)) - 1.0


def _axis(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Positions 0..n-1 mapped to [-1, 1]."""
    return _unit(torch.arange(n, device=device), n, dtype)


def coordinate_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The full image's coordinate channels, [2, H, W]: channel 0 = x (column), channel 1 = y (row)."""
    x = _axis(width, device, dtype).expand(height, width)
    y = _axis(height, device, dtype)[:, None].expand(height, width)
    return torch.stack([x, y])


def crop_coords(
    top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], full: tuple[int, int], device=None
) -> torch.Tensor:
    """The coordinate channels [N, 2, h, w] of crops of size = (h, w) at per-image offsets (top, left:
    int64 [N]) in images of size full = (H, W): the full grid's values at the crops' pixels.

    Training cuts crops on the host and builds their coordinates here, on the device, from the offsets
    alone; `crop_at` uses it too, so there is one convention."""
    (h, w), (H, W) = size, full
    device = top.device if device is None else device
    # non_blocking: offsets come pinned from the loader, and a blocking copy would wait for the device.
    rows = top.to(device, non_blocking=True)[:, None] + torch.arange(h, device=device)  # [N, h]
    cols = left.to(device, non_blocking=True)[:, None] + torch.arange(w, device=device)  # [N, w]
    N = rows.shape[0]
    x = _unit(cols, W)[:, None, :].expand(N, h, w)
    y = _unit(rows, H)[:, :, None].expand(N, h, w)
    return torch.stack([x, y], dim=1)


def coordinate_features(coords: torch.Tensor, K: int) -> torch.Tensor:
    """The coordinate channels [N, 2, h, w] followed by K frequencies of each (Patch Diffusion's
    `--embed_fq`): sin(2^k pi c) and cos(2^k pi c) for k = 0..K-1 -> [N, 2 + 4K, h, w].

    Why: a network with coordinates as raw inputs resolves position only as finely as its first
    layers can sharpen a ramp; the sines give it a Fourier code of position (Tancik et al. 2020).
    Channel order: c, then for each k the sines of (x, y), then their cosines. K = 0 is the identity."""
    if K < 0:
        raise ValueError(f"--coord-embed {K}: must be >= 0")
    if K == 0:
        return coords
    features = [coords]
    for k in range(K):
        angle = (math.pi * 2.0**k) * coords
        features += [angle.sin(), angle.cos()]
    return torch.cat(features, dim=1)


def crop_at(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]):
    """Crop images [N, C, H, W] at per-image offsets (top, left: int64 [N]) to `size` = (h, w).

    Returns (patches [N, C, h, w], coords [N, 2, h, w]); one gather, no loop over the batch.
    """
    N, _C, H, W = images.shape
    h, w = size
    rows = top[:, None] + torch.arange(h, device=images.device)  # [N, h]
    cols = left[:, None] + torch.arange(w, device=images.device)  # [N, w]
    # Advanced indices around a slice put the batch dims first: [N, h, w, C] -> [N, C, h, w].
    n = torch.arange(N, device=images.device)[:, None, None]
    patches = images[n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return patches.contiguous(), crop_coords(top, left, size, (H, W), images.device)


# --------------------------------------------------------------------------- crop-size schedules


def shared_uniform(seed: int, step: int) -> float:
    """A uniform number that depends only on (seed, step): every rank draws the same crop size for a
    step without communicating, so no rank waits for a full-size rank (a trap in the published code)."""
    return float(np.random.default_rng([seed, step]).random())


@dataclass(frozen=True)
class PatchSchedule:
    """A resolved crop-size schedule for images of size H x W.

    sizes[i] is a square crop size (the last may be the whole image), probs[i] its probability
    (stochastic) or its phase's share of the images (progressive, fixed), batch_mult[i] the number of
    images per base image in a step of that size. Which size each step of a run uses: `StepPlan`.
    """

    kind: ScheduleKind
    image_size: tuple[int, int]
    sizes: tuple[int, ...]
    probs: tuple[float, ...]
    batch_mult: tuple[float, ...]
    coords: bool = True
    finish_full: float = 0.0  # stochastic: the last share of the images is trained on whole images
    crop_kimg: float = 0.0  # fixed: length of the crop phases in kimg (then whole images)
    margin: int = 0  # --crop-margin: context pixels on each side of a crop (`loss_mask`)

    def crop_shape(self, index: int) -> tuple[int, int]:
        """The shape the network sees at size `index`: the crop with its context margin on each side
        (at most the image's shorter side); the full-size entry covers the whole (possibly rectangular)
        image."""
        H, W = self.image_size
        size = self.sizes[index]
        if size >= min(H, W):
            return (H, W)
        window = min(size + 2 * self.margin, min(H, W))
        return (window, window)

    def draw(self, seed: int, step: int) -> int:
        """The crop size (index) of a step of the stochastic schedule: size i with probability probs[i],
        from `shared_uniform(seed, step)`, so every process draws the same one (the paper's stochastic
        schedule, Sec. 3). The whole-image schedule has one size and draws nothing; phased
        schedules have no draw (their steps' sizes come from `StepPlan.size_index`)."""
        if self.kind == "full":
            return len(self.sizes) - 1
        if self.kind != "stochastic":
            raise ValueError(f"the {self.kind} schedule's crop sizes come in phases: see StepPlan.size_index")
        u = shared_uniform(seed, step)
        cumulative = 0.0
        for i, p in enumerate(self.probs):
            cumulative += p
            if u < cumulative:
                return i
        return len(self.sizes) - 1

    def noise_band(self, index: int) -> tuple[float, float]:
        """The band of noise-level quantiles that crop size `index` trains on with `--noise-bands`.

        Sizes in increasing order take consecutive bands of width probs[i]: the smallest crops get the
        lowest noise levels, whole images the highest. Averaged over steps, ln(sigma) keeps its
        N(P_mean, P_std^2) distribution. Why: at low noise the ideal denoiser only looks at a small
        neighbourhood, which a crop holds; at high noise it needs the whole image, which only a
        full-size step shows.
        """
        lo = sum(self.probs[:index])
        return lo, min(lo + self.probs[index], 1.0)

    def images_per_round(self, batch_gpu: int, index: int) -> int:
        """Images each process loads per accumulation round at crop size `index`."""
        return max(1, round(batch_gpu * self.batch_mult[index]))

    def images_per_step(self, batch_gpu: int, rounds: int = 1, world: int = 1) -> tuple[int, ...]:
        """Images a step loads at each crop size: all `world` processes and `rounds` accumulation rounds
        together, `images_per_round` each."""
        return tuple(self.images_per_round(batch_gpu, i) * rounds * world for i in range(len(self.sizes)))


def default_sizes(
    resolution: int, real_p: float, latent: bool, min_crop: int = 0
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The paper's sizes: (R/4, R/2, R) with (1-p)*2/5, (1-p)*3/5, p; latent space (R/2, R) with 1-p, p.

    min_crop (--min-crop): crops smaller than this many pixels are left out, and their share goes to
    the crops of the next size, so with R/4 < min_crop <= R/2 the sizes are (R/2, R) with 1-p, p (as in
    latent space). Why: an 8-px crop of a 32-px image may show too little to teach anything useful."""
    R = resolution
    if latent or min_crop > R // 4:
        return (R // 2, R), (1.0 - real_p, real_p)
    return (R // 4, R // 2, R), ((1.0 - real_p) * 2 / 5, (1.0 - real_p) * 3 / 5, real_p)


def resolve_schedule(cfg: PatchConfig, image_size: tuple[int, int], min_crop: int = 1) -> PatchSchedule:
    """Check a PatchConfig against the image size and the network's down-sampling; fill in defaults."""
    H, W = image_size
    R = min(H, W)
    if not 0.0 <= cfg.real_p <= 1.0:
        raise ValueError(f"--real-p {cfg.real_p} must lie in [0, 1]")
    if cfg.schedule == "full":
        sizes, probs = (R,), (1.0,)
    elif cfg.sizes:
        sizes = tuple(cfg.sizes)
        probs = tuple(cfg.probs) if cfg.probs else tuple(1.0 / len(sizes) for _ in sizes)
    else:
        sizes, probs = default_sizes(R, cfg.real_p, cfg.latent, cfg.min_crop)
        if cfg.probs:  # probabilities for the default sizes
            if len(cfg.probs) != len(sizes):
                raise ValueError(
                    f"--patch-probs {','.join(map(str, cfg.probs))} gives {len(cfg.probs)} probabilities for "
                    f"the {len(sizes)} default sizes {sizes}; give one per size, or --patch-sizes too"
                )
            probs = tuple(cfg.probs)
    if len(probs) != len(sizes):
        raise ValueError(f"{len(sizes)} patch sizes {sizes} but {len(probs)} probabilities {probs}")
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"patch probabilities {probs} must be non-negative and sum to 1")
    if not 0.0 <= cfg.finish_full < 1.0:
        raise ValueError(f"--finish-full {cfg.finish_full} must lie in [0, 1)")
    if cfg.finish_full and cfg.schedule != "stochastic":
        raise ValueError(f"--finish-full needs --patch-schedule stochastic, not {cfg.schedule!r}")
    if cfg.finish_full and cfg.noise_bands:
        raise ValueError("--finish-full and --noise-bands do not combine; choose one")
    if cfg.noise_bands and cfg.schedule != "stochastic":
        raise ValueError(
            f"--noise-bands needs --patch-schedule stochastic (it ties noise levels to crop sizes drawn "
            f"within one run), not {cfg.schedule!r}"
        )
    if cfg.schedule == "fixed" and not (math.isfinite(cfg.crop_kimg) and cfg.crop_kimg > 0):
        raise ValueError(
            f"--patch-schedule fixed needs --crop-kimg K > 0 (the crop phase's length), not {cfg.crop_kimg}"
        )
    if cfg.crop_kimg and cfg.schedule != "fixed":
        raise ValueError(f"--crop-kimg needs --patch-schedule fixed, not {cfg.schedule!r}")
    if cfg.schedule == "fixed" and len(sizes) < 2:
        raise ValueError(f"--patch-schedule fixed needs crop sizes below the full size; got {sizes}")
    if list(sizes) != sorted(sizes):
        raise ValueError(f"patch sizes {sizes} must be in increasing order")
    if cfg.margin < 0:
        raise ValueError(f"--crop-margin {cfg.margin} must be >= 0 pixels")
    for s in sizes:
        if not 0 < s <= R:
            raise ValueError(f"patch size {s} must lie in 1..{R} for {H}x{W} images")
        if s < R and s % min_crop:
            raise ValueError(
                f"patch size {s} is not a multiple of {min_crop}, which the network's down-sampling "
                f"needs; pick sizes that are, or fewer --cres levels"
            )
        window = min(s + 2 * cfg.margin, R)
        if s < R and window < R and window % min_crop:
            raise ValueError(
                f"--crop-margin {cfg.margin}: patch size {s} with its margin on both sides is {window} pixels, "
                f"not a multiple of {min_crop}, which the network's down-sampling needs; pick a margin of "
                f"a multiple of {min_crop // math.gcd(min_crop, 2)}"
            )
    schedule = PatchSchedule(  # batch_mult follows from the windows: filled in below
        cfg.schedule,
        (H, W),
        sizes,
        probs,
        (1.0,) * len(sizes),
        coords=cfg.coords,
        finish_full=cfg.finish_full,
        crop_kimg=cfg.crop_kimg,
        margin=cfg.margin,
    )
    if cfg.batch_mult:
        batch_mult = tuple(cfg.batch_mult)
    else:  # R/P for square images (P with its margin); in general sqrt(frame pixels / window pixels)
        batch_mult = tuple(default_batch_mult((H, W), schedule.crop_shape(i)) for i in range(len(sizes)))
    if len(batch_mult) != len(sizes) or any(m <= 0 for m in batch_mult):
        raise ValueError(f"batch multipliers {batch_mult} must be positive, one per patch size {sizes}")
    return dataclasses.replace(schedule, batch_mult=batch_mult)


def loss_mask(
    top: torch.Tensor,
    left: torch.Tensor,
    window: tuple[int, int],
    full: tuple[int, int],
    margin: int,
    device=None,
) -> torch.Tensor:
    """The pixels a crop's loss counts, [N, 1, h, w] (1 or 0), for windows of shape `window` = (h, w) at
    offsets (top, left: int64 [N]) in images of shape `full` = (H, W), cut with --crop-margin `margin`.

    The loss leaves out `margin` pixels along each side of the window that lies inside the image: the
    network sees them as context, so the pixels it is scored on have real neighbours, not the zero
    padding at a crop's border. A side on the image's own border keeps its pixels (the whole image has
    zero padding there too), so every pixel of the image can be scored. Whole images: all ones."""
    (h, w), (H, W) = window, full
    device = top.device if device is None else device
    top, left = top.to(device, non_blocking=True), left.to(device, non_blocking=True)

    def keep(start: torch.Tensor, n: int, total: int) -> torch.Tensor:  # [N, n] booleans along one axis
        i = torch.arange(n, device=device)
        first = (i >= margin) | (start[:, None] == 0)
        last = (i < n - margin) | (start[:, None] + n >= total)
        return first & last

    rows, cols = keep(top, h, H), keep(left, w, W)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).float()


def default_batch_mult(frame: tuple[int, int], crop: tuple[int, int]) -> float:
    """Images per base image for crops of shape `crop` = (h, w) cut from frames of shape (H, W):
    sqrt(H*W / (h*w)), the square root of the inverse of the crop's share of the frame's pixels. For a
    square image this is the paper's R/P; a rectangle's square crops get the same rule from their share
    of its pixels, and the whole frame gets 1."""
    (H, W), (h, w) = frame, crop
    return math.sqrt(H * W) / math.sqrt(h * w)  # exactly R / P for squares (integer square roots)


# --------------------------------------------------------------------------- expectations


def expected_images(schedule: PatchSchedule, images_per_size: Sequence[int]) -> float:
    """Images per step as the paper counts training length, from the images a step loads at each size:
    their expectation over the drawn sizes (stochastic: 1.9 x the batch at real_p 0.5, as
    sum_i p_i R/P_i), else the whole-image step's count (progressive and fixed phases count their own
    images: `StepPlan.nimg`)."""
    if schedule.kind == "stochastic":
        return sum(p * n for p, n in zip(schedule.probs, images_per_size, strict=True))
    return float(images_per_size[-1])


def crop_phase_mean(schedule: PatchSchedule, values: Sequence[float]) -> float:
    """Fixed schedule: the mean per image of a per-size quantity (values[i] at sizes[i]) over its crop
    phase, whose phases share the images as probs[:-1] do."""
    crops = values[:-1]
    return sum(p * v for p, v in zip(schedule.probs[:-1], crops, strict=True)) / sum(schedule.probs[:-1])


def mean_per_image(
    schedule: PatchSchedule, values: Sequence[float], duration_kimg: float | None = None
) -> float:
    """The mean per training image of a per-size quantity (values[i] at sizes[i], e.g. counted FLOPs),
    as the plan spreads the images over the sizes, with images per base image n_i = batch_mult[i]:

        stochastic:   sum_i p_i n_i v_i / sum_i p_i n_i   (steps drawn with p_i, n_i images each);
                      with --finish-full F, (1 - F) of that + F v_full
        progressive:  sum_i p_i v_i                        (phase i holds a share p_i of the images)
        full:         v_full
        fixed:        c crop_phase_mean + (1 - c) v_full,  c = min(crop_kimg, kimg) / kimg

    The fixed schedule's crop phase has a fixed length, so its mean depends on the run's `duration_kimg`."""
    if schedule.kind == "full":
        return values[-1]
    if schedule.kind == "fixed":
        if not duration_kimg or duration_kimg <= 0:
            raise ValueError(
                "the fixed schedule's mean per image depends on the run's length: give duration_kimg"
            )
        c = min(schedule.crop_kimg, duration_kimg) / duration_kimg
        return c * crop_phase_mean(schedule, values) + (1 - c) * values[-1]
    if schedule.kind == "progressive":
        return sum(p * v for p, v in zip(schedule.probs, values, strict=True))
    weights = [p * n for p, n in zip(schedule.probs, schedule.batch_mult, strict=True)]
    stochastic = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
    return (1.0 - schedule.finish_full) * stochastic + schedule.finish_full * values[-1]


# --------------------------------------------------------------------------- the plan of a run


@dataclass(frozen=True)
class StepPlan:
    """The crop plan of a run: crop size and image count of each step, phase boundaries, and training
    length in steps for a duration in images. Everything is a pure function of (schedule, seed, step),
    so every process agrees on every step and a resumed run continues the same plan.

    Images seen are counted as the paper does: the expected number of images per step (stochastic),
    or the images of the current phase (progressive, fixed, full). `images_per_step` comes from
    `PatchSchedule.images_per_step` (all processes and accumulation rounds together).
    """

    schedule: PatchSchedule
    seed: int
    images_per_step: tuple[int, ...]  # per crop size: all processes and accumulation rounds together
    duration_nimg: float
    saved_bounds: tuple[int, ...] = ()  # a resumed run's phase boundaries: its phases never move

    @property
    def phased(self) -> bool:
        """Crop sizes in phases of increasing size (progressive, fixed) rather than drawn per step."""
        return self.schedule.kind in ("progressive", "fixed")

    @property
    def phase_bounds(self) -> list[int]:
        """Progressive schedule: the first step of each later phase (phase i covers share probs[i] of
        the images); the last phase lasts until the duration is reached. A resumed run keeps its
        earlier boundaries even when its duration changes, so only the last phase grows or shrinks.

        Fixed schedule: the crop phases together cover crop_kimg (or the whole run, if shorter), phase i
        a share probs[i] / sum(probs[:-1]) of it, whatever the duration: the crop phase does not grow
        with the run. Whole images follow."""
        shares, span = self.schedule.probs[:-1], self.duration_nimg
        if self.schedule.kind == "fixed":
            span = min(self.schedule.crop_kimg * 1000, self.duration_nimg)
            shares = tuple(p / sum(shares) for p in shares) if sum(shares) > 0 else shares
        bounds, total = [], 0
        for p, n in zip(shares, self.images_per_step[:-1], strict=True):
            total += math.ceil(p * span / n)
            bounds.append(total)
        if len(self.saved_bounds) == len(self.images_per_step):
            bounds = list(self.saved_bounds[:-1])
        seen = sum((b - a) * n for a, b, n in zip([0, *bounds], bounds, self.images_per_step, strict=False))
        last = max(math.ceil((self.duration_nimg - seen) / self.images_per_step[-1]), 0)
        return [*bounds, (bounds[-1] if bounds else 0) + last]

    @property
    def expected_images(self) -> float:
        """Images per step as training length counts them (`expected_images`)."""
        return expected_images(self.schedule, self.images_per_step)

    @property
    def finish_step(self) -> int | None:
        """--finish-full: the first step of the whole-image finish, which trains on the last share
        `finish_full` of the images (None without one). It follows the duration, as the total does."""
        if self.schedule.kind != "stochastic" or self.schedule.finish_full <= 0:
            return None
        return math.ceil((1.0 - self.schedule.finish_full) * self.duration_nimg / self.expected_images)

    @property
    def total_steps(self) -> int:
        """The steps that see `duration_nimg` images (the paper's count)."""
        if self.phased:
            return self.phase_bounds[-1]
        finish = self.finish_step
        if finish is not None:
            rest = self.duration_nimg - finish * self.expected_images
            return max(1, finish + max(math.ceil(rest / self.images_per_step[-1]), 0))
        return max(1, math.ceil(self.duration_nimg / self.expected_images))

    def size_index(self, step: int) -> int:
        """The crop size (index) of `step`: its phase's, the whole image in the --finish-full finish,
        else the stochastic draw of (seed, step)."""
        if self.phased:
            return min(bisect.bisect_right(self.phase_bounds, step), len(self.images_per_step) - 1)
        finish = self.finish_step
        if finish is not None and step >= finish:
            return len(self.images_per_step) - 1
        return self.schedule.draw(self.seed, step)

    def nimg(self, step: int) -> float:
        """Images seen (paper count) after `step` steps."""
        finish = self.finish_step
        if finish is not None:
            return min(step, finish) * self.expected_images + max(step - finish, 0) * self.images_per_step[-1]
        if not self.phased:
            return step * self.expected_images
        total, start = 0.0, 0
        for bound, n in zip(self.phase_bounds, self.images_per_step, strict=True):
            total += (min(step, bound) - start) * n if step > start else 0
            start = bound
        return total
