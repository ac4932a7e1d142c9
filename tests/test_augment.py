import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tests.conftest import tiny_config

from patchdiff import augment
from patchdiff.cli import main
from patchdiff.config import network_preset
from patchdiff.denoisers import build_denoiser
from patchdiff.generation import Model, generate
from patchdiff.networks import build_network
from patchdiff.training import loop
from patchdiff.training.checkpoint import load_state
from patchdiff.training.stream import CropDataset, CropKey


def params(**kw) -> np.ndarray:
    names = ("flip", "tx", "ty", "iso", "theta", "aniso", "phi")
    return np.array([float(kw.get(n, 0.0)) for n in names])


def blobs(size: int = 32) -> torch.Tensor:
    """Three channels, each one Gaussian blob at its own place (offsets from the centre: (+6, 0), (0, +6),
    (-4, -5)), so each channel's centroid tracks one point through a transform."""
    c = (size - 1) / 2
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    points = [(6.0, 0.0), (0.0, 6.0), (-4.0, -5.0)]
    return torch.stack(
        [torch.exp(-((xs - c - x) ** 2 + (ys - c - y) ** 2) / (2 * 1.5**2)) for x, y in points]
    ).float()


def centroids(image: torch.Tensor) -> np.ndarray:
    """(x, y) offsets from the centre of each channel's centroid, [C, 2]."""
    _C, H, W = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    w = image.double() / image.double().sum(dim=(1, 2), keepdim=True)
    return torch.stack(
        [(w * (xs - (W - 1) / 2)).sum((1, 2)), (w * (ys - (H - 1) / 2)).sum((1, 2))], -1
    ).numpy()


