"""--coord-embed K: trained through the CLI, stored in the config, rebuilt by generate and resume."""

from __future__ import annotations

import json

from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.cli import main
from patchdiff.generation import generate, load


def test_coord_embed_trains_generates_and_resumes(landscapes, tmp_path, capsys):
    outdir = tmp_path / "runs"
    base = ["train", "--data", str(landscapes), "--outdir", str(outdir), "--no-progress", "--grid", "0"]
    base += [*TINY_TRAIN_FLAGS, "--duration", "0.05", "--tick", "0.05"]
    assert main([*base, "--coord-embed", "2"]) == 0
    (run,) = outdir.iterdir()
    saved = json.loads((run / "config.json").read_text())
    assert saved["network"]["coord_embed"] == 2
    model = load(run, "cpu")
    assert model.denoiser.coord_embed == 2 and model.config.network.in_channels == 3 + 2 + 8
    assert generate(model, [0], num_steps=3).shape == (1, 3, 16, 16)
    # A resumed run rebuilds the same network; another K cannot load its weights.
    assert main([*base, "--resume", "auto", "--duration", "0.1"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume", "auto", "--coord-embed", "3"]) == 2
    assert "coord_embed" in capsys.readouterr().err
    assert main([*base, "--coord-embed", "1", "--no-coords"]) == 2
    assert "--no-coords" in capsys.readouterr().err
    assert main([*base, "--coord-embed", "1", "--arch", "dit"]) == 2
    assert "--coord-embed 1" in capsys.readouterr().err
