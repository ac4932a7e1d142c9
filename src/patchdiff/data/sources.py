"""Image sources for the dataset tool: image folders, zips, MNIST-style IDX files, the CIFAR-10 tarball.

A source yields (name, image, label): `name` says where the image came from (for messages), `image`
is np.uint8 HxW (grayscale) or HxWx3 (colour), `label` an int in 0..K-1 or None when unlabeled.
The low-level readers here (listing, decoding, dataset.json) are shared with ImageDataset.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LABELS_FILE = "dataset.json"

Item = tuple[str, np.ndarray, int | None]
OnBad = Callable[[str, ValueError], None]  # told about an unreadable image instead of raising

# Modes that decode to one channel; everything else becomes RGB (alpha is dropped, palettes expanded).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# 16-bit grayscale (PNG opens as I;16, some decoders give I): PIL's convert("L") clips them at 255, so
# they are scaled to 8 bits instead (65535 -> 255).
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Class labels beyond this are a typo or a corrupt file, not a data set (ImageNet-21k has ~21k classes).
MAX_CLASSES = 100_000


# --------------------------------------------------------------------------- shared low-level readers


def is_image_name(name: str) -> bool:
    """An image by extension, not hidden and not macOS zip debris (`__MACOSX/`, `._x.png`)."""
    parts = name.split("/")
    if any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return False
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder_images(root: Path) -> list[str]:
    """Image files under `root` (recursive) as sorted '/'-separated paths relative to `root`."""
    names = []
    for folder, _, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        names.extend(prefix + f for f in files if is_image_name(prefix + f))
    return sorted(names)


def list_zip_images(archive: zipfile.ZipFile) -> list[str]:
    return sorted(n for n in archive.namelist() if not n.endswith("/") and is_image_name(n))


def channels_of_mode(mode: str) -> int:
    return 1 if mode in _GRAY_MODES else 3


def to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> np.uint8 HxW (grayscale modes) or HxWx3 (all others; RGBA loses its alpha)."""
    if image.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8)
    image = image.convert("L" if channels_of_mode(image.mode) == 1 else "RGB")
    return np.asarray(image, dtype=np.uint8).copy()


# A damaged zip member: a bad CRC (BadZipFile), a broken deflate stream (zlib.error), a cut-off file.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


def read_member(archive: zipfile.ZipFile, name: str, where: str) -> bytes:
    """One member's bytes; a damaged member is a ValueError naming it (like an undecodable image)."""
    try:
        return archive.read(name)
    except _ZIP_ERRORS as error:
        raise ValueError(f"{where}:{name}: damaged zip member ({error}); rebuild the zip") from error


def _reason(error: BaseException) -> str:
    """PIL's message without the in-memory buffer's repr ('<_io.BytesIO object at 0x...>'), which names
    nothing the user can find."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes; anything PIL cannot read fully is a ValueError naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_array(image)
    except _DECODE_ERRORS as error:
        raise ValueError(
            f"{name}: not a readable image ({_reason(error)}); remove or replace the file"
        ) from error


def probe_image(data: bytes, name: str) -> tuple[int, int, int]:
    """(H, W, C) from the image header alone, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width, channels_of_mode(image.mode)
    except _DECODE_ERRORS as error:
        raise ValueError(
            f"{name}: not a readable image ({_reason(error)}); remove or replace the file"
        ) from error


