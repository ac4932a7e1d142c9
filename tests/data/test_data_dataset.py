import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.data.images import png_bytes, rand_image

from patchdiff.data.dataset import ImageDataset


def make_folder(root: Path, arrays: dict[str, np.ndarray], labels: dict[str, int] | None = None) -> Path:
    for name, array in arrays.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes(array))
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": [[n, y] for n, y in labels.items()]}))
    return root


def make_zip(path: Path, arrays: dict[str, np.ndarray], labels: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            archive.writestr(name, png_bytes(array))
        if labels is not None:
            archive.writestr("dataset.json", json.dumps({"labels": [[n, y] for n, y in labels.items()]}))
    return path


def chw(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


ARRAYS = {f"{i // 4:05d}/img{i:08d}.png": rand_image(i) for i in range(10)}
LABELS = {name: i % 3 for i, name in enumerate(ARRAYS)}


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_round_trip_pixel_exact_with_labels(tmp_path, kind):
    path = (
        make_folder(tmp_path, ARRAYS, LABELS)
        if kind == "folder"
        else make_zip(tmp_path / "d.zip", ARRAYS, LABELS)
    )
    ds = ImageDataset(path)
    assert len(ds) == 10 and ds.resolution == (6, 5) and ds.num_channels == 3
    assert ds.has_labels and ds.num_classes == 3
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [i % 3 for i in range(10)]
    for i, array in enumerate(ARRAYS.values()):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 6, 5)
        np.testing.assert_array_equal(image.numpy(), chw(array))
        assert label == i % 3 and isinstance(label, int) and ds.label(i) == label
    with pytest.raises(IndexError):
        ds[10]


def test_unlabeled_grayscale_and_rgba(tmp_path):
    ds = ImageDataset(make_folder(tmp_path / "g", {"a.png": rand_image(0, c=1), "b.png": rand_image(1, c=1)}))
    assert ds.num_channels == 1 and not ds.has_labels and ds.num_classes == 0
    assert ds.labels.tolist() == [0, 0] and ds[1][1] == 0
    np.testing.assert_array_equal(ds[0][0].numpy(), chw(rand_image(0, c=1)))
    ds = ImageDataset(make_folder(tmp_path / "rgba", {"a.png": rand_image(2, c=4)}))
    assert ds.num_channels == 3
    np.testing.assert_array_equal(ds[0][0].numpy(), chw(rand_image(2, c=4)[:, :, :3]))


def test_labels_null_means_unlabeled(tmp_path):
    root = make_folder(tmp_path, {"a.png": rand_image(0)})
    (root / "dataset.json").write_text('{"labels": null}')
    ds = ImageDataset(root)
    assert not ds.has_labels and ds.num_classes == 0


def test_xflip_doubles_and_mirrors(tmp_path):
    ds = ImageDataset(make_zip(tmp_path / "d.zip", ARRAYS, LABELS), xflip=True)
    assert len(ds) == 20 and ds.labels.tolist() == [i % 3 for i in range(10)] * 2
    for i in (0, 7):
        plain, flipped = ds[i], ds[i + 10]
        np.testing.assert_array_equal(flipped[0].numpy(), plain[0].numpy()[:, :, ::-1])
        assert flipped[1] == plain[1]
    np.testing.assert_array_equal(ds[-1][0].numpy(), ds[19][0].numpy())


def test_cache_keeps_decoded_images(tmp_path):
    root = make_folder(tmp_path, {"a.png": rand_image(0), "b.png": rand_image(1)})
    ds = ImageDataset(root, cache=True, xflip=True)
    uncached = ImageDataset(root)
    ds[0][0][:] = 0  # returned tensors are copies: scribbling on one must not reach the cache
    (root / "a.png").unlink()
    np.testing.assert_array_equal(ds[0][0].numpy(), chw(rand_image(0)))
    np.testing.assert_array_equal(ds[2][0].numpy(), chw(rand_image(0))[:, :, ::-1])
    with pytest.raises(FileNotFoundError):
        uncached[0]


def test_max_images(tmp_path):
    ds = ImageDataset(make_folder(tmp_path, ARRAYS, LABELS), max_images=4)
    assert len(ds) == 4 and ds.num_classes == 3  # classes counted over the whole dataset.json


def test_mismatched_sizes_name_the_file(tmp_path):
    arrays = {"a.png": rand_image(0), "b.png": rand_image(1), "c.png": rand_image(2, h=7)}
    root = make_folder(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"c\.png is 7x5.*patchdiff dataset.*--resolution HxW"):
        ImageDataset(root)
    ds = ImageDataset(root, verify=False)  # the decoded image is checked too
    ds[1]
    with pytest.raises(ValueError, match=r"c\.png is 7x5"):
        ds[2]
    gray = make_folder(tmp_path / "mixed", {"a.png": rand_image(0), "b.png": rand_image(1, c=1)})
    with pytest.raises(ValueError, match=r"b\.png is 6x5 with 1 channel"):
        ImageDataset(gray)


def test_missing_empty_and_unlabeled_entries(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        ImageDataset(tmp_path / "empty")
    (tmp_path / "plain.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        ImageDataset(tmp_path / "plain.txt")
    root = make_folder(tmp_path / "partial", {"a.png": rand_image(0), "b.png": rand_image(1)}, {"a.png": 1})
    with pytest.raises(ValueError, match=r"no label for 1 image.*b\.png"):
        ImageDataset(root)


def test_jpeg_and_webp(tmp_path):
    array = np.full((8, 8, 3), 80, dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(array).save(tmp_path / "b.webp", lossless=True)
    ds = ImageDataset(tmp_path)
    assert len(ds) == 2 and ds.resolution == (8, 8)
    assert (ds[0][0].int() - 80).abs().max() <= 3
    np.testing.assert_array_equal(ds[1][0].numpy(), chw(array))


def test_zip_under_dataloader_workers(tmp_path):
    ds = ImageDataset(make_zip(tmp_path / "d.zip", ARRAYS, LABELS), xflip=True)
    ds[0]  # the parent has opened the zip: the workers must not use its handle
    pickle.loads(pickle.dumps(ds))  # spawn-style workers get a pickled copy
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    images, labels = zip(*loader, strict=True)
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (20, 3, 6, 5)
    expected = np.stack([chw(a) for a in ARRAYS.values()])
    np.testing.assert_array_equal(images[:10].numpy(), expected)
    np.testing.assert_array_equal(images[10:].numpy(), expected[:, :, :, ::-1])
    assert labels.tolist() == ds.labels.tolist()
