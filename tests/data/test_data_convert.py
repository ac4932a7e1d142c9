import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tests.data.images import rand_image, write_png

from patchdiff.data import convert as convert_module
from patchdiff.data.convert import (
    center_crop,
    convert_dataset,
    fit_image,
    fit_width,
    pad_to_aspect,
    parse_resolution,
)
from patchdiff.data.dataset import ImageDataset


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- resolution and transforms


def test_parse_resolution():
    assert parse_resolution("64") == (64, 64)
    assert parse_resolution("32x48") == (32, 48)
    for bad in ("", "64x", "x", "0", "ax4", "1x2x3"):
        with pytest.raises(ValueError, match="--resolution"):
            parse_resolution(bad)


def test_geometry_helpers():
    image = np.arange(4 * 8, dtype=np.uint8).reshape(4, 8)  # wide, 4x8
    np.testing.assert_array_equal(center_crop(image, 1.0), image[:, 2:6])
    padded = pad_to_aspect(image, 1.0)  # 8x8 with two black rows above and below
    assert padded.shape == (8, 8) and not padded[:2].any() and not padded[6:].any()
    np.testing.assert_array_equal(padded[2:6], image)
    assert fit_width(image, 1.0).shape == (8, 8)  # wider than 1:1: full width kept, bars added
    tall = np.arange(8 * 4, dtype=np.uint8).reshape(8, 4)
    np.testing.assert_array_equal(fit_width(tall, 1.0), tall[2:6])  # taller: rows cropped, width kept


@pytest.mark.parametrize("transform", ["center-crop", "center-crop-wide", "pad"])
@pytest.mark.parametrize("size", [(12, 20), (20, 12), (9, 9)])
def test_transforms_give_the_requested_size(transform, size):
    for shape in ((30, 17, 3), (17, 30), (16, 16, 3)):
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        out = fit_image(image, size, transform, "x.png")
        assert out.shape == size + shape[2:] and out.dtype == np.uint8


def test_plain_resize_needs_same_aspect():
    assert fit_image(rand_image(0, 16, 16), (8, 8), None, "a.png").shape == (8, 8, 3)
    assert fit_image(rand_image(0, 6, 5), None, None, "a.png").shape == (6, 5, 3)
    with pytest.raises(ValueError, match=r"odd\.png is 16x12.*--transform"):
        fit_image(rand_image(0, 16, 12), (8, 8), None, "odd.png")


# --------------------------------------------------------------------------- conversions


def test_folder_to_zip_round_trip_with_class_folders(tmp_path):
    arrays = {"cat/a.png": rand_image(0), "cat/b.png": rand_image(1), "dog/c.png": rand_image(2)}
    for name, array in arrays.items():
        write_png(tmp_path / "src" / name, array)
    summary = convert_dataset(
        tmp_path / "src", tmp_path / "out" / "d.zip", class_folders=True, progress=False
    )
    assert (summary.count, summary.skipped, summary.resolution) == (3, 0, (6, 5))
    assert (summary.channels, summary.num_classes) == (3, 2)
    assert "wrote 3 images (6x5, 3 channel(s), 2 classes)" in summary.line()
    with zipfile.ZipFile(tmp_path / "out" / "d.zip") as archive:
        names = sorted(archive.namelist())
    assert names == [f"00000/img0000000{i}.png" for i in range(3)] + ["dataset.json"]
    ds = ImageDataset(tmp_path / "out" / "d.zip")
    assert ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    for i, array in enumerate(arrays.values()):
        np.testing.assert_array_equal(ds[i][0].numpy(), array.transpose(2, 0, 1))
    assert leftovers(tmp_path / "out") == []


def test_resize_to_folder_and_max_images(tmp_path):
    for i in range(4):
        write_png(tmp_path / "src" / f"{i}.png", rand_image(i, 20, 30))
    summary = convert_dataset(
        tmp_path / "src",
        tmp_path / "out",
        resolution=(8, 8),
        transform="center-crop",
        max_images=3,
        progress=False,
    )
    assert summary.count == 3 and summary.num_classes == 0
    assert not (tmp_path / "out" / "dataset.json").exists()
    ds = ImageDataset(tmp_path / "out")
    assert len(ds) == 3 and ds.resolution == (8, 8) and not ds.has_labels


def test_idx_source_to_dataset(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 7, 7), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2], dtype=np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        data = bytes([0, 0, 8, array.ndim]) + dims + array.tobytes()
        (tmp_path / f"train-{kind}-ubyte.gz").write_bytes(gzip.compress(data))
    summary = convert_dataset(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "m.zip", progress=False)
    assert summary.channels == 1 and summary.num_classes == 3
    ds = ImageDataset(tmp_path / "m.zip")
    assert ds.num_channels == 1 and ds.labels.tolist() == [2, 0, 1, 2]
    np.testing.assert_array_equal(np.stack([ds[i][0][0].numpy() for i in range(4)]), images)


