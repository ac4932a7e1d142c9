import gzip
import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.data.images import png_bytes, rand_image, write_png

from patchdiff.data.sources import open_source, read_idx, to_array


def collect(source, on_bad=None):
    return list(source.items(on_bad))


# --------------------------------------------------------------------------- folders and zips


def test_folder_is_recursive_sorted_and_pixel_exact(tmp_path):
    images = {"b.png": rand_image(0), "a/z.png": rand_image(1), "a/c.PNG": rand_image(2)}
    for name, array in images.items():
        write_png(tmp_path / name, array)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    source = open_source(tmp_path)
    assert len(source) == 3 and source.num_classes == 0
    items = collect(source)
    assert [n.split(str(tmp_path) + "/")[1] for n, _, _ in items] == ["a/c.PNG", "a/z.png", "b.png"]
    for name, array, label in items:
        assert label is None
        np.testing.assert_array_equal(array, images[name.split(str(tmp_path) + "/")[1]])


def test_modes_grayscale_stays_2d_rgba_loses_alpha(tmp_path):
    write_png(tmp_path / "g.png", rand_image(0, c=1))
    write_png(tmp_path / "rgba.png", rand_image(1, c=4))
    (_, gray, _), (_, rgb, _) = collect(open_source(tmp_path))
    assert gray.shape == (6, 5) and gray.dtype == np.uint8
    np.testing.assert_array_equal(rgb, rand_image(1, c=4)[:, :, :3])


def test_jpeg_and_webp_decode(tmp_path):
    array = np.full((8, 8, 3), 120, dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(array).save(tmp_path / "b.webp", lossless=True)
    (_, jpg, _), (_, webp, _) = collect(open_source(tmp_path))
    assert jpg.shape == webp.shape == (8, 8, 3)
    assert np.abs(jpg.astype(int) - 120).max() <= 3
    np.testing.assert_array_equal(webp, array)


def test_class_folders_become_sorted_labels(tmp_path):
    for cls, n in (("dog", 2), ("cat", 1), ("emu", 1)):
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", rand_image(i))
    source = open_source(tmp_path, class_folders=True)
    assert source.num_classes == 3
    assert [label for _, _, label in collect(source)] == [0, 1, 1, 2]  # cat, dog, dog, emu


def test_class_folders_reject_loose_images(tmp_path):
    write_png(tmp_path / "cls" / "a.png", rand_image(0))
    write_png(tmp_path / "loose.png", rand_image(1))
    with pytest.raises(ValueError, match=r"loose\.png.*class sub-folder"):
        open_source(tmp_path, class_folders=True)


def test_dataset_json_labels_and_missing_label(tmp_path):
    write_png(tmp_path / "x/a.png", rand_image(0))
    write_png(tmp_path / "b.png", rand_image(1))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["x/a.png", 4], ["b.png", 1]]}))
    source = open_source(tmp_path)
    assert source.num_classes == 5
    assert [label for _, _, label in collect(source)] == [1, 4]  # b.png sorts before x/a.png
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["b.png", 1]]}))
    with pytest.raises(ValueError, match=r"dataset\.json.*x/a\.png"):
        open_source(tmp_path)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([["b.png", 1], ["ghost.png", 7]], r"not images of the set, e\.g\. ghost\.png"),
        ([["b.png", 10**12]], r"bad labels entry.*0\.\.99999"),
        ([["b.png", -1]], "bad labels entry"),
        ([["b.png", 2.0]], "bad labels entry"),
        ([["b.png", True]], "bad labels entry"),
        ([["b.png", 1], ["b.png", 2]], "labelled twice"),
    ],
)
def test_dataset_json_refuses_stray_and_absurd_labels(tmp_path, entries, message):
    write_png(tmp_path / "b.png", rand_image(1))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": entries}))
    with pytest.raises(ValueError, match=rf"dataset\.json: .*{message}"):
        open_source(tmp_path)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(mode):
    wide = np.array([[0, 257, 30000, 65535]], dtype=np.uint16)
    image = Image.fromarray(wide) if mode == "I;16" else Image.fromarray(wide.astype(np.int32), mode="I")
    assert image.mode == mode
    assert to_array(image).tolist() == [[0, 1, 117, 255]]


