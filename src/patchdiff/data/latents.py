"""Latent data sets: images encoded once by the VAE, stored as the posterior's mean and std.

Layout of a latent set (a folder):

    dataset.json               {"format": "patchdiff-latents", "vae", "scaling_factor", "pixel_size",
                                "latent_size", "latent_channels", "channel_mean", "channel_std",
                                "num_images", "num_classes", "labels", "shards": [[file, count], ...]}
    shard-00000.npy            float16 [n, 2, C, h, w]: posterior mean and std of n images
    shard-00000.json           its labels, image names and latent moments (the shard's commit mark)

fp16 keeps ~3 significant digits of the mean and std, far below the posterior's own spread. The set is
written under DEST.partial and renamed to DEST when complete; each shard is written atomically, so an
interrupted run started again with the same flags skips the shards it finished. A preview of a few
images decoded back is written beside DEST as DEST-preview.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from patchdiff.config import LatentConfig, TrainConfig
from patchdiff.data.convert import fit_image
from patchdiff.data.dataset import ImageDataset
from patchdiff.data.sources import LABELS_FILE, open_source
from patchdiff.files import atomic_write

FORMAT = "patchdiff-latents"
PARTIAL = ".partial"


def is_latent_dataset(path: str | os.PathLike) -> bool:
    meta = Path(path) / LABELS_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def open_dataset(path: str | os.PathLike, xflip: bool = False, cache: bool = False):
    """The training set at `path`: a LatentDataset for a latent set, else an ImageDataset."""
    if is_latent_dataset(path):
        if xflip:
            raise ValueError(
                f"--xflip does not apply to the latent set {path}: a mirrored latent is not the latent of "
                "the mirrored image; drop --xflip"
            )
        return LatentDataset(path)
    return ImageDataset(path, xflip=xflip, cache=cache)


# --------------------------------------------------------------------------- reading


class LatentDataset(torch.utils.data.Dataset):
    """Items are (float16 [2, C, h, w] = posterior mean and std, int label). Shards are memory-mapped."""

    is_latent = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        where = self.path / LABELS_FILE
        if not is_latent_dataset(self.path):
            raise ValueError(
                f"{where} is not a patchdiff latent set; write one with `patchdiff dataset --vae`"
            )
        self.meta: dict[str, Any] = json.loads(where.read_text())
        self._shards = [(name, int(n)) for name, n in self.meta["shards"]]
        self._starts = np.cumsum([0] + [n for _, n in self._shards])
        self._maps: dict[int, np.ndarray] = {}
        labels = self.meta.get("labels")
        self._labels = np.asarray(labels if labels is not None else [0] * len(self), dtype=np.int64)
        if len(self._labels) != len(self):
            raise ValueError(
                f"{where}: {len(self._labels)} labels for {len(self)} images; write the set again"
            )

    @property
    def vae(self) -> str:
        return str(self.meta["vae"])

    @property
    def resolution(self) -> tuple[int, int]:
        h, w = self.meta["latent_size"]
        return int(h), int(w)

    @property
    def pixel_size(self) -> tuple[int, int]:
        H, W = self.meta["pixel_size"]
        return int(H), int(W)

    @property
    def num_channels(self) -> int:
        return int(self.meta["latent_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def has_labels(self) -> bool:
        return self.meta.get("labels") is not None

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent set of {len(self)} items")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        if shard not in self._maps:
            self._maps[shard] = np.load(self.path / self._shards[shard][0], mmap_mode="r", allow_pickle=False)
        item = np.array(self._maps[shard][index - self._starts[shard]])  # a copy out of the map
        return torch.from_numpy(item), int(self._labels[index])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # workers map the files themselves

    def __repr__(self) -> str:
        h, w = self.resolution
        return f"LatentDataset({str(self.path)!r}, {len(self)} items, {h}x{w}x{self.num_channels}, vae {self.vae})"


def resolve_latent(cfg: TrainConfig, dataset: Any) -> TrainConfig:
    """For a latent set: record its VAE and scaling in the config and use the latent crop sizes."""
    if not getattr(dataset, "is_latent", False):
        if cfg.latent.vae:
            raise ValueError(
                f"the run was trained on latents of {cfg.latent.vae} but {cfg.data} holds images"
            )
        return cfg
    if cfg.metrics and not cfg.metric_ref:
        raise ValueError(
            f"--metrics on the latent set {cfg.data} need --metric-ref REF.npz; make it from the images with "
            "`patchdiff fid ref --data IMAGES --dest REF.npz`"
        )
    meta = dataset.meta
    shift, scale = _scaling(cfg.latent.norm, meta, cfg.loss.sigma_data)
    latent = LatentConfig(
        vae=dataset.vae, norm=cfg.latent.norm, shift=shift, scale=scale, pixel_size=dataset.pixel_size
    )
    return dataclasses.replace(cfg, latent=latent, patch=dataclasses.replace(cfg.patch, latent=True))


def _scaling(norm: str, meta: dict, sigma_data: float):
    from patchdiff.latent import latent_scaling  # light: diffusers is imported only to load a VAE

    return latent_scaling(
        norm, meta["scaling_factor"], tuple(meta["channel_mean"]), tuple(meta["channel_std"]), sigma_data
    )


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class LatentSummary:
    count: int
    resumed: int  # images found already encoded in DEST.partial
    skipped: int  # unreadable images skipped (--skip-bad)
    pixel_size: tuple[int, int]
    latent_shape: tuple[int, int, int]  # (C, h, w)
    num_classes: int
    dest: str
    preview: str

    def line(self) -> str:
        C, h, w = self.latent_shape
        H, W = self.pixel_size
        again = f" ({self.resumed} from an earlier run)" if self.resumed else ""
        again += f", skipped {self.skipped} unreadable" if self.skipped else ""
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabeled"
        return (
            f"wrote {self.count} latents{again} ({H}x{W} pixels -> {C}x{h}x{w}, {classes}) to {self.dest}; "
            f"preview {self.preview}"
        )


def _atomic(path: Path, write) -> None:
    """atomic_write with write(f) given the open binary file (np.save appends .npy to a bare name)."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]