def test_cifar_source_to_dataset(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    payload = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": [7, 3, 7]})
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    summary = convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "c.zip", progress=False)
    assert summary.num_classes == 10 and summary.resolution == (32, 32)
    ds = ImageDataset(tmp_path / "c.zip")
    assert ds.num_classes == 10 and ds.labels.tolist() == [7, 3, 7]
    np.testing.assert_array_equal(ds[1][0].numpy(), data[1].reshape(3, 32, 32))


def test_bad_image_stops_and_leaves_no_dest(tmp_path):
    write_png(tmp_path / "src" / "a.png", rand_image(0))
    (tmp_path / "src" / "b.png").write_bytes(b"\x89PNG not really")
    write_png(tmp_path / "src" / "c.png", rand_image(2))
    for dest in (tmp_path / "d.zip", tmp_path / "d"):
        with pytest.raises(ValueError, match=r"b\.png: not a readable image"):
            convert_dataset(tmp_path / "src", dest, progress=False)
        assert not dest.exists() and leftovers(tmp_path) == []
    summary = convert_dataset(tmp_path / "src", tmp_path / "d.zip", skip_bad=True, progress=False)
    assert (
        summary.count == 2
        and summary.skipped == 1
        and summary.skipped_names == (str(tmp_path / "src/b.png"),)
    )
    assert "skipped 1 unreadable" in summary.line() and "b.png" in summary.line()


@pytest.mark.parametrize("dest_name", ["d.zip", "d"])
def test_interrupted_conversion_leaves_no_dest(tmp_path, monkeypatch, dest_name):
    for i in range(4):
        write_png(tmp_path / "src" / f"{i}.png", rand_image(i))
    calls = []
    real_encode = convert_module.encode_png

    def encode_then_interrupt(image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(image)

    monkeypatch.setattr(convert_module, "encode_png", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(tmp_path / "src", tmp_path / dest_name, progress=False)
    assert not (tmp_path / dest_name).exists() and leftovers(tmp_path) == []


def test_refuses_non_empty_dest_but_fills_empty_folder(tmp_path):
    write_png(tmp_path / "src" / "a.png", rand_image(0))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--dest .*full is a folder that is not empty"):
        convert_dataset(tmp_path / "src", tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "old.zip").write_bytes(b"data")
    with pytest.raises(ValueError, match="already exists"):
        convert_dataset(tmp_path / "src", tmp_path / "old.zip", progress=False)
    (tmp_path / "empty").mkdir()
    assert convert_dataset(tmp_path / "src", tmp_path / "empty", progress=False).count == 1
    assert (tmp_path / "empty" / "00000" / "img00000000.png").is_file()


def test_mixed_sizes_and_channels(tmp_path):
    write_png(tmp_path / "src" / "a.png", rand_image(0))
    write_png(tmp_path / "src" / "b.png", rand_image(1, h=7))
    with pytest.raises(ValueError, match=r"b\.png is 7x5 but .*a\.png is 6x5.*--resolution"):
        convert_dataset(tmp_path / "src", tmp_path / "d.zip", progress=False)
    assert not (tmp_path / "d.zip").exists()

    write_png(tmp_path / "mix" / "a.png", rand_image(0))
    write_png(tmp_path / "mix" / "b.png", rand_image(1, c=1))
    summary = convert_dataset(tmp_path / "mix", tmp_path / "rgb.zip", progress=False)
    assert summary.channels == 3  # a grayscale image joins an RGB data set as R = G = B
    gray = ImageDataset(tmp_path / "rgb.zip")[1][0]
    np.testing.assert_array_equal(gray.numpy(), np.stack([rand_image(1, c=1)] * 3))

    write_png(tmp_path / "mix2" / "a.png", rand_image(0, c=1))
    write_png(tmp_path / "mix2" / "b.png", rand_image(1))
    with pytest.raises(ValueError, match=r"b\.png is a colour image.*--channels"):
        convert_dataset(tmp_path / "mix2", tmp_path / "x.zip", progress=False)
    assert convert_dataset(tmp_path / "mix2", tmp_path / "g.zip", channels=1, progress=False).channels == 1
    assert ImageDataset(tmp_path / "g.zip").num_channels == 1


def test_bad_arguments(tmp_path):
    write_png(tmp_path / "src" / "a.png", rand_image(0))
    with pytest.raises(ValueError, match="--transform pad needs --resolution"):
        convert_dataset(tmp_path / "src", tmp_path / "d.zip", transform="pad", progress=False)
    with pytest.raises(ValueError, match="--max-images"):
        convert_dataset(tmp_path / "src", tmp_path / "d.zip", max_images=0, progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        convert_dataset(tmp_path / "missing", tmp_path / "d.zip", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        convert_dataset(tmp_path / "empty", tmp_path / "d.zip", progress=False)
    assert leftovers(tmp_path) == [] and not (tmp_path / "d.zip").exists()
