"""The dataset tool: any source -> a folder or zip of same-sized PNGs (+ dataset.json) for ImageDataset.

Output layout: `00000/img00000000.png`, `00000/img00000001.png`, ... (1000 images per sub-folder) and,
when the source has labels, `dataset.json` = {"labels": [[name, label], ...], "num_classes": K}.
The output appears only when complete: it is written beside DEST under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from patchdiff.data.sources import LABELS_FILE, open_source

Transform = Literal["center-crop", "center-crop-wide", "pad"]
TRANSFORMS: tuple[str, ...] = ("center-crop", "center-crop-wide", "pad")
SKIPPED_LISTED = 5  # how many skipped names the summary lists
# Largest output side: one 4096x4096 RGB image is 48 MB decoded, and diffusion training at more than
# that is out of reach; a larger value is almost surely a typo (and would be allocated per image).
MAX_RESOLUTION = 4096


def parse_resolution(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '64x32' -> (H, W) = (64, 32)."""
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"--resolution {text!r}: expected a size like 64 or HxW like 64x64")
    check_resolution(sizes)  # type: ignore[arg-type]
    return sizes  # type: ignore[return-value]


def check_resolution(size: tuple[int, int]) -> None:
    if max(size) > MAX_RESOLUTION or min(size) < 1:
        raise ValueError(
            f"--resolution {size[0]}x{size[1]}: each side must be in 1..{MAX_RESOLUTION} "
            f"(a {MAX_RESOLUTION}x{MAX_RESOLUTION} RGB image is already 48 MB); pick a smaller size"
        )


# --------------------------------------------------------------------------- geometry (np.uint8 HxW[xC])


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (H, W) with Lanczos (PIL's filter widens when shrinking, so it does not alias)."""
    if image.shape[:2] == size:
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(resized)


def center_crop(image: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centred region whose width / height is `aspect`."""
    h, w = image.shape[:2]
    ch, cw = (h, round(h * aspect)) if w / h > aspect else (round(w / aspect), w)
    ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def pad_to_aspect(image: np.ndarray, aspect: float) -> np.ndarray:
    """The smallest black canvas with width / height = `aspect` that holds the image, image centred."""
    h, w = image.shape[:2]
    ph, pw = (h, round(h * aspect)) if w / h < aspect else (round(w / aspect), w)
    ph, pw = max(ph, h), max(pw, w)
    canvas = np.zeros((ph, pw, *image.shape[2:]), dtype=image.dtype)
    top, left = (ph - h) // 2, (pw - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def fit_width(image: np.ndarray, aspect: float) -> np.ndarray:
    """Keep the full width: a taller image loses rows top and bottom, a wider one gets black bars."""
    h, w = image.shape[:2]
    return center_crop(image, aspect) if w / h < aspect else pad_to_aspect(image, aspect)


def same_aspect(shape: tuple[int, ...], size: tuple[int, int]) -> bool:
    """Whether scaling `shape` (h, w) to height H leaves the width within a pixel of W, and vice versa."""
    (h, w), (H, W) = shape[:2], size
    return abs(w * H / h - W) <= 1 and abs(h * W / w - H) <= 1


def fit_image(
    image: np.ndarray, resolution: tuple[int, int] | None, transform: str | None, name: str
) -> np.ndarray:
    """Bring one image to `resolution` (H, W) with `transform`; no resolution means keep the size."""
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f"--transform {transform!r}: choose one of {', '.join(TRANSFORMS)}")
    if resolution is None:
        if transform is not None:
            raise ValueError(f"--transform {transform} needs --resolution HxW")
        return image
    aspect = resolution[1] / resolution[0]
    if transform == "center-crop":
        image = center_crop(image, aspect)
    elif transform == "center-crop-wide":
        image = fit_width(image, aspect)
    elif transform == "pad":
        image = pad_to_aspect(image, aspect)
    elif not same_aspect(image.shape, resolution):
        h, w = image.shape[:2]
        raise ValueError(
            f"{name} is {h}x{w}, which does not have the aspect ratio of --resolution "
            f"{resolution[0]}x{resolution[1]}; pick --transform {' | '.join(TRANSFORMS)}"
        )
    return resize(image, resolution)


# --------------------------------------------------------------------------- writers (atomic)


class _Writer:
    """Writes files under a temporary name beside `dest`; commit() renames it into place."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        self.is_zip = dest.suffix.lower() == ".zip"
        self._remove_tmp()
        try:
            if self.is_zip:
                self._zip = zipfile.ZipFile(
                    self.tmp, "w", compression=zipfile.ZIP_STORED
                )  # PNGs are compressed
            else:
                self.tmp.mkdir()
        except BaseException:  # e.g. Ctrl-C between creating the file and returning: leave nothing
            self._remove_tmp()
            raise

    def write(self, name: str, data: bytes) -> None:
        if self.is_zip:
            self._zip.writestr(name, data)
        else:
            path = self.tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def commit(self) -> None:
        if self.is_zip:
            self._zip.close()
        elif self.dest.is_dir():
            self.dest.rmdir()  # checked empty up front; a folder cannot be renamed onto one elsewhere
        os.replace(self.tmp, self.dest)

    def abort(self) -> None:
        if self.is_zip:
            with contextlib.suppress(Exception):
                self._zip.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp)
        elif self.tmp.exists():
            self.tmp.unlink()


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_dest(dest: Path, source: Path) -> None:
    src, out = source.resolve(), dest.resolve()
    if src.is_dir() and out.is_relative_to(src):
        raise ValueError(
            f"--dest {dest} is inside --source {source}: a later run would read the output back as input; "
            "choose a --dest outside the source folder"
        )
    if out == src:
        raise ValueError(f"--dest {dest} is the --source itself; choose another --dest")
    blocker = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"--dest {dest}: {blocker} is a file, not a folder; choose another --dest")
    if dest.is_dir() and any(dest.iterdir()):
        raise ValueError(f"--dest {dest} is a folder that is not empty; remove it or choose another --dest")
    if dest.is_dir() and dest.suffix.lower() == ".zip":
        raise ValueError(f"--dest {dest} is a folder; remove it or choose another name for the zip")
    if dest.is_file() and dest.stat().st_size > 0:
        raise ValueError(f"--dest {dest} already exists; remove it or choose another --dest")


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the conversion


