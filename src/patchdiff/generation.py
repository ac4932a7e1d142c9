"""Loading a trained model and sampling images from it.

An image depends only on its seed: its initial noise, its random class and its churn noise come from
a generator seeded with that seed alone (on the CPU, so the same seed gives the same image on any
device, any batch size and any number of processes, up to floating-point rounding).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from patchdiff.canvas import Canvas, canvas_denoiser, frame_canvas
from patchdiff.config import TrainConfig
from patchdiff.denoisers import build_denoiser
from patchdiff.inpaint import Known, inpainting_denoiser, mask_to_grid, paste_known, place
from patchdiff.latent import decode_to_pixels, load_vae, to_network
from patchdiff.precond import Denoiser
from patchdiff.sampling import SAMPLERS, DenoiserFn, guided_denoiser, resolve_sampler
from patchdiff.snapshot import newest_snapshot, read_snapshot


@dataclass
class Model:
    """A denoiser ready to sample, with the configuration it was trained with."""

    denoiser: Denoiser
    config: TrainConfig
    device: torch.device
    vae: Any = None  # latent models: the latent.VAE that decodes (loaded from config.latent.vae when None)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config.image_size or (self.config.network.resolution,) * 2
        return int(size[0]), int(size[1])

    @property
    def img_channels(self) -> int:
        return self.config.network.img_channels

    @property
    def label_dim(self) -> int:
        return self.config.network.label_dim


def load(path: str | Path, device: str | torch.device | None = None, vae: str | None = None) -> Model:
    """A run directory (its newest snapshot) or a snapshot `.safetensors` file -> Model in eval mode.
    `vae` overrides the VAE a latent model decodes with (e.g. a local copy of the one it recorded)."""
    path = Path(path)
    if path.is_dir():
        path = newest_snapshot(path)
    try:
        state, cfg, _ = read_snapshot(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # damaged file or metadata: JSON, config fields, safetensors' own errors
        text = " ".join(str(error).split())
        raise ValueError(text if str(path) in text else f"{path}: not a usable snapshot ({text})") from error
    check_finite(state, path)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        denoiser = build_denoiser(cfg, pretrained=False)  # the snapshot holds the weights: no hub needed
        missing, unexpected = denoiser.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, TypeError) as error:  # e.g. a tensor shape that the config contradicts
        text = " ".join(str(error).split())[:300]
        raise ValueError(f"{path}: weights do not fit the network its config describes ({text})") from error
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if vae and not cfg.latent.vae:
        raise ValueError(f"--vae {vae} given, but {path} was trained on pixels and needs no VAE")
    decoder = load_vae(vae, device) if vae else None
    return Model(denoiser.to(device).eval().requires_grad_(False), cfg, device, decoder)


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or infinity: they would sample black (or garbage) images."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); the run diverged "
            "before this snapshot, so use an earlier snapshot"
        )


SEED_LIMIT = 2**32  # seeds are unsigned 32-bit, as in EDM (and numpy's legacy seeding)
MAX_STEPS = 10_000  # the schedule is a Python list and each step a network call: more is surely a typo
MAX_SEEDS = 10_000_000  # per call: beyond this a typo is likelier than a wish (and the list fills memory)


def parse_seeds(text: str) -> list[int]:
    """'0-99' or '1,5,10-12' -> a list of distinct ints in [0, 2**32); an empty or reversed range, a
    repeated seed (which would overwrite its own image) or one out of range is an error."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(
                f"--seeds {text!r}: expected a list like 0-99 or 1,5,10-12 (seeds >= 0)"
            ) from None
        if last < first:
            raise ValueError(f"--seeds {text!r}: the range {part.strip()} is reversed; write {last}-{first}")
        if last >= SEED_LIMIT:
            raise ValueError(f"--seeds {text!r}: seed {last} is too large; seeds must be below 2**32")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise ValueError(f"--seeds {text!r}: more than {MAX_SEEDS} seeds; generate in several runs")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        repeated = next(s for s, n in Counter(seeds).items() if n > 1)
        raise ValueError(f"--seeds {text!r}: seed {repeated} appears more than once; list each seed once")
    return seeds


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def check_sampling_args(
    model: Model, seeds: Sequence[int], batch_size: int, num_steps: int, class_label: int | None, cfg: float
) -> None:
    """Refuse settings that would fail late or silently mean nothing; warn about weak ones."""
    if batch_size < 1:
        raise ValueError(f"--batch {batch_size}: must be at least 1")
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"--steps {num_steps}: must be in 1..{MAX_STEPS} (EDM uses 18 to 256)")
    if any(not 0 <= int(s) < SEED_LIMIT for s in seeds):
        raise ValueError(f"seeds must be in 0..2**32-1; got {min(seeds)}..{max(seeds)}")
    if class_label is not None and model.label_dim == 0:
        raise ValueError(
            f"--class {class_label} given but the model is unconditional (trained without --cond)"
        )
    if class_label is not None and not 0 <= class_label < model.label_dim:
        raise ValueError(
            f"--class {class_label} out of range: the model has classes 0..{model.label_dim - 1}"
        )
    if not math.isfinite(cfg):
        raise ValueError(f"--cfg {cfg}: must be a finite number")
    if cfg != 1.0 and model.label_dim == 0:
        raise ValueError(
            f"--cfg {cfg} needs a class-conditional model; this one is unconditional, so drop --cfg"
        )
    if cfg != 1.0 and model.config.network.label_dropout == 0:
        warnings.warn(
            f"--cfg {cfg}: the model was trained with label_dropout 0, so its unconditional output was never "
            "trained and guidance is unreliable (train with --label-dropout 0.1)",
            stacklevel=1,  # one location, so it prints once however often the check runs
        )


