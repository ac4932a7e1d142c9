"""Where samples lie in a model's coordinate frame: regions, larger canvases and tiles.

A model trained on H0 x W0 images knows each pixel by its coordinates (patching.py). A sample need not
be the whole training frame:

- a region is a window of the frame; it gets the coordinates of those pixels (the published code's
  --x_start/--y_start/--image_size);
- a canvas larger than the frame keeps the frame centred and the same pixel pitch, so its coordinates
  run past [-1, 1];
- a tiled canvas is denoised as overlapping frame-size windows, and at every step the windows'
  denoised estimates are averaged where they overlap (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5: the
  least-squares fit of one image to all windows' estimates is their per-pixel mean). It is a denoiser
  D(x, sigma) like any other, so every sampler runs on it unchanged.

All offsets are in pixels of the model's grid (latent cells for a latent model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from patchdiff.patching import crop_coords
from patchdiff.sampling import DenoiserFn

TileCoords = str  # "frame": every window carries the training frame's grid; "canvas": its canvas slice


@dataclass(frozen=True)
class Canvas:
    """A sampled image of `size` = (H, W) whose pixel (0, 0) lies at `offset` = (top, left) of the
    training frame of size `frame`; offsets may be negative (a canvas larger than the frame).

    tile: denoise as frame-size windows `stride` apart (default half a window), each window with the
    coordinates given by `tile_coords`."""

    frame: tuple[int, int]
    size: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    tile: bool = False
    stride: int | None = None
    tile_coords: TileCoords = "frame"

    @property
    def is_frame(self) -> bool:
        """The plain training frame: sampled exactly as without a canvas."""
        return self.size == self.frame and self.offset == (0, 0) and not self.tile


def frame_canvas(frame: tuple[int, int]) -> Canvas:
    return Canvas(frame, frame)


def region_canvas(frame: tuple[int, int], x0: int, y0: int, height: int, width: int) -> Canvas:
    """The window of the frame with top-left pixel (row y0, column x0), height x width pixels."""
    H0, W0 = frame
    if not (y0 >= 0 and x0 >= 0 and height > 0 and width > 0 and y0 + height <= H0 and x0 + width <= W0):
        raise ValueError(
            f"--region {x0},{y0},{height},{width} (X0,Y0,H,W) does not lie inside the {H0}x{W0} training "
            f"frame; pick X0 + W <= {W0} and Y0 + H <= {H0}, or use --canvas for a larger image"
        )
    return Canvas(frame, (height, width), (y0, x0))


def centred_canvas(
    frame: tuple[int, int],
    height: int,
    width: int,
    tile: bool = False,
    stride: int | None = None,
    tile_coords: TileCoords = "frame",
) -> Canvas:
    """A height x width canvas with the training frame in its middle (rounded up-left to whole pixels,
    so canvas pixels keep the frame's coordinates)."""
    H0, W0 = frame
    if height < H0 or width < W0:
        raise ValueError(
            f"--canvas {height},{width} is smaller than the {H0}x{W0} training frame; use --region for a "
            "window of the frame"
        )
    if tile_coords not in ("frame", "canvas"):
        raise ValueError(f"tile coordinates {tile_coords!r}: choose frame or canvas")
    if stride is not None and not 0 < stride <= min(H0, W0):
        raise ValueError(f"--tile-stride {stride}: must lie in 1..{min(H0, W0)} (the window size)")
    return Canvas(
        frame, (height, width), (-((height - H0) // 2), -((width - W0) // 2)), tile, stride, tile_coords
    )


def window_coords(
    top: int, left: int, size: tuple[int, int], frame: tuple[int, int], device=None
) -> torch.Tensor:
    """[2, h, w] coordinates of an h x w window whose pixel (0, 0) lies at (top, left) of the frame: the
    training convention (patching.crop_coords), continued past the frame at the same pitch."""
    return crop_coords(torch.tensor([top]), torch.tensor([left]), size, frame, device)[0]


def canvas_coords(canvas: Canvas, device=None) -> torch.Tensor:
    """[2, H, W] coordinates of the whole canvas."""
    return window_coords(*canvas.offset, canvas.size, canvas.frame, device)


def tile_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts along an axis: every `stride` pixels, and a last window flush with the end, so the
    windows cover 0..length-1 and each lies inside."""
    if not 0 < window <= length or stride < 1:
        raise ValueError(f"windows of {window} with stride {stride} cannot tile {length} pixels")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def tile_windows(canvas: Canvas) -> list[tuple[int, int]]:
    """(top, left) in the canvas of each frame-size window that tiles it, row by row."""
    (H, W), (h, w) = canvas.size, canvas.frame
    stride = canvas.stride or max(1, min(h, w) // 2)
    return [(t, l) for t in tile_starts(H, h, stride) for l in tile_starts(W, w, stride)]


def tile_window_coords(canvas: Canvas, top: int, left: int, device=None) -> torch.Tensor:
    """[2, h, w] coordinates a tile at (top, left) of the canvas is denoised with."""
    if canvas.tile_coords == "frame":
        return window_coords(0, 0, canvas.frame, canvas.frame, device)
    return window_coords(canvas.offset[0] + top, canvas.offset[1] + left, canvas.frame, canvas.frame, device)


def tiled_denoiser(
    windows: Sequence[tuple[tuple[int, int], DenoiserFn]], window: tuple[int, int]
) -> DenoiserFn:
    """D(x, sigma) of a canvas from denoisers of its windows: `windows` holds ((top, left), D_w) for each
    window of size `window`; each pixel's estimate is the mean of the estimates of the windows over it."""
    h, w = window

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        count = torch.zeros(x.shape[-2:], dtype=x.dtype, device=x.device)
        for (top, left), D_w in windows:
            total[..., top : top + h, left : left + w] += D_w(x[..., top : top + h, left : left + w], sigma)
            count[top : top + h, left : left + w] += 1
        return total / count

    return D


def canvas_denoiser(canvas: Canvas, at: Callable[[torch.Tensor], DenoiserFn], device=None) -> DenoiserFn:
    """The denoiser of a canvas, given `at(coords [2, h, w])` -> the model's D(x, sigma) on windows with
    those coordinates: one call on the whole canvas, or the tiled mean."""
    if not canvas.tile:
        return at(canvas_coords(canvas, device))
    windows = [((t, l), at(tile_window_coords(canvas, t, l, device))) for t, l in tile_windows(canvas)]
    return tiled_denoiser(windows, canvas.frame)