def fitted_linear_map(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The 2x2 matrix A with after ~= A before (points as rows; no translation in these tests)."""
    X, *_ = np.linalg.lstsq(before, after, rcond=None)
    return X.T


def test_zero_parameters_are_the_identity_and_the_zero_label():
    image = torch.randint(0, 256, (3, 16, 12), dtype=torch.uint8)
    assert torch.equal(augment.apply(image, params()), image)
    assert torch.equal(augment.augment_labels(params(), (16, 12)), torch.zeros(augment.AUGMENT_DIM))


def test_the_flip_and_the_integer_translation_are_recovered_exactly():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(augment.apply(image, params(flip=1)), image.flip(-1))
    moved = augment.apply(image, params(tx=3, ty=-2))
    # Recover the shift: the only one under which the interior matches.
    errors = {
        (dx, dy): (moved[:, 4:12, 4:12].int() - image[:, 4 - dy : 12 - dy, 4 - dx : 12 - dx].int())
        .abs()
        .sum()
        .item()
        for dx in range(-3, 4)
        for dy in range(-3, 4)
    }
    assert min(errors, key=errors.get) == (3, -2) and errors[(3, -2)] == 0
    # The border is reflected, not zero: the three new columns mirror the image's first ones.
    assert torch.equal(moved[:, :-2, :3], image[:, 2:, :3].flip(-1))  # ty = -2: rows move up by 2


@pytest.mark.parametrize("iso", [-0.3, 0.25])
def test_the_isotropic_scale_is_recovered(iso):
    pattern = blobs()
    A = fitted_linear_map(centroids(pattern), centroids(augment.apply(pattern, params(iso=iso))))
    assert np.allclose(A, 2**iso * np.eye(2), atol=0.03)


@pytest.mark.parametrize("theta", [-2.5, 0.4, 3.0])
def test_the_rotation_is_recovered(theta):
    pattern = blobs()
    A = fitted_linear_map(centroids(pattern), centroids(augment.apply(pattern, params(theta=theta))))
    assert math.atan2(A[1, 0], A[0, 0]) == pytest.approx(theta, abs=0.02)
    assert np.allclose(A.T @ A, np.eye(2), atol=0.03)  # a rotation, no scaling


@pytest.mark.parametrize(("aniso", "phi"), [(0.3, 0.5), (-0.25, 2.0)])
def test_the_anisotropic_scale_and_its_direction_are_recovered(aniso, phi):
    pattern = blobs()
    A = fitted_linear_map(centroids(pattern), centroids(augment.apply(pattern, params(aniso=aniso, phi=phi))))
    values, vectors = np.linalg.eigh((A + A.T) / 2)  # symmetric: a stretch along phi, a squeeze across
    assert np.allclose(sorted(values), sorted([2**aniso, 2**-aniso]), atol=0.03)
    direction = vectors[:, np.argmax(values) if aniso > 0 else np.argmin(values)]
    angle = math.atan2(direction[1], direction[0])
    assert math.cos(2 * (angle - phi)) == pytest.approx(1.0, abs=2e-3)  # phi up to a half turn


def test_each_transform_comes_with_probability_p():
    rng = np.random.default_rng(0)
    drawn = augment.draw_params(rng, 0.3, 20_000, (32, 32))
    on = np.stack(
        [drawn[:, 0] != 0, drawn[:, 1:3].any(1), drawn[:, 3] != 0, drawn[:, 4] != 0, drawn[:, 5] != 0], 1
    )
    # The flip happens half the time it is chosen; a chosen translation can be (0, 0): 1/289 of the time.
    assert on.mean(0) == pytest.approx([0.15, 0.3 * (1 - 1 / 289), 0.3, 0.3, 0.3], abs=0.015)
    assert np.abs(drawn[:, 1:3]).max() == 4 and np.all(drawn[:, 1:3] == np.round(drawn[:, 1:3]))
    assert not augment.draw_params(np.random.default_rng(0), 0.0, 100, (32, 32)).any()


def test_the_loader_transforms_the_whole_image_before_the_crop(landscapes):
    from patchdiff.data import ImageDataset

    dataset = ImageDataset(landscapes)
    q = params(tx=2, flip=1)
    crop = CropDataset(dataset)[CropKey(3, 5, 4, 8, 8, tuple(q))]
    whole = augment.apply(dataset[3][0], q)
    assert torch.equal(crop.data, whole[:, 5:13, 4:12])
    assert torch.equal(crop.augment, augment.augment_labels(q, (16, 16)))
    plain = CropDataset(dataset)[CropKey(3, 5, 4, 8, 8)]
    assert plain.augment.numel() == 0 and torch.equal(plain.data, dataset[3][0][:, 5:13, 4:12])


def _weights(run_dir):
    return load_state(run_dir / "state.pt")


def test_p_zero_trains_bit_identically_to_no_augmentation(landscapes, tmp_path):
    a = _weights(
        loop.train(
            tiny_config(str(landscapes), str(tmp_path / "a"), duration_kimg=0.05), progress=False, grid=0
        )
    )
    b = _weights(
        loop.train(
            tiny_config(str(landscapes), str(tmp_path / "b"), duration_kimg=0.05, augment=0.0),
            progress=False,
            grid=0,
        )
    )
    for key in ("denoiser", "ema"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs with --augment 0"


def test_augmented_training_resumes_exactly_and_feeds_the_labels(landscapes, tmp_path, monkeypatch):
    seen = []
    edm_loss = loop.edm_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("augment_labels"))
        return edm_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "edm_loss", spy)
    cfg = lambda out, kimg: tiny_config(str(landscapes), str(tmp_path / out), duration_kimg=kimg, augment=0.5)  # noqa: E731
    full = loop.train(cfg("a", 0.1), progress=False, grid=0)
    assert all(s is not None and s.shape[1] == augment.AUGMENT_DIM for s in seen)
    assert (
        any(s.abs().sum() > 0 for s in seen)
        and json.loads((full / "config.json").read_text())["network"]["augment_dim"] == 8
    )
    part = loop.train(cfg("b", 0.05), progress=False, grid=0)
    resumed = loop.train(cfg("b", 0.1), resume="auto", progress=False, grid=0)
    assert resumed == part
    a, b = _weights(full), _weights(resumed)
    for key in ("denoiser", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


def test_sampling_passes_zero_augmentation_labels(monkeypatch):
    cfg = tiny_config("unused", "unused", augment=0.5)
    cfg = replace(cfg, network=replace(cfg.network, augment_dim=8), image_size=(16, 16))
    denoiser = build_denoiser(cfg, pretrained=False)
    seen = []
    forward = denoiser.net.forward

    def spy(x, noise_labels, class_labels=None, augment_labels=None):
        seen.append(augment_labels)
        return forward(x, noise_labels, class_labels, augment_labels=augment_labels)

    monkeypatch.setattr(denoiser.net, "forward", spy)
    generate(Model(denoiser.eval(), cfg, torch.device("cpu")), range(2), batch_size=2, num_steps=3)
    assert seen and all(s is not None and s.shape == (2, 8) and not s.any() for s in seen)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_the_augment_label_changes_the_output_and_zero_is_the_plain_embedding(arch):
    net_cfg = network_preset(
        arch, 16, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0
    )
    torch.manual_seed(0)
    net = build_network(replace(net_cfg, augment_dim=8)).eval()
    # Give the out conv (zero at init) weights, so that the output depends on the embedding.
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)
    x, sigma = torch.randn(2, 5, 16, 16), torch.ones(2)
    zero = net(x, sigma, None, augment_labels=torch.zeros(2, 8))
    assert torch.equal(zero, net(x, sigma, None))  # no label = the zero label
    assert not torch.allclose(zero, net(x, sigma, None, augment_labels=torch.ones(2, 8)))


def test_refused_with_one_line(landscapes, tmp_path, capsys):
    args = ["train", "--data", str(landscapes), "--outdir", str(tmp_path), "--dry-run", "--cbase", "8"]
    assert main([*args, "--augment", "1.5"]) != 0
    assert "--augment 1.5" in capsys.readouterr().err
    assert (
        main([*args, "--augment", "0.2", "--arch", "dit", "--depth", "1", "--width", "32", "--heads", "2"])
        != 0
    )
    err = capsys.readouterr().err
    assert "--arch dit" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--augment", "0.2", "--cres", "1,2", "--blocks", "1", "--attn", "8"]) == 0
    assert '"augment": 0.2' in capsys.readouterr().out


@pytest.mark.parametrize("q", [dict(flip=1, tx=2, ty=-3), dict(tx=-4, ty=1), dict(flip=1)])
def test_the_exact_path_agrees_with_resampling(q):
    """Flips and whole-pixel shifts are done by indexing; a negligible scale sends the same transform
    through bilinear resampling, which must land on the same pixels (also at the reflected border)."""
    image = torch.rand(2, 12, 10)
    exact = augment.apply(image, params(**q))
    resampled = augment.apply(image, params(**q, iso=1e-9))
    assert torch.allclose(exact, resampled, atol=1e-4)
