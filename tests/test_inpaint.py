"""In- and out-painting (inpaint.py) through generation.iter_images, in pixel and latent space."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.test_canvas import random_model
from tests.vae import tiny_vae  # noqa: F401 (a fixture)

from patchdiff.canvas import centred_canvas
from patchdiff.generation import generate
from patchdiff.inpaint import Known, inpainting_denoiser, mask_to_grid, place
from patchdiff.sampling import SAMPLERS


def known_image(C=3, H=16, W=16) -> torch.Tensor:
    return torch.randint(0, 256, (C, H, W), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("rounds", [0, 1])
def test_inpainting_keeps_the_known_pixels_exactly(sampler, rounds):
    model = random_model()
    image = known_image()
    generate_mask = torch.zeros(16, 16, dtype=torch.bool)
    generate_mask[4:12, 6:14] = True
    known = Known(image, generate_mask, rounds)
    out = generate(model, [0, 1], num_steps=3, sampler=sampler, known=known)
    assert torch.equal(out[:, :, ~generate_mask], image[:, ~generate_mask].expand(2, -1, -1))
    plain = generate(model, [0, 1], num_steps=3, sampler=sampler)
    assert not torch.equal(out[:, :, generate_mask], plain[:, :, generate_mask])  # the hole sees the rest


def test_outpainting_keeps_the_image_in_the_middle_of_the_canvas():
    model = random_model()
    image = known_image()
    out = generate(model, [3], num_steps=3, canvas=centred_canvas((16, 16), 16, 32), known=Known(image))
    assert out.shape == (1, 3, 16, 32) and torch.equal(out[0, :, :, 8:24], image)


def test_the_wrapper_feeds_the_known_pixels_noised_to_sigma():
    seen = []

    def D(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    known = torch.full((1, 1, 2, 2), 0.5)
    keep = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    wrapped = inpainting_denoiser(D, known, keep, torch.Generator().manual_seed(0), rounds=2)
    x = torch.full((3, 1, 2, 2), 7.0)
    out = wrapped(x, torch.tensor(1e-6))
    assert len(seen) == 3  # one call and two rounds
    assert (
        torch.allclose(seen[0][:, 0, 0, 0], torch.tensor(0.5), atol=1e-4) and (seen[0][:, 0, 1, 1] == 7).all()
    )
    assert torch.allclose(seen[1][:, 0, 1, 1], torch.tensor(0.0), atol=1e-4)  # the estimate, re-noised
    assert (out[:, 0, 0, 0] == 0.5).all() and (out[:, 0, 1, 1] == 0).all()
    with pytest.raises(ValueError, match="--resample -1"):
        inpainting_denoiser(D, known, keep, rounds=-1)


def test_mask_to_grid_and_place():
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 3, 5] = 0
    grid = mask_to_grid(keep, (2, 2))
    assert grid[0, 0].tolist() == [[1.0, 0.0], [1.0, 1.0]]  # a cell with one generated pixel is generated
    out, offset = place(torch.ones(1, 1, 2, 3), (4, 8))
    assert offset == (1, 2) and out.sum() == 6 and out[0, 0, 1, 2] == 1


def test_latent_inpainting_encodes_once_and_keeps_the_pixels(tiny_vae):  # noqa: F811
    from patchdiff.latent import load_vae

    model = random_model(4, img_channels=4)  # 4x4x4 latents of 32x32 pixels
    model = dataclasses.replace(
        model,
        config=dataclasses.replace(
            model.config,
            latent=dataclasses.replace(
                model.config.latent, vae=str(tiny_vae), shift=(0.0,) * 4, scale=(0.5,) * 4
            ),
        ),
        vae=load_vae(str(tiny_vae), "cpu"),
    )
    calls = []
    encode = model.vae.encode
    model.vae.encode = lambda images: calls.append(images.shape) or encode(images)
    image = known_image(3, 32, 32)
    generate_mask = torch.zeros(32, 32, dtype=torch.bool)
    generate_mask[8:24, 8:24] = True
    out = generate(model, [0, 1, 2], batch_size=2, num_steps=2, known=Known(image, generate_mask))
    assert out.shape == (3, 3, 32, 32) and calls == [(1, 3, 32, 32)]
    assert torch.equal(out[:, :, ~generate_mask], image[:, ~generate_mask].expand(3, -1, -1))
    with pytest.raises(ValueError, match="nothing to generate"):
        generate(model, [0], num_steps=2, known=Known(image))
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(model, [0], num_steps=2, known=Known(known_image(3, 12, 12)))


def test_the_cli_regions_canvases_and_inpainting(tiny_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from patchdiff.cli import main

    base = ["generate", "--model", str(tiny_run), "--seeds", "0-1", "--steps", "3", "--no-progress"]
    assert main([*base, "--outdir", str(tmp_path / "r"), "--region", "4,0,8,12"]) == 0
    assert Image.open(tmp_path / "r" / "000000.png").size == (12, 8)  # (W, H)
    assert (
        main([*base, "--outdir", str(tmp_path / "t"), "--canvas", "16,32", "--tile", "--tile-stride", "4"])
        == 0
    )
    assert Image.open(tmp_path / "t" / "000001.png").size == (32, 16)
    image = known_image().permute(1, 2, 0).numpy()
    Image.fromarray(image).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    flags = ["--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--resample", "1"]
    assert main([*base, "--outdir", str(tmp_path / "i"), *flags]) == 0
    out = np.asarray(Image.open(tmp_path / "i" / "000000.png"))
    assert np.array_equal(out[:, :8], image[:, :8])
    assert (
        main(
            [
                *base,
                "--outdir",
                str(tmp_path / "o"),
                "--init",
                str(tmp_path / "init.png"),
                "--canvas",
                "24,24",
            ]
        )
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "000001.png"))[4:20, 4:20], image)
    capsys.readouterr()
    for flags, message in [
        (["--region", "4,0,8"], "--region '4,0,8': expected 4"),
        (["--region", "10,0,8,8"], "--region 10,0,8,8"),
        (["--canvas", "16,8"], "--canvas 16,8 is smaller"),
        (["--canvas", "16,33"], "multiples of 2"),
        (["--mask", str(tmp_path / "mask.png")], "needs --init"),
        (["--init", str(tmp_path / "missing.png")], "--init"),
        (["--region", "0,0,8,8", "--tile"], "does not combine"),
        (["--tile-coords", "canvas"], "need --tile"),
        (["--init", str(tmp_path / "init.png")], "nothing to generate"),
    ]:
        assert main([*base, "--outdir", str(tmp_path / "e"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