def encode_dataset(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    vae: Any,
    resolution: tuple[int, int] | None = None,
    transform: str | None = None,
    max_images: int | None = None,
    class_folders: bool = False,
    skip_bad: bool = False,
    shard_size: int = 1000,
    batch: int = 32,
    preview: int = 8,
    progress: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
) -> LatentSummary:
    """Resize/crop images as `patchdiff dataset` does, encode them with `vae` (a latent.VAE) and write a
    latent set to the folder `dest`. Started again after an interruption, it skips finished shards."""
    dest = Path(dest)
    _check_encode_args(dest, max_images, shard_size, batch)
    src = open_source(source, class_folders, image_column, label_column)
    work = dest.with_name(dest.name + PARTIAL)
    settings = dict(
        format=FORMAT,
        source=str(source) if str(source).startswith("hf:") else str(Path(source).resolve()),  # hub: a name
        vae=vae.source,
        resolution=list(resolution) if resolution else None,
        transform=transform,
        class_folders=class_folders,
        skip_bad=skip_bad,
        shard_size=shard_size,
        max_images=max_images,  # the last shard's length depends on it
    )
    _start_work(work, settings)
    skipped: list[str] = []
    items = src.items((lambda name, error: skipped.append(name)) if skip_bad else None)
    total = len(src) if max_images is None else min(len(src), max_images)
    writer = _ShardWriter(work, vae, batch, resolution, transform)
    with tqdm(total=total, unit="img", desc="encode", disable=not progress) as bar:
        count = writer.write_all(items, shard_size, max_images, bar)
    if count == 0:
        raise ValueError(f"--source {source}: no readable images found")
    meta = _commit(work, dest, writer.shard, vae, src.num_classes)
    preview_path = dest.with_name(dest.name + "-preview.png")
    if preview:
        write_preview(LatentDataset(dest), vae, preview_path, preview)
    return LatentSummary(
        count=count,
        resumed=writer.resumed,
        skipped=len(skipped),
        pixel_size=tuple(meta["pixel_size"]),
        latent_shape=(meta["latent_channels"], *meta["latent_size"]),
        num_classes=src.num_classes,
        dest=str(dest),
        preview=str(preview_path) if preview else "none",
    )