@torch.no_grad()
def iter_images(
    model: Model,
    seeds: Sequence[int],
    batch_size: int = 32,
    num_steps: int | None = None,
    sampler: str | None = None,
    class_label: int | None = None,
    cfg_scale: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    progress: bool = False,
    canvas: Canvas | None = None,
    known: Known | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (seeds, uint8 images [B, C, H, W]) batch by batch; a latent model's samples are decoded.
    sampler/num_steps None: the defaults (patchdiff.sampling.DEFAULT_SAMPLER and its DEFAULT_STEPS).
    canvas: a region, larger or tiled canvas (canvas.py; None = the training frame); known: in- or
    out-paint around these pixels (inpaint.py)."""
    sampler, num_steps = resolve_sampler(sampler, num_steps)
    check_sampling_args(model, seeds, batch_size, num_steps, class_label, cfg_scale)
    if hasattr(model.denoiser, "sigma_range"):  # a DDPM / VP / VE network knows only its own noise levels
        sigma_min, sigma_max = model.denoiser.sigma_range(sigma_min, sigma_max)
    canvas = canvas or frame_canvas(model.image_size)
    check_canvas(model, canvas)
    H, W = canvas.size
    C = model.img_channels
    kept = known_in_model_space(model, known, canvas) if known is not None else None
    seeds = list(seeds)
    batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in batch]
        noise = torch.stack([torch.randn(C, H, W, generator=g) for g in gens]).to(model.device)
        onehot = _batch_labels(model, gens, class_label)  # drawn after the noise, from the same generators
        D = _batch_denoiser(model, canvas, onehot, cfg_scale)
        if kept is not None:
            D = inpainting_denoiser(D, kept[0], kept[1], gens, known.rounds)
        x = SAMPLERS[sampler](
            D,
            noise,
            num_steps=num_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            S_churn=S_churn,
            S_min=S_min,
            S_max=S_max,
            S_noise=S_noise,
            generator=gens,
        )
        yield batch, _to_images(model, x, batch, kept)


def _batch_labels(model: Model, gens: list[torch.Generator], class_label: int | None) -> torch.Tensor | None:
    """One-hot labels [N, classes] of a batch: `class_label` for every image, else each seed's draw
    (None for an unconditional model)."""
    if not model.label_dim:
        return None
    labels = [
        class_label if class_label is not None else int(torch.randint(model.label_dim, (), generator=g))
        for g in gens
    ]
    return torch.nn.functional.one_hot(torch.tensor(labels), model.label_dim).float().to(model.device)


def _batch_denoiser(
    model: Model, canvas: Canvas, onehot: torch.Tensor | None, cfg_scale: float
) -> DenoiserFn:
    """The (guided) denoiser of a batch on its canvas."""
    if canvas.is_frame:  # the network's own default grid: exactly the sampling of the training frame
        return conditioned_denoiser(model, onehot, cfg_scale)
    return canvas_denoiser(
        canvas,
        lambda coords, y=onehot: conditioned_denoiser(model, y, cfg_scale, coords),
        model.device,
    )


def _to_images(model: Model, x: torch.Tensor, batch: list[int], kept) -> torch.Tensor:
    """uint8 images of the samples `x` (decoded from latents; the known pixels pasted back when in- or
    out-painting); refuses samples that are not finite."""
    if not torch.isfinite(x).all():  # one sync per batch; never write black images as if all went well
        raise RuntimeError(
            f"sampling gave NaN or infinity for seeds {batch[0]}..{batch[-1]}; the model or the sampler "
            "settings (--steps, --S-churn, --cfg) are unstable, so no images were written for them"
        )
    if kept is None:
        return to_uint8(decode_to_pixels(model, x))
    pixels = decode_to_pixels(model, paste_known(x, kept[0], kept[1]))
    return to_uint8(paste_known(pixels, kept[2], kept[3]))


def conditioned_denoiser(
    model: Model, labels: torch.Tensor | None, cfg_scale: float, coords: torch.Tensor | None = None
) -> DenoiserFn:
    """The model's D(x, sigma) with one-hot class labels [N, classes] (guided by cfg_scale; None for an
    unconditional model) and coordinates [2, h, w] for every image (None: the frame grid of x's size)."""

    def base(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = None if coords is None else coords.expand(x.shape[0], -1, -1, -1)
        return model.denoiser(x, sigma, coords=c, class_labels=class_labels)

    return base if labels is None else guided_denoiser(base, labels, cfg_scale)


def check_canvas(model: Model, canvas: Canvas) -> None:
    """A canvas (or region) the network can take: both sides multiples of its down-sampling."""
    if canvas.frame != model.image_size:
        raise ValueError(
            f"the canvas is laid out on a {canvas.frame} frame, but the model's is {model.image_size}"
        )
    m = model.config.network.min_crop
    H, W = canvas.size
    if (H % m or W % m) and canvas.size != model.image_size:  # the training frame itself always fits
        raise ValueError(
            f"a {H}x{W} region or canvas does not fit this network, which needs sides that are multiples of {m}"
            + (" latent cells" if model.config.latent.vae else " pixels")
        )


def known_in_model_space(
    model: Model, known: Known, canvas: Canvas
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(known x [1, C, H, W], keep [1, 1, H, W]) on the canvas in the model's space, and the same as
    pixels in [-1, 1] (for the final paste). The image sits centred in the canvas; a latent model's
    image is encoded once and its keep-mask min-pooled to the latent grid."""
    image = known.image.to(model.device)
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"the known image must be uint8 [C, h, w], got {image.dtype} {tuple(image.shape)}")
    c, h, w = image.shape
    keep = torch.ones(1, 1, h, w, device=model.device)
    if known.generate is not None:
        if tuple(known.generate.shape) != (h, w):
            raise ValueError(
                f"the mask is {tuple(known.generate.shape)} but the image {h}x{w}; give them one size"
            )
        keep = (~known.generate.to(model.device, torch.bool)).to(torch.float32)[None, None]
    pixels = image[None].to(torch.float32) / 127.5 - 1
    f = 1  # pixels per cell of the model's grid
    if model.config.latent.vae:
        if model.vae is None:
            model.vae = load_vae(model.config.latent.vae, model.device)
        f = model.vae.factor
    if bool(keep.min() == 1) and (h, w) == (canvas.size[0] * f, canvas.size[1] * f):
        raise ValueError(
            "the known image covers the whole canvas and the mask (if any) is all black: nothing to generate; "
            "give a --mask with white where to generate, or a larger --canvas to out-paint"
        )
    if not model.config.latent.vae:
        if c != model.img_channels:
            raise ValueError(f"the known image has {c} channels but the model makes {model.img_channels}")
        x, _ = place(pixels, canvas.size)
        keep_x, _ = place(keep, canvas.size)
        return x, keep_x, x, keep_x
    if h % f or w % f or c != 3:
        raise ValueError(
            f"a latent model's known image must be RGB with sides multiples of {f}; got {c}x{h}x{w}"
        )
    mean, _std = model.vae.encode(image[None])
    z = to_network(mean.to(model.device), model.config.latent)
    x, _ = place(z, canvas.size)
    keep_x, _ = place(mask_to_grid(keep, (h // f, w // f)), canvas.size)
    # The pixels under the image's latent cells: its latent offset, times f (not the pixel canvas' centre).
    top, left = (canvas.size[0] - h // f) // 2 * f, (canvas.size[1] - w // f) // 2 * f
    pixels_x = torch.zeros(1, 3, canvas.size[0] * f, canvas.size[1] * f, device=model.device)
    keep_pixels = torch.zeros(1, 1, *pixels_x.shape[-2:], device=model.device)
    pixels_x[..., top : top + h, left : left + w] = pixels
    keep_pixels[..., top : top + h, left : left + w] = keep
    return x, keep_x, pixels_x, keep_pixels


def generate(model: Model, seeds: Sequence[int], **kwargs) -> torch.Tensor:
    """uint8 images [N, C, H, W] for the seeds (keyword arguments as for iter_images)."""
    return torch.cat([images.cpu() for _, images in iter_images(model, seeds, **kwargs)])


def image_grid(images: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 [rows*H, ncol*W, C] array."""
    N, C, H, W = images.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    grid = torch.zeros(nrow * ncol, C, H, W, dtype=torch.uint8)
    grid[:N] = images.cpu()
    grid = grid.reshape(nrow, ncol, C, H, W).permute(0, 3, 1, 4, 2).reshape(nrow * H, ncol * W, C)
    return grid.numpy()


def to_pil(array: np.ndarray) -> Image.Image:
    """HxWxC uint8 -> PIL image (grayscale for one channel)."""
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
