import argparse
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from patchdiff.cli import dataset as dataset_cli


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dataset_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["dataset", *argv])


def test_cli_converts_and_prints_one_line(tmp_path, capsys):
    for cls in ("a", "b"):
        for i in range(2):
            (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 20, 3), 40 * i, dtype=np.uint8)).save(
                tmp_path / "src" / cls / f"{i}.png"
            )
    dest = tmp_path / "out.zip"
    flags = ["--resolution", "8", "--transform", "pad", "--class-folders", "--max-images", "3"]
    args = parse(["--source", str(tmp_path / "src"), "--dest", str(dest), *flags, "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"wrote 3 images (8x8, 3 channel(s), 2 classes) to {dest}"]
    with zipfile.ZipFile(dest) as archive:
        meta = json.loads(archive.read("dataset.json"))
        image = np.asarray(Image.open(archive.open("00000/img00000002.png")))
    assert meta["labels"] == [
        ["00000/img00000000.png", 0],
        ["00000/img00000001.png", 0],
        ["00000/img00000002.png", 1],
    ]
    assert image.shape == (8, 8, 3) and not image[:2].any()  # padded: black bars top and bottom


def test_cli_errors_are_raised_for_main_to_print(tmp_path):
    args = parse(["--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "d.zip"), "--no-progress"])
    with pytest.raises(FileNotFoundError, match="missing"):
        args.func(args)
    args = parse(["--source", str(tmp_path), "--dest", str(tmp_path / "d.zip"), "--resolution", "8y8"])
    with pytest.raises(ValueError, match="--resolution"):
        args.func(args)
    with pytest.raises(SystemExit):
        parse(["--source", "x", "--dest", "y", "--transform", "stretch"])
