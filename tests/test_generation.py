import pytest
import torch

from patchdiff.generation import generate, image_grid, load, parse_seeds


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,10-12") == [1, 5, 10, 11, 12]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("a-b")
    assert parse_seeds(f"{2**32 - 2}-{2**32 - 1}") == [2**32 - 2, 2**32 - 1]
    for text, message in [
        ("5-2", "reversed"),
        ("1,1,1", "seed 1 appears more than once"),
        ("0-3,2", "seed 2 appears more than once"),
        (str(2**32), "below 2\\*\\*32"),
        ("-1", "seeds >= 0"),
        ("", "expected a list"),
        ("0-100000000", "more than"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)


def test_an_image_depends_only_on_its_seed(tiny_run):
    model = load(tiny_run, "cpu")
    one_by_one = generate(model, [3, 4, 5, 6], batch_size=1, num_steps=6, S_churn=5, sampler="heun")
    batched = generate(model, [3, 4, 5, 6], batch_size=4, num_steps=6, S_churn=5, sampler="heun")
    assert one_by_one.dtype == torch.uint8 and one_by_one.shape == (4, 3, 16, 16)
    assert (one_by_one.int() - batched.int()).abs().max() <= 1  # float rounding at most
    assert (one_by_one.int() - batched.int()).abs().float().mean() < 0.01
    other = generate(model, [7], batch_size=1, num_steps=6)
    assert not torch.equal(other[0], one_by_one[0])


def test_sampler_options_and_errors(tiny_run):
    model = load(tiny_run, "cpu")
    euler = generate(model, [0], num_steps=4, sampler="euler")
    assert euler.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, [0], sampler="dpm")
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, [0], class_label=0)


def test_image_grid_layout():
    images = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1).expand(5, 3, 2, 2)
    grid = image_grid(images, ncol=3)
    assert grid.shape == (4, 6, 3)
    assert grid[0, 2, 0] == 1 and grid[2, 2, 0] == 4 and grid[2, 4, 0] == 0  # padding is black


def test_class_conditional_generation_with_guidance(tmp_path, landscapes):
    """A labelled data set, --cond with label dropout, then guided sampling of one class."""
    import dataclasses
    import json
    import shutil

    from tests.conftest import tiny_config

    from patchdiff.training.loop import train

    data = tmp_path / "data"
    shutil.copytree(landscapes, data)
    files = sorted(p.name for p in data.glob("*.png"))
    (data / "dataset.json").write_text(json.dumps({"labels": [[f, i % 3] for i, f in enumerate(files)]}))
    cfg = tiny_config(str(data), str(tmp_path / "runs"), cond=True, duration_kimg=0.05)
    cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, label_dropout=0.1))
    run = train(cfg, progress=False, grid=4)
    model = load(run, "cpu")
    assert model.label_dim == 3 and model.config.network.label_dropout == 0.1
    guided = generate(model, [0, 1], num_steps=4, class_label=2, cfg_scale=2.0)
    plain = generate(model, [0, 1], num_steps=4, class_label=2, cfg_scale=1.0)
    assert guided.shape == plain.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [0], class_label=3)


def test_a_vp_model_is_sampled_within_its_noise_levels(monkeypatch):
    """EDM's sigma_max = 80 is beyond a scaled_linear DDPM's 14.6: the sampler gets the model's range."""
    from patchdiff import generation
    from patchdiff.config import NetworkConfig, TrainConfig
    from patchdiff.precond_vp import VPDenoiser, vp_alphas_cumprod

    class Zero(torch.nn.Module):
        def forward(self, x, t, labels=None):
            return torch.zeros_like(x)

    D = VPDenoiser(Zero(), "epsilon", vp_alphas_cumprod("scaled_linear", 0.00085, 0.012), use_coords=False)
    cfg = TrainConfig(network=NetworkConfig(resolution=4, img_channels=1), image_size=(4, 4))
    seen = {}

    def sampler(denoiser, noise, **kwargs):
        seen.update(kwargs)
        return noise

    monkeypatch.setitem(generation.SAMPLERS, "euler", sampler)
    generate(generation.Model(D, cfg, torch.device("cpu")), [0], sampler="euler", num_steps=2)
    assert (seen["sigma_min"], seen["sigma_max"]) == (D.sigma_min, D.sigma_max)