@dataclass(frozen=True)
class ConvertSummary:
    count: int  # images written
    skipped: int  # unreadable images skipped (--skip-bad)
    skipped_names: tuple[str, ...]  # the first few of them
    resolution: tuple[int, int]  # (H, W)
    channels: int
    num_classes: int  # 0 = unlabeled
    dest: str

    def line(self) -> str:
        H, W = self.resolution
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabeled"
        text = f"wrote {self.count} images ({H}x{W}, {self.channels} channel(s), {classes}) to {self.dest}"
        if self.skipped:
            more = ", ..." if self.skipped > len(self.skipped_names) else ""
            text += f"; skipped {self.skipped} unreadable: {', '.join(self.skipped_names)}{more}"
        return text


def _match_channels(image: np.ndarray, channels: int, forced: bool, name: str) -> np.ndarray:
    if image.ndim == 2 and channels == 3:
        return np.repeat(image[:, :, None], 3, axis=2)  # grayscale fits an RGB data set losslessly
    if image.ndim == 3 and channels == 1:
        if forced:
            return np.asarray(Image.fromarray(image).convert("L"))
        raise ValueError(
            f"{name} is a colour image but the data set so far is grayscale; "
            "pass --channels 3 to keep colour or --channels 1 to convert it to gray"
        )
    return image


def _check_size(image: np.ndarray, shape: tuple[int, int], name: str, first_name: str) -> None:
    if image.shape[:2] != shape:  # only possible without --resolution
        raise ValueError(
            f"{name} is {image.shape[0]}x{image.shape[1]} but {first_name} is {shape[0]}x{shape[1]}; "
            "pass --resolution HxW (and --transform if the aspect ratios differ)"
        )


