"""`patchdiff fid ref|calc` and compute_metrics end to end, with a tiny TorchScript detector."""

import argparse
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import TinyNvidiaDetector

from patchdiff.cli import fid as fid_cli
from patchdiff.metrics.fid import compute_metrics, load_reference, reference_from_features, save_reference


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    fid_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def write_pngs(folder, n: int, seed: int, offset: int = 0) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.integers(0, 200, (16, 16, 3)) + offset, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.fixture
def setup(tmp_path):
    detector = tmp_path / "tiny.pt"
    torch.jit.script(TinyNvidiaDetector()).save(str(detector))
    write_pngs(tmp_path / "real", 40, seed=0)
    return tmp_path, str(detector)


def common(detector: str) -> list[str]:
    return ["--detector", detector, "--batch", "16", "--workers", "0", "--no-progress", "--device", "cpu"]


def parse_results(out: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in out.splitlines()
        if line.startswith(("fid", "kid"))
    }


def test_ref_then_calc_round_trip(setup, capsys):
    tmp, detector = setup
    ref = tmp / "ref.npz"
    assert (
        run_cli(
            [
                "fid",
                "ref",
                "--data",
                str(tmp / "real"),
                "--dest",
                str(ref),
                "--kid-features",
                "30",
                *common(detector),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "per 1000 images" in out and "40 images, 16-d features, 30 kept for KID" in out
    stored = load_reference(ref)
    assert stored.mu.shape == (16,) and stored.sigma.shape == (16, 16) and stored.features.shape == (30, 16)

    # The same images score FID ~0 against their own reference.
    argv = [
        "fid",
        "calc",
        "--images",
        str(tmp / "real"),
        "--ref",
        str(ref),
        "--metrics",
        "fid,kid",
        *common(detector),
    ]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    same = parse_results(out)
    assert same["fid"] == pytest.approx(0.0, abs=1e-4) and "kid" in same and " ± " in out

    # Brighter images of the same kind score clearly worse, on both metrics.
    write_pngs(tmp / "bright", 40, seed=1, offset=55)
    argv[3] = str(tmp / "bright")
    assert run_cli(argv) == 0
    shifted = parse_results(capsys.readouterr().out)
    assert shifted["fid"] > 1e-2 and shifted["kid"] > same["kid"]


def test_calc_errors(setup):
    tmp, detector = setup
    real = str(tmp / "real")
    with pytest.raises(FileNotFoundError, match="--ref"):
        run_cli(["fid", "calc", "--images", real, "--ref", str(tmp / "missing.npz"), *common(detector)])
    # An EDM-style reference (mu, sigma only): FID works, KID says to rebuild the reference.
    features = np.random.default_rng(0).standard_normal((20, 16))
    save_reference(reference_from_features(features, kid_features=0), tmp / "edm.npz")
    with pytest.raises(ValueError, match="rebuild it"):
        run_cli(
            [
                "fid",
                "calc",
                "--images",
                real,
                "--ref",
                str(tmp / "edm.npz"),
                "--metrics",
                "kid",
                *common(detector),
            ]
        )
    # A reference made with another detector (2048-d) does not match the tiny one's 16 features.
    save_reference(reference_from_features(np.zeros((3, 2048)), kid_features=0), tmp / "inception.npz")
    with pytest.raises(ValueError, match="same detector"):
        run_cli(["fid", "calc", "--images", real, "--ref", str(tmp / "inception.npz"), *common(detector)])
    with pytest.raises(ValueError, match="--metrics"):
        run_cli(["fid", "calc", "--images", real, "--ref", str(tmp / "edm.npz"), "--metrics", "fid,is"])
    with pytest.raises(ValueError, match="--num"):
        run_cli(["fid", "calc", "--model", str(tmp), "--ref", str(tmp / "edm.npz"), *common(detector)])


def fake_generator(monkeypatch, real_folder) -> list[dict]:
    """patchdiff.generation stand-ins: 'generation' returns the real PNGs, image i for seed i (mod 40).
    Returns the list into which each call's sampler settings go."""
    import patchdiff.generation

    real = torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in sorted(real_folder.iterdir())]
    )

    calls = []

    def fake_iter_images(
        model, seeds, batch_size, num_steps, class_label, cfg_scale, progress, sampler=None, **churn
    ):
        assert model is loaded and num_steps == 5
        calls.append(dict(sampler=sampler, cfg_scale=cfg_scale, **churn))
        for i in range(0, len(seeds), batch_size):
            batch = list(seeds[i : i + batch_size])
            yield batch, real[[s % len(real) for s in batch]]

    # class-conditional, trained with label dropout: guidance (--cfg) applies
    network = types.SimpleNamespace(label_dropout=0.1)
    loaded = types.SimpleNamespace(label_dim=10, config=types.SimpleNamespace(network=network))
    monkeypatch.setattr(patchdiff.generation, "load", lambda path, device=None, vae=None: loaded)
    monkeypatch.setattr(patchdiff.generation, "iter_images", fake_iter_images)
    return calls


def test_compute_metrics_and_calc_model_with_a_stand_in_generator(setup, monkeypatch, capsys):
    tmp, detector = setup
    fake_generator(monkeypatch, tmp / "real")
    ref = tmp / "ref.npz"
    run_cli(
        [
            "fid",
            "ref",
            "--data",
            str(tmp / "real"),
            "--dest",
            str(ref),
            "--kid-features",
            "40",
            *common(detector),
        ]
    )
    capsys.readouterr()

    results = compute_metrics(
        ["fid", "kid"], "run-dir", str(ref), 40, detector, 16, seed=0, num_steps=5, device="cpu"
    )
    assert set(results) == {"fid", "kid", "kid_std"} and results["fid"] == pytest.approx(0.0, abs=1e-6)
    shifted = compute_metrics(
        ["fid"], "run-dir", str(ref), 40, detector, 16, seed=7, num_steps=5, device="cpu"
    )
    assert shifted["fid"] == pytest.approx(0.0, abs=1e-6)  # seeds 7..46 are the same 40 images, rolled
    half = compute_metrics(["fid"], "run-dir", str(ref), 20, detector, 16, num_steps=5, device="cpu")
    assert half["fid"] > 1e-3
    with pytest.raises(ValueError, match="choose from fid, kid"):
        compute_metrics(["fid", "precision"], "run-dir", str(ref), 40, detector, 16)

    argv = [
        "fid",
        "calc",
        "--model",
        str(tmp),
        "--num",
        "40",
        "--steps",
        "5",
        "--ref",
        str(ref),
        *common(detector),
    ]
    assert run_cli(argv) == 0
    assert parse_results(capsys.readouterr().out)["fid"] == pytest.approx(0.0, abs=1e-4)


def test_calc_model_takes_the_sampler_preset_and_churn_flags(setup, monkeypatch, capsys):
    """`fid calc --model` samples as `generate` does: --preset and the stochastic sampler's flags."""
    tmp, detector = setup
    calls = fake_generator(monkeypatch, tmp / "real")
    save_reference(reference_from_features(np.zeros((3, 16)), kid_features=0), tmp / "ref.npz")
    argv = [
        "fid",
        "calc",
        "--model",
        str(tmp),
        "--num",
        "8",
        "--ref",
        str(tmp / "ref.npz"),
        *common(detector),
    ]
    # the paper's ADM latent sampler (Heun with churn), with a flag given on the command line winning
    assert run_cli([*argv, "--preset", "adm-latent", "--steps", "5", "--S-noise", "1.5"]) == 0
    assert calls[-1] == dict(sampler="heun", cfg_scale=1.3, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.5)
    assert run_cli([*argv, "--steps", "5", "--sampler", "euler", "--S-churn", "10", "--S-max", "2"]) == 0
    assert calls[-1] == dict(sampler="euler", cfg_scale=1.0, S_churn=10.0, S_min=0.0, S_max=2.0, S_noise=1.0)
    with pytest.raises(ValueError, match="--S-churn -1"):
        run_cli([*argv, "--steps", "5", "--S-churn", "-1"])