def parse_labels_json(text: bytes | str, where: str) -> tuple[dict[str, int] | None, int]:
    """EDM-style `{"labels": [["rel/path.png", 3], ...] | null}` -> ({path: label} or None, num_classes).

    An optional "num_classes" entry (written by the dataset tool) keeps the class count right when
    --max-images left the highest classes out.
    """
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected an object with a 'labels' list")
    pairs = meta.get("labels")
    if pairs is None:
        return None, 0
    if not isinstance(pairs, list):
        raise ValueError(f"{where}: 'labels' must be a list of [path, label] pairs or null")
    labels: dict[str, int] = {}
    for pair in pairs:
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        ok = ok and isinstance(pair[1], int) and not isinstance(pair[1], bool) and 0 <= pair[1] < MAX_CLASSES
        if not ok:
            raise ValueError(
                f"{where}: bad labels entry {str(pair)[:80]}; expected [relative/path.png, int label "
                f"in 0..{MAX_CLASSES - 1}]"
            )
        name = pair[0].replace("\\", "/")
        if name in labels:
            raise ValueError(f"{where}: {name} is labelled twice; keep one entry per image")
        labels[name] = pair[1]
    num_classes = max(labels.values(), default=-1) + 1
    declared = meta.get("num_classes", 0)
    bad = not isinstance(declared, int) or isinstance(declared, bool) or not 0 <= declared <= MAX_CLASSES
    if bad:
        raise ValueError(f"{where}: 'num_classes' must be an int in 0..{MAX_CLASSES}, got {declared!r}")
    return labels, max(num_classes, declared)


def lookup_labels(names: list[str], labels: dict[str, int], where: str) -> list[int]:
    """The label of every image in `names` (all images of the set); a label for a file that is not an
    image of the set is an error too, since it would still count as a class."""
    missing = [n for n in names if n not in labels]
    if missing:
        raise ValueError(
            f"{where}: no label for {len(missing)} image(s), e.g. {missing[0]}; add them or drop the file"
        )
    present = set(names)
    extra = [n for n in labels if n not in present]
    if extra:
        raise ValueError(
            f"{where}: {len(extra)} label(s) for files that are not images of the set, e.g. {extra[0]}; "
            "remove those entries"
        )
    return [labels[n] for n in names]


# --------------------------------------------------------------------------- the Source


@dataclass(frozen=True)
class Source:
    """A finite, ordered collection of images; iterate with `items()`."""

    path: str
    count: int  # number of entries (some may turn out unreadable)
    num_classes: int  # 0 = unlabeled
    _items: Callable[[OnBad | None], Iterator[Item]]

    def __len__(self) -> int:
        return self.count

    def items(self, on_bad: OnBad | None = None) -> Iterator[Item]:
        """Yield (name, image, label); an unreadable image raises ValueError, or is reported to `on_bad`
        and skipped."""
        return self._items(on_bad)

    def __iter__(self) -> Iterator[Item]:
        return self.items()