def convert_dataset(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    resolution: tuple[int, int] | None = None,
    transform: str | None = None,
    max_images: int | None = None,
    class_folders: bool = False,
    skip_bad: bool = False,
    channels: int | None = None,
    progress: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ConvertSummary:
    """Convert `source` (folder, zip, IDX file, CIFAR-10 tarball) into `dest` (`*.zip` or a folder).

    resolution: (H, W) to resize to; None keeps the source size, which must then be the same everywhere.
    transform: how to reach a different aspect ratio: "center-crop" (largest centred region with the
        target aspect), "center-crop-wide" (keep the full width: crop rows or add black bars top and
        bottom), "pad" (black borders, nothing lost). Without one, a differing aspect is an error.
    channels: 1 or 3 to force grayscale or RGB; None takes the first image's and widens later grayscale
        images to RGB when the data set is RGB.
    skip_bad: skip unreadable images (counted in the summary) instead of stopping at the first.
    """
    dest_path = Path(dest)
    _check_convert_args(resolution, transform, max_images, channels)
    src = open_source(source, class_folders, image_column, label_column)
    if len(src) == 0:
        raise ValueError(
            f"--source {source} holds no images (.png, .jpg, .jpeg, .webp); point it at your images"
        )
    _check_dest(dest_path, Path(source))

    skipped: list[str] = []
    total = len(src) if max_images is None else min(len(src), max_images)
    items = src.items((lambda name, error: skipped.append(name)) if skip_bad else None)
    made = [p for p in (dest_path.parent, *dest_path.parent.parents) if not p.exists()]  # deepest first
    writer: _Writer | None = None
    try:
        writer = _open_writer(dest)
        with contextlib.closing(items), tqdm(total=total, unit="img", disable=not progress) as bar:
            images = _write_images(writer, items, resolution, transform, channels, max_images, bar)
        if images.count == 0:
            raise ValueError(f"--source {source}: no readable images found")
        if src.num_classes:
            meta = {"labels": images.labels, "num_classes": src.num_classes}
            writer.write(LABELS_FILE, json.dumps(meta).encode())
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        _remove_empty(made)  # a failed run leaves no trace, not even DEST's new parent folders
        raise
    assert images.shape is not None and images.channels is not None
    return ConvertSummary(
        count=images.count,
        skipped=len(skipped),
        skipped_names=tuple(skipped[:SKIPPED_LISTED]),
        resolution=(int(images.shape[0]), int(images.shape[1])),
        channels=images.channels,
        num_classes=src.num_classes,
        dest=str(dest_path),
    )


def _check_convert_args(
    resolution: tuple[int, int] | None, transform: str | None, max_images: int | None, channels: int | None
) -> None:
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {max_images}")
    if channels not in (None, 1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if transform is not None and resolution is None:
        raise ValueError(f"--transform {transform} needs --resolution HxW")
    if resolution is not None:
        check_resolution(resolution)


def _open_writer(dest: str | os.PathLike) -> _Writer:
    try:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        return _Writer(Path(dest))
    except OSError as error:
        raise ValueError(
            f"--dest {dest}: cannot write there ({error.strerror or error}); choose another --dest"
        ) from None


@dataclass
class _Written:
    """What `_write_images` wrote: the count, [archive name, label] pairs, the size and channels."""

    count: int = 0
    labels: list[list[object]] = field(default_factory=list)
    shape: tuple[int, int] | None = None
    channels: int | None = None


def _write_images(
    writer: _Writer,
    items,
    resolution: tuple[int, int] | None,
    transform: str | None,
    channels: int | None,
    max_images: int | None,
    bar,
) -> _Written:
    """Fit each image to the size and channels, check it against the first one, and write it as a PNG
    (at most `max_images`)."""
    done = _Written(shape=resolution, channels=channels)
    forced_channels = channels is not None
    first_name = ""
    for name, image, label in items:
        image = fit_image(image, resolution, transform, name)
        done.channels = done.channels or (1 if image.ndim == 2 else 3)
        image = _match_channels(image, done.channels, forced_channels, name)
        if done.shape is None:
            done.shape, first_name = image.shape[:2], name
        _check_size(image, done.shape, name, first_name)
        archive_name = f"{done.count // 1000:05d}/img{done.count:08d}.png"
        writer.write(archive_name, encode_png(image))
        if label is not None:
            done.labels.append([archive_name, label])
        done.count += 1
        bar.update(1)
        if done.count == max_images:
            break
    return done