def _check_encode_args(dest: Path, max_images: int | None, shard_size: int, batch: int) -> None:
    if dest.suffix.lower() == ".zip":
        raise ValueError(f"--dest {dest}: a latent set is a folder; drop the .zip")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"--dest {dest} already exists; remove it or choose another --dest")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {max_images}")
    if shard_size < 1 or batch < 1:
        raise ValueError(f"--shard-size ({shard_size}) and --vae-batch ({batch}) must be at least 1")


def _start_work(work: Path, settings: dict[str, Any]) -> None:
    """DEST.partial with `settings` recorded: an interrupted run's shards are kept if its settings were
    the same, refused if not; a folder without finished shards starts over."""
    started = work / "settings.json"
    finished = list(work.glob("shard-*.json")) if work.is_dir() else []
    if finished and started.is_file() and json.loads(started.read_text()) != settings:
        raise ValueError(
            f"{work} holds {len(finished)} shard(s) of an interrupted run with other settings; remove it or "
            "repeat that run's flags"
        )
    if not finished and work.is_dir():
        shutil.rmtree(work)  # nothing worth keeping
    work.mkdir(parents=True, exist_ok=True)
    _atomic(started, lambda f: f.write(json.dumps(settings).encode()))


class _ShardWriter:
    """Encodes images shard by shard into DEST.partial: `shard` is the index of the shard being filled,
    whose images wait in `buffer`; shards an earlier run finished are skipped (counted in `resumed`)."""

    def __init__(self, work: Path, vae: Any, batch: int, resolution, transform) -> None:
        self.work, self.vae, self.batch = work, vae, batch
        self.resolution, self.transform = resolution, transform
        self.buffer: list[tuple[str, np.ndarray, int | None]] = []
        self.shard = self.resumed = 0
        self.pixel_size: tuple[int, int] | None = None

    def write_all(self, items, shard_size: int, max_images: int | None, bar) -> int:
        """Encode `items` (name, image, label) in shards of `shard_size`; returns the images counted."""
        count = 0
        for name, image, label in items:
            if (self.work / f"shard-{self.shard:05d}.json").is_file():
                self.resumed += 1
            else:
                self.add(name, image, label)
            count += 1
            bar.update(1)
            last = count == max_images
            if count % shard_size == 0 or last:
                self.close_shard()
            if last:
                break
        if count % shard_size and count != max_images:  # the last, short shard
            self.close_shard()
        return count

    def add(self, name: str, image: np.ndarray, label: int | None) -> None:
        image = _to_rgb(fit_image(image, self.resolution, self.transform, name))
        if self.pixel_size is None:  # the first image's, which the VAE must be able to encode
            self.pixel_size = _check_pixel_size(image.shape[:2], self.vae.factor)
        pixel_size = self.pixel_size
        if image.shape[:2] != pixel_size:  # only possible without --resolution
            raise ValueError(
                f"{name} is {image.shape[0]}x{image.shape[1]} but earlier images are "
                f"{pixel_size[0]}x{pixel_size[1]}; pass --resolution HxW (and --transform)"
            )
        self.buffer.append((name, image, label))

    def close_shard(self) -> None:
        if self.buffer:
            self.flush()
        self.shard += 1

    def flush(self) -> None:
        """Encode the buffered images and write the shard: its .npy, then its .json, which commits it."""
        buffer, batch = self.buffer, self.batch
        images = torch.from_numpy(np.stack([image for _, image, _ in buffer])).permute(0, 3, 1, 2)
        mean, std = zip(
            *(self.vae.encode(images[i : i + batch]) for i in range(0, len(images), batch)), strict=True
        )
        mean, std = torch.cat(mean).double(), torch.cat(std).double()
        array = torch.stack([mean, std], dim=1).to(torch.float16).numpy()
        name = f"shard-{self.shard:05d}"
        _atomic(self.work / f"{name}.npy", lambda f: np.save(f, array, allow_pickle=False))
        record = dict(
            file=f"{name}.npy",
            count=len(buffer),
            names=[n for n, _, _ in buffer],
            labels=[label for _, _, label in buffer],
            pixel_size=list(self.pixel_size),
            sum=mean.sum(dim=(0, 2, 3)).tolist(),  # moments of z = mean + std * eps, exactly
            sum_sq=(mean**2 + std**2).sum(dim=(0, 2, 3)).tolist(),
            per_channel=int(mean.shape[0] * mean.shape[2] * mean.shape[3]),
        )
        _atomic(
            self.work / f"{name}.json", lambda f: f.write(json.dumps(record).encode())
        )  # commits the shard
        buffer.clear()