def open_source(
    path: str | os.PathLike,
    class_folders: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """Pick the reader by what `path` is: a Hugging Face data set (data/hf.py: hf:NAME, parquet, a
    save_to_disk folder), IDX file (or folder holding one), CIFAR-10 tarball, zip, folder."""
    from patchdiff.data.hf import hf_source, is_hf_source

    if is_hf_source(path):
        if class_folders:
            raise ValueError(f"--class-folders does not apply to --source {path}; use --label-column")
        return hf_source(path, image_column, label_column)
    if image_column or label_column:
        flag = "--image-column" if image_column else "--label-column"
        raise ValueError(
            f"{flag} applies to Hugging Face data sets (hf:NAME, parquet, save_to_disk folders), "
            f"not to --source {path}"
        )
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--source {path} does not exist")
    if p.is_dir():
        if _find_idx_images(p) is not None:
            return idx_source(p)
        return folder_source(p, class_folders)
    if _IDX_IMAGES.search(p.name):
        return idx_source(p)
    if zipfile.is_zipfile(p):
        return zip_source(p, class_folders)
    if _is_tarfile(p):
        return cifar10_source(p)
    if _looks_like_archive(p):
        raise ValueError(
            f"--source {path}: damaged archive (named or marked as a .zip/.tar archive, but it cannot be "
            "read as one); download or copy it again"
        )
    raise ValueError(
        f"--source {path}: unknown kind of source; expected an image folder, a .zip of images, "
        "an MNIST-style *-images-idx3-ubyte[.gz] file, or cifar-10-python.tar.gz"
    )


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
ARCHIVE_MAGIC = (b"PK", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # zip, gzip, bzip2, xz


def _is_tarfile(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, ValueError):  # a damaged compressed stream raises instead of saying no
        return False


def _looks_like_archive(path: Path) -> bool:
    """Named or starting like an archive: a file that fails to open as one is then a damaged archive."""
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        return f.read(6).startswith(ARCHIVE_MAGIC)


def _decode_or_report(data: bytes, name: str, on_bad: OnBad | None) -> np.ndarray | None:
    try:
        return decode_image(data, name)
    except ValueError as error:
        if on_bad is None:
            raise
        on_bad(name, error)
        return None


def _class_labels(names: list[str], where: str) -> tuple[list[int], int]:
    """First-level sub-folder name -> class index, classes sorted by name."""
    loose = [n for n in names if "/" not in n]
    if loose:
        raise ValueError(
            f"{where}/{loose[0]}: with --class-folders every image must sit in a class sub-folder "
            f"({len(loose)} image(s) at the top level); move them or drop --class-folders"
        )
    classes = sorted({n.split("/", 1)[0] for n in names})
    index = {c: i for i, c in enumerate(classes)}
    return [index[n.split("/", 1)[0]] for n in names], len(classes)


def _labels_for(
    names: list[str], class_folders: bool, json_text: bytes | None, where: str
) -> tuple[list[int] | None, int]:
    if class_folders:
        return _class_labels(names, where)
    if json_text is None:
        return None, 0
    json_where = f"{where}/{LABELS_FILE}"
    labels, num_classes = parse_labels_json(json_text, json_where)
    if labels is None:
        return None, 0
    return lookup_labels(names, labels, json_where), num_classes


def folder_source(root: Path, class_folders: bool = False) -> Source:
    names = list_folder_images(root)
    json_path = root / LABELS_FILE
    json_text = json_path.read_bytes() if json_path.is_file() else None
    labels, num_classes = _labels_for(names, class_folders, json_text, str(root))

    def items(on_bad: OnBad | None) -> Iterator[Item]:
        for i, name in enumerate(names):
            image = _decode_or_report((root / name).read_bytes(), f"{root}/{name}", on_bad)
            if image is not None:
                yield f"{root}/{name}", image, None if labels is None else labels[i]

    return Source(str(root), len(names), num_classes, items)


def zip_source(path: Path, class_folders: bool = False) -> Source:
    with zipfile.ZipFile(path) as archive:
        names = list_zip_images(archive)
        json_text = (
            read_member(archive, LABELS_FILE, str(path)) if LABELS_FILE in archive.namelist() else None
        )
    labels, num_classes = _labels_for(names, class_folders, json_text, str(path))

    def items(on_bad: OnBad | None) -> Iterator[Item]:
        with zipfile.ZipFile(path) as archive:
            for i, name in enumerate(names):
                try:
                    data = read_member(archive, name, str(path))
                except ValueError as error:
                    if on_bad is None:
                        raise
                    on_bad(f"{path}:{name}", error)
                    continue
                image = _decode_or_report(data, f"{path}:{name}", on_bad)
                if image is not None:
                    yield f"{path}:{name}", image, None if labels is None else labels[i]

    return Source(str(path), len(names), num_classes, items)


# --------------------------------------------------------------------------- MNIST-style IDX files

_IDX_IMAGES = re.compile(r"images([-.])idx3([-.])ubyte(\.gz)?$")
_IDX_MAGIC_UBYTE = 0x08  # third magic byte: element type unsigned byte; fourth: number of dimensions


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (gz or plain): magic 00 00 08 <ndim>, <ndim> big-endian uint32 sizes, the data."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read IDX file ({error})") from error
    header = 4 + 4 * ndim
    magic = (_IDX_MAGIC_UBYTE << 8) | ndim  # 0x00000803 for images, 0x00000801 for labels
    if len(data) >= 4 and int.from_bytes(data[:4], "big") == magic and len(data) < header:
        raise ValueError(f"{path}: IDX file cut short ({len(data)} bytes, the header alone is {header})")
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else "nothing"
        raise ValueError(
            f"{path}: not a {ndim}-D unsigned-byte IDX file (magic {magic:08x} expected, found {found})"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says {dims} ({expected} bytes) but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_images(folder: Path) -> Path | None:
    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_labels_beside(images: Path) -> Path | None:
    """`train-images-idx3-ubyte.gz` -> `train-labels-idx1-ubyte.gz` (or without .gz), if present."""
    stem = _IDX_IMAGES.sub(lambda m: f"labels{m[1]}idx1{m[2]}ubyte", images.name)
    for name in (stem, stem + ".gz"):
        if (images.parent / name).is_file():
            return images.parent / name
    return None


def idx_source(path: Path) -> Source:
    """An MNIST-format images file (or a folder holding train-images-idx3-ubyte[.gz]) and its labels."""
    images_path = _find_idx_images(path) if path.is_dir() else path
    if images_path is None:
        raise ValueError(
            f"{path}: no train-images-idx3-ubyte[.gz] in this folder; point --source at the images file"
        )
    images = read_idx(images_path, ndim=3)
    labels_path = _idx_labels_beside(images_path)
    labels = None if labels_path is None else read_idx(labels_path, ndim=1)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    num_classes = 0 if labels is None or len(labels) == 0 else int(labels.max()) + 1

    def items(on_bad: OnBad | None) -> Iterator[Item]:
        for i in range(len(images)):
            yield f"{images_path}[{i}]", images[i].copy(), None if labels is None else int(labels[i])

    return Source(str(images_path), len(images), num_classes, items)


# --------------------------------------------------------------------------- CIFAR-10 python tarball


CIFAR10_CLASSES = 10


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    reconstruct, frombuffer = multiarray._reconstruct, numeric._frombuffer
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):  # pickles name whichever module wrote them
        allowed[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles, and a pickle can call any importable function. This unpickler
    resolves only the few numpy names needed to rebuild a plain ndarray; dicts, lists, bytes, str and
    ints need no lookup at all, so nothing else can be reached and no code can run."""

    _allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed"
            ) from None


def _load_cifar_batch(data: bytes, where: str) -> tuple[np.ndarray, list[int]]:
    try:
        # encoding="bytes": the batches were written by Python 2, whose str keys arrive as bytes.
        batch = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{where}: not a CIFAR-10 batch ({error})") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: not a CIFAR-10 batch (expected a dict)")
    pixels = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != 3072
    ):
        raise ValueError(f"{where}: 'data' must be a uint8 array [N, 3072]")
    if (
        not isinstance(labels, list)
        or len(labels) != len(pixels)
        or not all(isinstance(y, int) and 0 <= y < CIFAR10_CLASSES for y in labels)
    ):
        raise ValueError(
            f"{where}: 'labels' must be a list of {len(pixels)} ints in 0..{CIFAR10_CLASSES - 1}"
        )
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows are RRR..GGG..BBB.., 32x32


def cifar10_source(path: Path) -> Source:
    """The training set (data_batch_1..5) of the CIFAR-10 python tarball, read without extracting."""
    batch_name = re.compile(r"(^|/)data_batch_(\d+)$")
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and batch_name.search(m.name)]
            members.sort(key=lambda m: int(batch_name.search(m.name)[2]))  # type: ignore[index]
            batches = []
            for m in members:
                f = tar.extractfile(m)
                assert f is not None
                batches.append((m.name, *_load_cifar_batch(f.read(), f"{path}:{m.name}")))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read the tarball ({error})") from error
    if not batches:
        raise ValueError(
            f"{path}: no data_batch_N members; expected the CIFAR-10 python tarball (cifar-10-python.tar.gz)"
        )

    def items(on_bad: OnBad | None) -> Iterator[Item]:
        for member, pixels, labels in batches:
            for i in range(len(pixels)):
                yield f"{path}:{member}[{i}]", np.ascontiguousarray(pixels[i]), labels[i]

    count = sum(len(labels) for _, _, labels in batches)
    return Source(str(path), count, CIFAR10_CLASSES, items)
