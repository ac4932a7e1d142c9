"""The whole pipeline through the `patchdiff` command: dataset -> train -> generate -> fid -> report."""

import json

import numpy as np
import pytest
from PIL import Image
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.cli import build_parser, main
from patchdiff.demo import make_landscapes


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("dataset", "train", "generate", "fid", "report", "demo"):
        assert command in out


def test_end_to_end(tmp_path, tiny_detector, capsys):
    src = tmp_path / "my-images"
    src.mkdir()
    for i, image in enumerate(make_landscapes(40, 24, seed=3)):
        Image.fromarray(image).save(src / f"photo{i}.png")
    data = tmp_path / "data.zip"
    assert (
        main(["dataset", "--source", str(src), "--dest", str(data), "--resolution", "16", "--no-progress"])
        == 0
    )

    train = [
        *f"train --data {data} --outdir {tmp_path / 'runs'} --duration 0.2 --tick 0.1 --snap 1".split(),
        *["--grid", "4", "--no-progress"],
        *TINY_TRAIN_FLAGS,
    ]
    assert main([*train, "--dry-run"]) == 0
    assert "parameters:" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert main(train) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (
        main(
            [
                "generate",
                "--model",
                str(run),
                "--outdir",
                str(tmp_path / "out"),
                "--seeds",
                "0-3",
                "--steps",
                "5",
                "--grid",
                str(tmp_path / "grid.png"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "out" / "000003.png").size == (16, 16)
    assert Image.open(tmp_path / "grid.png").size == (32, 32)

    common = ["--detector", tiny_detector, "--batch", "8", "--no-progress", "--device", "cpu"]
    assert main(["fid", "ref", "--data", str(data), "--dest", str(tmp_path / "ref.npz"), *common]) == 0
    assert set(np.load(tmp_path / "ref.npz")) >= {"mu", "sigma"}
    capsys.readouterr()
    assert (
        main(["fid", "calc", "--images", str(tmp_path / "out"), "--ref", str(tmp_path / "ref.npz"), *common])
        == 0
    )
    assert (
        main(
            [
                "fid",
                "calc",
                "--model",
                str(run),
                "--num",
                "8",
                "--steps",
                "5",
                "--ref",
                str(tmp_path / "ref.npz"),
                "--metrics",
                "fid,kid",
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    fids = [float(line.split()[1]) for line in out.splitlines() if line.startswith("fid ")]
    assert len(fids) == 2 and all(np.isfinite(fids)) and all(f > 0 for f in fids)
    assert "kid" in out

    assert main(["report", str(run)]) == 0
    assert (run / "report.png").is_file() and (run / "report.html").is_file()


def test_metrics_during_training(tmp_path, landscapes, tiny_detector):
    runs = tmp_path / "runs"
    metrics = f"--metrics fid,kid --metric-num 16 --detector {tiny_detector}".split()
    train = (
        f"train --data {landscapes} --outdir {runs} --duration 0.1 --tick 0.1 --grid 0 --no-progress".split()
    )
    assert main([*train, *metrics, *TINY_TRAIN_FLAGS]) == 0
    (run,) = runs.iterdir()
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    metrics = [r for r in records if r["kind"] == "metrics"]
    assert len(metrics) == 1 and {"fid", "kid", "kid_std"} <= set(metrics[0]) and metrics[0]["fid"] > 0
    assert (run / "reference.npz").is_file()


def test_errors_are_one_line_and_name_the_problem(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "patchdiff train: error:" in err and "missing" in err
    assert main(["generate", "--model", str(tmp_path), "--outdir", str(tmp_path / "o")]) == 2
    assert "no snapshot" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--outdir", str(tmp_path), "--metrics", "fid,isc"]) == 2
