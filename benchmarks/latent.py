"""Latent Patch Diffusion: a training step on cached latents vs one that encodes its images first.

The published code runs every batch through the VAE encoder on every step; patchdiff encodes each image
once (`patchdiff dataset --vae`) and stores the posterior's mean and std, so a step only draws
z = mean + std * eps. Both variants here run the library's real step (`train_step`, the stochastic latent
crops {R/2, R} with R/P images per crop, and the EMA update) on one shared small ADM on 32x32x4 latents;
"on-the-fly" first encodes the step's uint8 256x256 images with a VAE of Stable Diffusion's architecture
(AutoencoderKL with its config: 4 down blocks of 128, 256, 512, 512 channels, 2 layers each, 4 latent
channels; random weights, which cost the same as trained ones). Timed blocks alternate in ABBA order, both
over the same crop sizes, so a change in machine load hits both alike. The last line printed is
`cached/on-the-fly step time ratio: X`.

    python benchmarks/latent.py                     # CPU: batch 2, 2 steps per block (1-3 minutes)
    python benchmarks/latent.py --device cuda --batch 32 --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from patchdiff.config import LatentConfig, PatchConfig, TrainConfig, network_preset
from patchdiff.denoisers import build_denoiser
from patchdiff.latent import VAE, import_autoencoder
from patchdiff.networks import count_parameters
from patchdiff.patching import resolve_schedule
from patchdiff.training.ema import update_ema
from patchdiff.training.loop import train_step
from patchdiff.training.stream import Crop, crop_offsets, cut

# Stable Diffusion's VAE (the config of stabilityai/sd-vae-ft-ema), built here with random weights.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=2, help="full-size latents per step (x2 at half-size crops)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds (each: 2 blocks per variant)")
    p.add_argument("--pixels", type=int, default=256, help="image size (latents are 1/8 of it)")
    p.add_argument("--cbase", type=int, default=64, help="ADM base channels")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    return p


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    vae = VAE(import_autoencoder()(**SD_VAE).to(dev).eval().requires_grad_(False), "SD architecture", dev)
    R = args.pixels // vae.factor
    net = network_preset(
        "adm", R, img_channels=4, model_channels=args.cbase, channel_mult=(1, 2, 2), num_blocks=1,
        attn_resolutions=(R // 2,), dropout=0.1,
    )  # fmt: skip
    C = vae.latent_channels
    cfg = TrainConfig(
        network=net,
        patch=PatchConfig(schedule="stochastic", latent=True),
        image_size=(R, R),
        latent=LatentConfig(vae="benchmark", shift=(0.0,) * C, scale=(vae.scaling_factor,) * C),
    )
    schedule = resolve_schedule(cfg.patch, (R, R), net.min_crop)
    denoiser = build_denoiser(cfg).to(dev)
    ema = build_denoiser(cfg).to(dev).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)

    most = max(schedule.images_per_round(args.batch, i) for i in range(len(schedule.sizes)))
    images = torch.randint(0, 256, (most, 3, args.pixels, args.pixels), dtype=torch.uint8, device=dev)
    labels = torch.zeros(most, dtype=torch.long)
    mean, std = vae.encode(images)  # the cached variant's data set, encoded once up front
    cached = torch.stack([mean, std], dim=1).to(torch.float16).to(dev)
    vae_params = sum(p.numel() for p in vae.model.encoder.parameters())
    print(
        f"VAE encoder {vae_params / 1e6:.1f}M parameters, {args.pixels}px -> {C}x{R}x{R}; ADM "
        f"{count_parameters(denoiser.net) / 1e6:.2f}M parameters; crops {schedule.sizes} p={schedule.probs}; "
        f"batch {args.batch} on {dev}, {torch.get_num_threads()} threads"
    )

    def step(variant: str, index: int) -> None:
        n, crop = schedule.images_per_round(args.batch, index), schedule.crop_shape(index)
        if variant == "cached":
            data = cached[:n]
        else:  # the published approach: encode this step's images, then the same step
            m, s = vae.encode(images[:n])
            data = torch.stack([m, s], dim=1).to(torch.float16).to(dev)
        # Mean and std cut at one place per latent, as the loader workers cut them in training.
        offsets = crop_offsets(args.seed, 0, index, 0, n, (R, R), crop).tolist()
        crops = torch.stack([cut(d, top, left, crop) for d, (top, left) in zip(data, offsets, strict=True)])
        top, left = torch.tensor(offsets).unbind(1)
        train_step(
            denoiser, denoiser, optimizer, scaler, [Crop(crops, labels[:n], top, left)], crop, cfg, dev, 1
        )
        update_ema(ema, denoiser, 0.999)

    # The crop sizes in turn (the default latent schedule draws R/2 and R with p = 0.5 each), the same
    # sequence in every block. Warm-up: the network at every crop size; the encoder ran on the most images.
    draws = [i % len(schedule.sizes) for i in range(args.steps)]
    for i in range(len(schedule.sizes)):
        step("cached", i)
    times: dict[str, list[float]] = {"cached": [], "on-the-fly": []}
    order = [v for _ in range(args.rounds) for v in ("cached", "on-the-fly", "on-the-fly", "cached")]
    for block, variant in enumerate(order):
        torch.manual_seed(args.seed + block)
        sync(dev)
        start = time.perf_counter()
        for index in draws:
            step(variant, index)
        sync(dev)
        times[variant].append((time.perf_counter() - start) / len(draws))
    for variant, values in times.items():
        print(
            f"{variant:>10}: {np.mean(values) * 1000:9.1f} ms/step (blocks: {', '.join(f'{v:.3f}' for v in values)} s)"
        )
    ratio = np.mean(times["cached"]) / np.mean(times["on-the-fly"])
    print(f"cached/on-the-fly step time ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
