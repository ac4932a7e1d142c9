"""Non-square images end to end: dataset -> train -> generate -> fid -> report, pixel and latent."""

import json

import numpy as np
from PIL import Image
from tests import vae as helpers
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.cli import main
from patchdiff.demo import make_landscapes
from patchdiff.generation import generate, load

tiny_vae = helpers.tiny_vae  # fixture


def write_rectangles(folder, n, H, W):
    """n landscapes cut to H x W (W > H): the sky is on top, so a transposed image would show."""
    folder.mkdir()
    for i, image in enumerate(make_landscapes(n, W, seed=2)):
        Image.fromarray(np.ascontiguousarray(image[:H])).save(folder / f"{i:03d}.png")
    return folder


def sizes(folder, pattern="*.png"):
    return {Image.open(p).size for p in sorted(folder.glob(pattern))}


def test_pixel_32x48_dataset_train_generate_fid_report(tmp_path, tiny_detector, capsys):
    data = tmp_path / "data.zip"
    src = write_rectangles(tmp_path / "src", 16, 32, 48)
    assert main(["dataset", "--source", str(src), "--dest", str(data), "--no-progress"]) == 0
    assert "(32x48, 3 channel(s)" in capsys.readouterr().out
    runs = tmp_path / "runs"
    train = ["train", "--data", str(data), "--outdir", str(runs), *TINY_TRAIN_FLAGS, "--no-progress"]
    flags = [
        "--duration",
        "0.1",
        "--tick",
        "0.05",
        "--snap",
        "1",
        "--grid",
        "4",
        "--patch-schedule",
        "stochastic",
    ]
    assert main([*train, *flags]) == 0
    (run,) = runs.iterdir()
    assert json.loads((run / "config.json").read_text())["image_size"] == [32, 48]
    assert sizes(run, "grid-*.png") == {(96, 64)}  # 2 x 2 images of W x H = 48 x 32
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    crops = ticks[-1]["crops"]  # images per step: round(8 * sqrt(1536 / P^2)), 8 for the whole frame
    steps = ticks[-1]["steps_by_size"]
    assert sum(crops.values()) == sum({"8": 39, "16": 20, "32": 8}[k] * n for k, n in steps.items())
    out = tmp_path / "gen"
    gen = ["generate", "--model", str(run), "--outdir", str(out), "--seeds", "0-3", "--steps", "4"]
    assert main([*gen, "--grid", str(tmp_path / "grid.png"), "--no-progress"]) == 0
    assert sizes(out) == {(48, 32)} and Image.open(tmp_path / "grid.png").size == (96, 64)
    common = ["--detector", tiny_detector, "--batch", "8", "--no-progress", "--device", "cpu"]
    ref = str(tmp_path / "ref.npz")
    assert main(["fid", "ref", "--data", str(data), "--dest", ref, *common]) == 0
    capsys.readouterr()
    assert (
        main(["fid", "calc", "--model", str(run), "--num", "8", "--steps", "4", "--ref", ref, *common]) == 0
    )
    fid = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("fid ")]
    assert len(fid) == 1 and np.isfinite(fid[0])
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()


def test_latent_32x48_dataset_train_generate_fid(tmp_path, tiny_vae, tiny_detector, capsys):
    data = tmp_path / "latents"
    src = write_rectangles(tmp_path / "src", 8, 32, 48)
    flags = [
        "--source",
        str(src),
        "--dest",
        str(data),
        "--vae",
        str(tiny_vae),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(["dataset", *flags]) == 0
    assert "32x48 pixels -> 4x4x6" in capsys.readouterr().out  # C x h x w latents (factor 8)
    runs = tmp_path / "runs"
    train = ["train", "--data", str(data), "--outdir", str(runs), *TINY_TRAIN_FLAGS, "--attn", "4"]
    assert (
        main([*train, "--duration", "0.05", "--tick", "0.02", "--snap", "1", "--grid", "4", "--no-progress"])
        == 0
    )
    (run,) = runs.iterdir()
    assert json.loads((run / "config.json").read_text())["image_size"] == [4, 6]
    assert sizes(run, "grid-*.png") == {(96, 64)}  # 2 x 2 decoded 48 x 32 images
    model = load(run, "cpu")
    assert generate(model, [0, 1], num_steps=3).shape == (2, 3, 32, 48)
    out = tmp_path / "gen"
    gen = [
        "generate",
        "--model",
        str(run),
        "--outdir",
        str(out),
        "--seeds",
        "0-1",
        "--steps",
        "3",
        "--no-progress",
    ]
    assert main(gen) == 0 and sizes(out) == {(48, 32)}
    common = ["--detector", tiny_detector, "--batch", "8", "--no-progress", "--device", "cpu"]
    ref = str(tmp_path / "ref.npz")
    assert main(["fid", "ref", "--data", str(src), "--dest", ref, "--kid-features", "0", *common]) == 0
    capsys.readouterr()
    assert main(["fid", "calc", "--images", str(out), "--ref", ref, *common]) == 0
    assert any(line.startswith("fid ") for line in capsys.readouterr().out.splitlines())
