"""Hugging Face `datasets` as a source for the dataset tool (needs `pip install "patchdiff[hf]"`).

Three forms of --source:
  - a folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: its "train" split, or
    its only split),
  - parquet file(s): `data.parquet`, or a glob such as `shards/*.parquet`,
  - `hf:NAME[:SPLIT]`: a data set of the hub (split "train" by default), through the usual cache.

The image column is --image-column, else the first column of the `Image` feature type, else one named
image or img. The label column is --label-column, else one named label, labels or class, if present;
a ClassLabel column gives its class indices (and its class count), an integer column its values, and a
string column the index of each name among the sorted names.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from patchdiff.data.sources import MAX_CLASSES, Item, OnBad, Source, decode_image, to_array

INSTALL = 'pip install "patchdiff[hf]"'
HUB_PREFIX = "hf:"
IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels", "class")


def is_hf_source(path: str | os.PathLike) -> bool:
    """hf:NAME, parquet file(s), or a folder that `save_to_disk` wrote."""
    text = str(path)
    if text.startswith(HUB_PREFIX) or text.lower().endswith(".parquet"):
        return True
    p = Path(text)
    return p.is_dir() and any((p / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"a Hugging Face datasets source needs the datasets package: {INSTALL}") from None
    return datasets


def _one_split(data: Any, where: str) -> Any:
    """A DatasetDict's "train" split or its only split; a Dataset as it is."""
    if not hasattr(data, "keys"):
        return data
    splits = list(data.keys())
    if "train" in splits:
        return data["train"]
    if len(splits) == 1:
        return data[splits[0]]
    raise ValueError(
        f"--source {where} holds the splits {', '.join(splits)} and none is 'train'; save the split you "
        "want on its own (dataset_dict[split].save_to_disk)"
    )


def load_hf(source: str) -> Any:
    """The `datasets.Dataset` behind a --source of one of the three forms."""
    datasets = _import_datasets()
    if source.startswith(HUB_PREFIX):
        name, _, split = source[len(HUB_PREFIX) :].partition(":")
        if not name:
            raise ValueError(f"--source {source}: expected hf:NAME or hf:NAME:SPLIT, e.g. hf:cifar10:train")
        try:
            return datasets.load_dataset(name, split=split or "train")
        except Exception as error:  # offline, unknown name, no such split: many exception types
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"--source {source}: cannot load {name!r} (split {split or 'train'}) from the hub or the "
                f"cache ({reason}); check the name and split, or, offline, download it once and point "
                "HF_HOME at that cache with HF_DATASETS_OFFLINE=1"
            ) from None
    if source.lower().endswith(".parquet"):
        files = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
        if not files or not all(Path(f).is_file() for f in files):
            raise FileNotFoundError(f"--source {source}: no such parquet file")
        return datasets.Dataset.from_parquet(files if len(files) > 1 else files[0])
    return _one_split(datasets.load_from_disk(source), source)


def _image_column(features: dict, image_column: str | None, where: str) -> str:
    from datasets import Image

    if image_column is not None:
        if image_column not in features:
            raise ValueError(
                f"--image-column {image_column}: {where} has no such column (columns: {', '.join(features)})"
            )
        return image_column
    for name, feature in features.items():
        if isinstance(feature, Image):
            return name
    for name in IMAGE_NAMES:
        if name in features:
            return name
    raise ValueError(
        f"--source {where}: no image column found (columns: {', '.join(features)}); name it with --image-column"
    )


def _label_column(features: dict, label_column: str | None, where: str) -> str | None:
    if label_column is not None:
        if label_column not in features:
            raise ValueError(
                f"--label-column {label_column}: {where} has no such column (columns: {', '.join(features)})"
            )
        return label_column
    return next((name for name in LABEL_NAMES if name in features), None)


def _labels(data: Any, column: str, where: str) -> tuple[list[int], int]:
    """Class indices of every row and the class count, from a ClassLabel, integer or string column."""
    from datasets import ClassLabel

    feature = data.features[column]
    values = data[column]
    if isinstance(feature, ClassLabel):
        return [int(v) for v in values], feature.num_classes
    if values and all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return [index[v] for v in values], len(names)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_CLASSES for v in values)
    if not ok:
        raise ValueError(
            f"--label-column {column}: {where} holds values that are not class names or ints in "
            f"0..{MAX_CLASSES - 1}; pick another column"
        )
    return [int(v) for v in values], max(values, default=-1) + 1


def _decode(value: Any, name: str) -> Any:
    """One cell of the image column (undecoded: {"bytes", "path"}, or raw bytes, or a PIL image)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"], name)
        if value.get("path") and Path(value["path"]).is_file():
            return decode_image(Path(value["path"]).read_bytes(), name)
        raise ValueError(f"{name}: no image bytes or readable path; remove the row")
    if isinstance(value, bytes):
        return decode_image(value, name)
    if hasattr(value, "mode"):  # a PIL image
        return to_array(value)
    raise ValueError(f"{name}: the image column holds {type(value).__name__}, not images; set --image-column")


def hf_source(
    source: str | os.PathLike, image_column: str | None = None, label_column: str | None = None
) -> Source:
    """A `Source` over a Hugging Face data set; images are decoded as they are read."""
    Image = _import_datasets().Image
    where = str(source)
    data = load_hf(where)
    image_col = _image_column(data.features, image_column, where)
    label_col = _label_column(data.features, label_column, where)
    labels, num_classes = _labels(data, label_col, where) if label_col else (None, 0)
    if isinstance(data.features[image_col], Image):  # decoded here, so a bad image is reported, not raised
        data = data.cast_column(image_col, Image(decode=False))
    column = data.select_columns([image_col])

    def items(on_bad: OnBad | None) -> Iterator[Item]:
        for i, row in enumerate(column):
            name = f"{where}[{i}]"
            try:
                image = _decode(row[image_col], name)
            except ValueError as error:
                if on_bad is None:
                    raise
                on_bad(name, error)
                continue
            yield name, image, None if labels is None else labels[i]

    return Source(where, len(data), num_classes, items)
