import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from patchdiff.cli import main
from patchdiff.data import ImageDataset, open_source


def tiny_images(n=5, size=(12, 20)):
    """n RGB images of HxW `size`, image i filled with the value 40 * i (so the order is visible)."""
    return [Image.fromarray(np.full((*size, 3), 40 * i, dtype=np.uint8)) for i in range(n)]


def tiny_dataset(label_feature="classlabel"):
    names = ["cat", "dog", "cat", "owl", "dog"]
    if label_feature == "classlabel":
        features = datasets.Features(
            {"picture": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "owl"])}
        )
        labels = [["cat", "dog", "owl"].index(n) for n in names]
    else:  # names as plain strings
        features = datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")})
        labels = names
    column = "label" if label_feature == "classlabel" else "kind"
    return datasets.Dataset.from_dict({"picture": tiny_images(), column: labels}, features=features)


def read_back(dest):
    data = ImageDataset(str(dest))
    pixels = [int(data[i][0][0, 0, 0]) for i in range(len(data))]
    return data, pixels


def test_save_to_disk_folder_detects_image_and_classlabel_columns(tmp_path, capsys):
    tiny_dataset().save_to_disk(str(tmp_path / "saved"))
    dest = tmp_path / "out.zip"
    assert main(["dataset", "--source", str(tmp_path / "saved"), "--dest", str(dest), "--no-progress"]) == 0
    assert "wrote 5 images (12x20, 3 channel(s), 3 classes)" in capsys.readouterr().out
    data, pixels = read_back(dest)
    assert data.resolution == (12, 20) and pixels == [0, 40, 80, 120, 160]
    assert data.labels.tolist() == [0, 1, 0, 2, 1]


def test_dataset_dict_folder_takes_the_train_split(tmp_path):
    dd = datasets.DatasetDict({"train": tiny_dataset(), "test": tiny_dataset().select([0])})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(open_source(tmp_path / "saved")) == 5


def test_parquet_with_string_labels_and_named_columns(tmp_path):
    data = tiny_dataset("names")
    data.select(range(3)).to_parquet(str(tmp_path / "a.parquet"))
    data.select(range(3, 5)).to_parquet(str(tmp_path / "b.parquet"))
    source = open_source(str(tmp_path / "*.parquet"), label_column="kind")
    items = list(source.items())
    assert len(source) == 5 and source.num_classes == 3  # cat, dog, owl: indices by sorted name
    assert [label for _, _, label in items] == [0, 1, 0, 2, 1]
    assert items[4][1].shape == (12, 20, 3) and items[4][1][0, 0, 0] == 160
    # Without --label-column, "kind" is not a label column: the set is unlabeled.
    assert open_source(str(tmp_path / "a.parquet")).num_classes == 0


def test_bad_columns_and_flags_give_one_line(tmp_path, capsys):
    tiny_dataset().to_parquet(str(tmp_path / "d.parquet"))
    dest = str(tmp_path / "out")
    src = ["dataset", "--source", str(tmp_path / "d.parquet"), "--dest", dest, "--no-progress"]
    assert main([*src, "--image-column", "photo"]) == 2
    assert "--image-column photo: " in capsys.readouterr().err
    assert main([*src, "--label-column", "picture"]) == 2
    assert "--label-column picture: " in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    tiny_images(1)[0].save(tmp_path / "folder" / "x.png")
    assert main(["dataset", "--source", str(tmp_path / "folder"), "--dest", dest, "--image-column", "x"]) == 2
    assert "--image-column applies to Hugging Face data sets" in capsys.readouterr().err
    assert not os.path.exists(dest)


def test_hub_source_offline_names_the_cache(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchdiff",
            "dataset",
            "--source",
            "hf:someone/tiny-set:train",
            "--dest",
            str(tmp_path / "out.zip"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf:someone/tiny-set:train" in lines[0]
    assert "HF_HOME" in lines[0] and "HF_DATASETS_OFFLINE" in lines[0]


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    tiny_dataset().to_parquet(str(tmp_path / "d.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r'pip install "patchdiff\[hf\]"'):
        open_source(str(tmp_path / "d.parquet"))