def _commit(work: Path, dest: Path, shards: int, vae: Any, num_classes: int) -> dict[str, Any]:
    """Write dataset.json from the shards' records and rename DEST.partial to DEST; returns the meta."""
    records = [json.loads((work / f"shard-{i:05d}.json").read_text()) for i in range(shards)]
    meta = _finish_meta(records, vae, num_classes)
    _atomic(work / LABELS_FILE, lambda f: f.write(json.dumps(meta).encode()))
    (work / "settings.json").unlink()
    if dest.is_dir():
        dest.rmdir()  # checked empty above
    os.replace(work, dest)
    return meta


def _check_pixel_size(size: tuple[int, ...], factor: int) -> tuple[int, int]:
    if size[0] % factor or size[1] % factor:
        raise ValueError(f"images of {size[0]}x{size[1]}: the VAE needs sides that are multiples of {factor}")
    return int(size[0]), int(size[1])


def _finish_meta(records: list[dict], vae: Any, num_classes: int) -> dict[str, Any]:
    sizes = {tuple(r["pixel_size"]) for r in records}
    if len(sizes) > 1:
        raise ValueError(f"the shards hold images of sizes {sorted(sizes)}; pass --resolution HxW")
    n = sum(r["per_channel"] for r in records)
    mean = np.sum([r["sum"] for r in records], axis=0) / n
    var = np.sum([r["sum_sq"] for r in records], axis=0) / n - mean**2
    H, W = records[0]["pixel_size"]
    return dict(
        format=FORMAT,
        version=1,
        vae=vae.source,
        scaling_factor=vae.scaling_factor,
        dtype="float16",
        pixel_size=[H, W],
        latent_size=[H // vae.factor, W // vae.factor],
        latent_channels=vae.latent_channels,
        channel_mean=mean.tolist(),
        channel_std=np.sqrt(np.maximum(var, 0)).tolist(),
        num_images=sum(r["count"] for r in records),
        num_classes=num_classes,
        labels=[label for r in records for label in r["labels"]] if num_classes else None,
        shards=[[r["file"], r["count"]] for r in records],
    )


def write_preview(dataset: LatentDataset, vae: Any, path: Path, num: int) -> None:
    """The posterior means of the first `num` images decoded back, in a row."""
    from patchdiff.generation import image_grid, to_pil, to_uint8

    means = torch.stack([dataset[i][0][0] for i in range(min(num, len(dataset)))]).float()
    images = to_uint8(vae.decode(means)).cpu()
    atomic_write(path, lambda tmp: to_pil(image_grid(images, ncol=len(images))).save(tmp, format="PNG"))
