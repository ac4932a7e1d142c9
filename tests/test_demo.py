import numpy as np
from PIL import Image

from patchdiff.cli import main
from patchdiff.demo import demo_config, make_landscapes


def test_landscapes_have_sky_above_ground():
    images = make_landscapes(50, 32, seed=0).astype(int)
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.int64
    top, bottom = images[:, :4].mean(axis=(0, 1, 2)), images[:, -4:].mean(axis=(0, 1, 2))
    assert top[2] > top[1] > top[0] and bottom[1] > bottom[2]  # blue sky, green ground
    assert not np.array_equal(images[0], images[1])
    assert np.array_equal(make_landscapes(3, 32, seed=5), make_landscapes(3, 32, seed=5))


def test_demo_config_is_the_paper_schedule_on_a_tiny_network():
    cfg = demo_config("d", "o", kimg=60)
    assert (
        cfg.patch.schedule == "progressive" and cfg.patch.real_p == 0.5 and cfg.network.model_channels == 32
    )


def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--outdir",
                str(out),
                "--kimg",
                "0.2",
                "--images",
                "48",
                "--samples",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "samples:" in printed and "loss plot:" in printed
    for name in ("samples.png", "data-preview.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.size[0] >= 64
    assert Image.open(out / "samples.png").size == (2 * 32 * 4, 2 * 32 * 4)