def test_zip_source_with_labels_skips_macos_debris(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("k/2.png", png_bytes(rand_image(2)))
        archive.writestr("k/1.png", png_bytes(rand_image(1)))
        archive.writestr("__MACOSX/k/._1.png", b"resource fork")
        archive.writestr("dataset.json", json.dumps({"labels": [["k/1.png", 0], ["k/2.png", 1]]}))
    items = collect(open_source(path))
    assert [n for n, _, _ in items] == [f"{path}:k/1.png", f"{path}:k/2.png"]
    assert [label for _, _, label in items] == [0, 1]
    np.testing.assert_array_equal(items[1][1], rand_image(2))


def test_bad_image_is_named_or_reported(tmp_path):
    write_png(tmp_path / "a.png", rand_image(0))
    (tmp_path / "broken.png").write_bytes(png_bytes(rand_image(1))[:40])
    write_png(tmp_path / "c.png", rand_image(2))
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        collect(open_source(tmp_path))
    bad = []
    items = collect(open_source(tmp_path), on_bad=lambda name, error: bad.append(name))
    assert len(items) == 2 and bad == [str(tmp_path / "broken.png")]


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"x\.bin: unknown kind"):
        open_source(tmp_path / "x.bin")


def test_damaged_archives_are_named_damaged(tmp_path):
    import gzip
    import io
    import tarfile
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a.png", b"\x00" * 4000)
    (tmp_path / "cut.zip").write_bytes(buffer.getvalue()[:2000])  # the central directory is lost
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("data_batch_1")
        info.size = 4000
        t.addfile(info, io.BytesIO(b"\x00" * 4000))
    packed = gzip.compress(tar.getvalue())
    (tmp_path / "cut.tar.gz").write_bytes(packed[:40])
    (tmp_path / "noise.gz.bin").write_bytes(packed[:10] + b"\xff" * 200)  # a gzip header, then noise
    for name in ("cut.zip", "cut.tar.gz", "noise.gz.bin"):
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: damaged archive"):
            open_source(tmp_path / name)


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_and_labels(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 1], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write = (lambda p, b: p.write_bytes(gzip.compress(b))) if gz else (lambda p, b: p.write_bytes(b))
    write(tmp_path / f"train-images-idx3-ubyte{suffix}", idx_bytes(images))
    write(tmp_path / f"train-labels-idx1-ubyte{suffix}", idx_bytes(labels))
    for path in (tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path):  # the file, or its folder
        source = open_source(path)
        assert len(source) == 5 and source.num_classes == 10
        items = collect(source)
        np.testing.assert_array_equal(np.stack([a for _, a, _ in items]), images)
        assert [label for _, _, label in items] == labels.tolist()


def test_idx_without_labels_and_bad_headers(tmp_path):
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images))
    source = open_source(path)
    assert source.num_classes == 0 and [label for _, _, label in collect(source)] == [None, None]
    path.write_bytes(idx_bytes(images)[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(path, ndim=3)
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match="magic 00000803"):
        read_idx(path, ndim=3)


# --------------------------------------------------------------------------- CIFAR-10


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fake_cifar_tarball(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 3072), dtype=np.uint8) for n in (3, 2)]
    labels = [[1, 2, 3], [9, 0]]
    members = {
        f"cifar-10-batches-py/data_batch_{i + 1}": pickle.dumps({b"data": data, b"labels": y})
        for i, (data, y) in enumerate(zip(batches, labels, strict=True))
    }
    members["cifar-10-batches-py/test_batch"] = members["cifar-10-batches-py/data_batch_1"]
    write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    source = open_source(tmp_path / "cifar-10-python.tar.gz")
    assert len(source) == 5 and source.num_classes == 10
    items = collect(source)
    assert [label for _, _, label in items] == [1, 2, 3, 9, 0]
    first = items[0][1]
    assert first.shape == (32, 32, 3)
    np.testing.assert_array_equal(first[..., 0].ravel(), batches[0][0, :1024])  # red plane first
    np.testing.assert_array_equal(first[..., 2].ravel(), batches[0][0, 2048:])
    np.testing.assert_array_equal(items[4][1], batches[1][1].reshape(3, 32, 32).transpose(1, 2, 0))


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(str(target)), b"labels": []})
    write_tar(tmp_path / "c.tar.gz", {"cifar-10-batches-py/data_batch_1": payload})
    with pytest.raises(ValueError, match=r"refusing to load posix\.mkdir|refusing to load os\.mkdir"):
        open_source(tmp_path / "c.tar.gz")
    assert not target.exists()
