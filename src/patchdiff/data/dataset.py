"""ImageDataset: the training images, from a folder or a zip in the EDM layout.

Layout: image files (PNG, JPEG, WebP) anywhere below the root, read in sorted order, plus an optional
`dataset.json` at the root, `{"labels": [["relative/path.png", 3], ...]}` or `{"labels": null}`.
`patchdiff dataset` writes this layout. Items are (uint8 [C, H, W] tensor, int label).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdiff.data.sources import (
    LABELS_FILE,
    decode_image,
    list_folder_images,
    list_zip_images,
    lookup_labels,
    parse_labels_json,
    probe_image,
    read_member,
)

_FIX = "convert the data with `patchdiff dataset --source SRC --dest DEST --resolution HxW`"


class ImageDataset(torch.utils.data.Dataset):
    """Images of one size and channel count, with optional integer class labels.

    xflip: the dataset doubles in length; item i >= N is item i - N mirrored left-right. The mirror is
        a fixed part of the index, not a coin flip, so a saved data position resumes exactly.
    cache: keep decoded images in memory after the first read (per DataLoader worker process).
    max_images: use only the first N images (in sorted order).
    verify: read every image header up front so a stray size or channel count fails now, naming the
        file, rather than hours into training. Decoded images are always checked as well.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        xflip: bool = False,
        cache: bool = False,
        max_images: int | None = None,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        self.xflip = xflip
        self.cache = cache
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None  # the process that opened self._zip
        self._cached: dict[int, np.ndarray] = {}

        if not self.path.exists():
            raise FileNotFoundError(f"dataset {path} does not exist; {_FIX}")
        json_text: bytes | None = None
        if self.path.is_dir():
            self._is_zip = False
            names = list_folder_images(self.path)
            json_path = self.path / LABELS_FILE
            if json_path.is_file():
                json_text = json_path.read_bytes()
        elif zipfile.is_zipfile(self.path):
            self._is_zip = True
            archive = self._archive()  # kept open for the reads below: a big zip's directory is slow to parse
            names = list_zip_images(archive)
            with contextlib.suppress(KeyError):  # KeyError: no dataset.json in the zip
                json_text = read_member(archive, LABELS_FILE, str(self.path))
        else:
            raise ValueError(f"dataset {path} is neither a folder nor a zip file; {_FIX}")
        if not names:
            raise ValueError(f"dataset {path} holds no .png/.jpg/.jpeg/.webp images; {_FIX}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")

        where = self._where(LABELS_FILE)
        labels, num_classes = (None, 0) if json_text is None else parse_labels_json(json_text, where)
        self._has_labels = labels is not None
        self._num_classes = num_classes
        values = [0] * len(names) if labels is None else lookup_labels(names, labels, where)  # all names
        self._names = names[:max_images]
        self._labels = np.asarray(values[:max_images], dtype=np.int64)

        self._shape = probe_image(self._read_bytes(names[0]), self._where(names[0]))  # (H, W, C)
        if verify:
            for name in names[1:]:
                self._check_shape(probe_image(self._read_bytes(name), self._where(name)), name)

    # ------------------------------------------------------------------ properties

    @property
    def resolution(self) -> tuple[int, int]:
        return self._shape[0], self._shape[1]

    @property
    def num_channels(self) -> int:
        return self._shape[2]

    @property
    def num_classes(self) -> int:
        """0 when unlabeled; otherwise one more than the largest label (or dataset.json's num_classes)."""
        return self._num_classes

    @property
    def has_labels(self) -> bool:
        return self._has_labels

    @property
    def num_images(self) -> int:
        """Distinct images on disk (len() counts mirrored copies too)."""
        return len(self._names)

    @property
    def image_names(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def labels(self) -> np.ndarray:
        """int64 [len(self)]: the label of every index, mirrored copies included (zeros when unlabeled)."""
        return np.tile(self._labels, 2) if self.xflip else self._labels.copy()

    def label(self, index: int) -> int:
        """The label of one index without decoding its image."""
        return int(self._labels[self._raw_index(index)[0]])

    def __len__(self) -> int:
        return len(self._names) * (2 if self.xflip else 1)

    # ------------------------------------------------------------------ items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raw, flip = self._raw_index(index)
        image = self._cached.get(raw)
        if image is None:
            image = self._load(raw)
            if self.cache:
                self._cached[raw] = image
        image = image[:, :, ::-1] if flip else image
        return torch.from_numpy(np.ascontiguousarray(image)), int(self._labels[raw])  # always a fresh copy

    def _raw_index(self, index: int) -> tuple[int, bool]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        index %= n
        return index % len(self._names), index >= len(self._names)

    def _load(self, raw: int) -> np.ndarray:
        """Decode image `raw` to uint8 [C, H, W]."""
        name = self._names[raw]
        image = decode_image(self._read_bytes(name), self._where(name))
        image = image[:, :, None] if image.ndim == 2 else image
        self._check_shape(image.shape, name)  # type: ignore[arg-type]
        return image.transpose(2, 0, 1)

    def _check_shape(self, shape: tuple[int, int, int], name: str) -> None:
        if tuple(shape) != self._shape:
            (h, w, c), (H, W, C) = shape, self._shape
            raise ValueError(
                f"{self._where(name)} is {h}x{w} with {c} channel(s) but {self._where(self._names[0])} is "
                f"{H}x{W} with {C}; all images must match: {_FIX}"
            )

    # ------------------------------------------------------------------ file access

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._is_zip else str(self.path / name)

    def _read_bytes(self, name: str) -> bytes:
        if not self._is_zip:
            return (self.path / name).read_bytes()
        return read_member(self._archive(), name, str(self.path))

    def _archive(self) -> zipfile.ZipFile:
        # A ZipFile's handle must not be shared across processes (DataLoader workers fork with a copy
        # of it and would race on one file offset), so each process opens its own, lazily.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers receive a pickled copy: send no file handle (and no cache).
        state = dict(self.__dict__)
        state.update(_zip=None, _zip_pid=None, _cached={})
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # may run on a half-built object or at interpreter exit
            self.close()

    def __repr__(self) -> str:
        H, W = self.resolution
        classes = f"{self.num_classes} classes" if self.has_labels else "unlabeled"
        return f"ImageDataset({str(self.path)!r}, {len(self)} items, {H}x{W}x{self.num_channels}, {classes})"
