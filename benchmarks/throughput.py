"""Training throughput, Patch Diffusion vs whole-image EDM, measured side by side in one process.

Patch Diffusion (Wang et al. 2023, Sec. 3) trains on crops of size P in {R/4, R/2, R} drawn with
probabilities (1-p)*2/5, (1-p)*3/5, p and loads R/P times more images for a crop of size P. If the cost
of a step follows its pixels, a step costs 0.7x a full-image step at p = 0.5 while loading 1.9x the
images, so images/s (as the paper counts training length) rises by 1.9 / 0.7 = 2.71x.

Both configurations run the library's real training step (`train_step` + the EMA update) on one shared
backbone, optimiser and EMA (compute does not depend on the weights), with random uint8 crops already cut
and on the device (training cuts them in the loader workers): this measures compute, not decoding. Timed blocks alternate full/patch in an ABBA order so
that a drift in machine load (the machine may be shared) falls on both alike. The last line printed is
`patch/full throughput ratio: X.XX`.

    python benchmarks/throughput.py                       # small DDPM++ for a CPU (a minute or two)
    python benchmarks/throughput.py --paper --device cuda # the paper's 64x64 DDPM++, batch 64 per GPU
    python benchmarks/throughput.py --arch dit            # a small DiT/2 at 64x64 for a CPU
    python benchmarks/throughput.py --arch dit --paper --device cuda  # DiT-B/2 on 32x32x4 latents

A transformer's step costs more than its pixels at full size: attention grows with the square of the
token count, so crops of 1/4 or 1/16 of the tokens save more than their share of pixels, and its
ratio should be above the U-Net's (whose cost is nearly linear in pixels).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from patchdiff.config import PatchConfig, TrainConfig, network_preset
from patchdiff.denoisers import build_denoiser
from patchdiff.patching import PatchSchedule, crop_at, expected_images, resolve_schedule
from patchdiff.training.ema import ema_beta, update_ema
from patchdiff.training.loop import train_step
from patchdiff.training.stream import Crop, crop_offsets

# A small DDPM++ that runs in a minute or two on 2 CPU cores, and the paper's 64x64 preset.
CPU_DEFAULTS = dict(arch="ddpmpp", resolution=64, cbase=32, cres=(1, 2, 2, 2), blocks=1, attn=(16,), batch=8)
PAPER = dict(arch="ddpmpp", resolution=64, cbase=128, cres=(1, 2, 2, 2), blocks=4, attn=(16,), batch=64)
# A small DiT/2 for a CPU (1024 tokens at full size), and DiT-B/2 on ImageNet-256 latents (latent crops).
DIT_CPU = dict(arch="dit", resolution=64, depth=4, width=128, heads=4, dit_patch=2, batch=8, channels=3)
DIT_PAPER = dict(arch="dit", resolution=32, depth=12, width=768, heads=12, dit_patch=2, batch=64, channels=4)
CONFIGS = ("full", "patch")


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s of Patch Diffusion's stochastic crops vs whole-image EDM training, same backbone, "
        "same process, interleaved timing. Defaults: a small DDPM++ for a CPU; --paper: the paper's preset."
    )
    p.add_argument(
        "--paper", action="store_true", help="the paper's 64x64 DDPM++ (cbase 128, blocks 4), batch 64"
    )
    p.add_argument("--resolution", type=int, help="R, the image size (default 64)")
    p.add_argument(
        "--arch", choices=("ddpmpp", "ncsnpp", "adm", "dit", "edm2"), help="backbone (default ddpmpp)"
    )
    p.add_argument("--cbase", type=int, help="base channels (default 32; --paper 128)")
    p.add_argument("--cres", type=int_tuple, help="channel multipliers per level (default 1,2,2,2)")
    p.add_argument("--blocks", type=int, help="residual blocks per level (default 1; --paper 4)")
    p.add_argument("--attn", type=int_tuple, help="attention resolutions (default 16)")
    p.add_argument("--depth", type=int, help="DiT blocks (default 4; --paper 12)")
    p.add_argument("--width", type=int, help="DiT width (default 128; --paper 768)")
    p.add_argument("--heads", type=int, help="DiT heads (default 4; --paper 12)")
    p.add_argument("--dit-patch", type=int, help="DiT token size (default 2)")
    p.add_argument("--batch", type=int, help="full-size images per step (default 8; --paper 64)")
    p.add_argument("--steps", type=int, default=96, help="timed steps per configuration (default 96)")
    p.add_argument("--block", type=int, default=4, help="steps per interleaved timed block (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="extra warm-up steps after one of each crop size")
    p.add_argument("--real-p", type=float, default=0.5, help="probability of a full-size crop (default 0.5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the network")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the crop-size draws")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=8,
        help="then time each crop size alone for this many steps (0: skip)",
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=2,
        help="DataLoader workers of the loader-alone measurement in the profile (default 2, as train)",
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory probe (CPU: two subprocesses)"
    )
    p.add_argument("--memory-probe", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: the CPU probe
    return p


# --------------------------------------------------------------------------- set-up


@dataclass
class Setup:
    """One backbone with its optimiser and EMA, and the schedule of each configuration."""

    dev: torch.device
    cfgs: dict[str, TrainConfig]
    schedules: dict[str, PatchSchedule]
    denoiser: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: dict[tuple[int, tuple[int, int]], Crop]  # (images per step, crop) -> uint8 crops, labels, offsets
    batch: int
    images_seen: int = 0

    def step(self, name: str, index: int) -> tuple[int, int]:
        """One real training step of configuration `name` at crop-size index `index` -> (images, pixels)."""
        cfg, schedule = self.cfgs[name], self.schedules[name]
        n = schedule.images_per_round(self.batch, index)
        crop = schedule.crop_shape(index)
        rounds_data = [self.data[(n, crop)]]
        train_step(
            self.denoiser, self.denoiser, self.optimizer, self.scaler, rounds_data, crop, cfg, self.dev, 1
        )
        self.images_seen += n
        beta = ema_beta(n, self.images_seen, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        update_ema(self.ema, self.denoiser, beta)
        return n, n * crop[0] * crop[1]


def resolve_args(args: argparse.Namespace) -> dict:
    if args.arch == "dit":
        base = DIT_PAPER if args.paper else DIT_CPU
    else:
        base = PAPER if args.paper else CPU_DEFAULTS
    opts = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    for flag in ("resolution", "cbase", "blocks", "batch", "depth", "width", "heads", "dit_patch"):
        if flag in opts and opts[flag] < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {opts[flag]} must be a positive integer")
    for flag in ("steps", "block", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} {value} must be a positive integer")
    for flag in ("warmup", "profile_steps"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be 0 or more")
    if not 0.0 <= args.real_p <= 1.0:
        raise ValueError(f"--real-p {args.real_p} must lie in [0, 1]")
    return opts


def build_setup(args: argparse.Namespace, opts: dict) -> Setup:
    from patchdiff import distributed as dist

    dev = dist.init_from_env(args.device)
    R = opts["resolution"]
    net = network_preset(
        opts["arch"],
        R,
        model_channels=opts.get("cbase"),
        channel_mult=opts.get("cres"),
        num_blocks=opts.get("blocks"),
        attn_resolutions=opts.get("attn"),
        depth=opts.get("depth"),
        width=opts.get("width"),
        heads=opts.get("heads"),
        dit_patch=opts.get("dit_patch"),
        img_channels=opts.get("channels", 3),
    )
    if R % net.min_crop:
        flag = "--dit-patch" if net.arch == "dit" else "--cres"
        raise ValueError(f"--resolution {R} is not a multiple of {net.min_crop}, which {flag} needs")
    latent = net.img_channels == 4  # --arch dit --paper: latent crop sizes R/2, R
    cfgs, schedules = {}, {}
    for name in CONFIGS:
        patch = PatchConfig(
            schedule="full" if name == "full" else "stochastic", real_p=args.real_p, latent=latent
        )
        cfgs[name] = TrainConfig(
            network=net,
            patch=patch,
            image_size=(R, R),
            batch=opts["batch"],
            precision=args.precision,
            seed=args.seed,
        )
        schedules[name] = resolve_schedule(patch, (R, R), net.min_crop)
    torch.manual_seed(args.seed)
    denoiser = build_denoiser(cfgs["full"]).to(dev).train()
    if args.channels_last:
        denoiser = denoiser.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfgs["full"].lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    data = {}
    for name in CONFIGS:
        for i in range(len(schedules[name].sizes)):
            n, crop = schedules[name].images_per_round(opts["batch"], i), schedules[name].crop_shape(i)
            if (n, crop) not in data:  # cut as the loader cuts them: at offsets of (seed, rank, step, round)
                images = torch.randint(0, 256, (n, net.img_channels, R, R), dtype=torch.uint8, device=dev)
                top, left = torch.from_numpy(crop_offsets(args.seed, 0, i, 0, n, (R, R), crop)).unbind(1)
                crops = crop_at(images, top.to(dev), left.to(dev), crop)[0]
                data[(n, crop)] = Crop(crops, torch.zeros(n, dtype=torch.int64, device=dev), top, left)
    return Setup(dev, cfgs, schedules, denoiser, ema, optimizer, scaler, data, opts["batch"])


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def warm_up(setup: Setup, name: str, extra: int, seed: int) -> None:
    """One step of every crop size (kernels, allocator, oneDNN primitives), then `extra` drawn steps."""
    schedule = setup.schedules[name]
    for i in range(len(schedule.sizes)):
        setup.step(name, i)
    for s in range(extra):
        setup.step(name, schedule.draw(seed + 1, s))  # another seed: not the timed draws
    sync(setup.dev)


# --------------------------------------------------------------------------- measurement


@dataclass
class Tally:
    steps: int = 0
    images: int = 0
    pixels: int = 0
    seconds: float = 0.0
    steps_by_size: dict[int, int] = field(default_factory=dict)
    memory: str = "n/a"


def timed_block(setup: Setup, name: str, first_step: int, count: int, seed: int, tally: Tally) -> None:
    """`count` steps, crop sizes drawn as training draws them; device syncs only around the block."""
    schedule = setup.schedules[name]
    indices = [schedule.draw(seed, first_step + s) for s in range(count)]
    sync(setup.dev)
    start = time.perf_counter()
    for i in indices:
        n, px = setup.step(name, i)
        tally.images += n
        tally.pixels += px
    sync(setup.dev)
    tally.seconds += time.perf_counter() - start
    tally.steps += count
    for i in indices:
        size = schedule.sizes[i]
        tally.steps_by_size[size] = tally.steps_by_size.get(size, 0) + 1


def interleaved(setup: Setup, steps: int, block: int, seed: int) -> dict[str, Tally]:
    """Blocks in ABBA order (full patch patch full full patch ...), which cancels a linear drift too."""
    tallies = {name: Tally() for name in CONFIGS}
    done, pair = 0, 0
    while done < steps:
        count = min(block, steps - done)
        order = CONFIGS if pair % 2 == 0 else CONFIGS[::-1]
        for name in order:
            timed_block(setup, name, done, count, seed, tallies[name])
        done += count
        pair += 1
    return tallies


def profile_sizes(setup: Setup, steps: int) -> list[tuple[int, int, float]]:
    """(crop size, images per step, seconds per step) for each of the patch schedule's sizes, alone."""
    schedule = setup.schedules["patch"]
    rows = []
    for i, size in enumerate(schedule.sizes):
        setup.step("patch", i)
        sync(setup.dev)
        start = time.perf_counter()
        for _ in range(steps):
            setup.step("patch", i)
        sync(setup.dev)
        rows.append((size, schedule.images_per_round(setup.batch, i), (time.perf_counter() - start) / steps))
    return rows


def loader_rate(resolution: int, workers: int, batch: int, batches: int = 24) -> float:
    """Images/s of the training data path alone: ImageDataset over random RGB PNGs of the full size, a
    DataLoader with `workers` workers collating uint8 batches, after one pass that fills the caches."""
    import tempfile

    import numpy as np
    from PIL import Image

    from patchdiff.data import ImageDataset

    count = max(256, 2 * batch)
    with tempfile.TemporaryDirectory(prefix="loader-rate-") as tmp:
        rng = np.random.default_rng(0)
        for i in range(count):
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f"{tmp}/{i:05d}.png")
        dataset = ImageDataset(tmp)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0
        )
        batches_iter = iter(loader)
        for _ in range(count // batch + 2):  # every image decoded once per worker: the cached steady state
            next(batches_iter)
        start = time.perf_counter()
        for _ in range(batches):
            next(batches_iter)
        seconds = time.perf_counter() - start
        del batches_iter
    return batches * batch / seconds


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_probe(args: argparse.Namespace, opts: dict) -> int:
    """Run in a fresh process: peak RSS over one step of every crop size of one configuration."""
    base = current_rss_mib()  # after importing torch and patchdiff, before the model exists
    setup = build_setup(args, opts)
    warm_up(setup, args.memory_probe, 0, args.seed)
    print(json.dumps(dict(peak_mib=peak_rss_mib(), base_mib=base)))
    return 0


def cpu_memory(argv: Sequence[str], name: str) -> str:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-probe", name]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe for {name!r} failed:\n{out.stderr.strip()[-2000:]}")
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return f"{probe['peak_mib']:.0f} MiB RSS (+{probe['peak_mib'] - probe['base_mib']:.0f})"


# --------------------------------------------------------------------------- report


def ideal_ratio(schedule: PatchSchedule, batch: int) -> tuple[float, float, float]:
    """(images per step / batch, pixels per step / full step's, ratio) if cost followed pixels."""
    R2 = schedule.image_size[0] * schedule.image_size[1]
    per_size = schedule.images_per_step(batch)
    images = expected_images(schedule, per_size)
    pixels = sum(
        p * n * math.prod(schedule.crop_shape(i))
        for i, (p, n) in enumerate(zip(schedule.probs, per_size, strict=True))
    )
    return images / batch, pixels / (batch * R2), (images / batch) / (pixels / (batch * R2))


def describe(args: argparse.Namespace, opts: dict, setup: Setup) -> str:
    from patchdiff.networks import count_parameters

    threads = f", {torch.get_num_threads()} threads" if setup.dev.type == "cpu" else ""
    name = torch.cuda.get_device_name(setup.dev) if setup.dev.type == "cuda" else "cpu"
    if opts["arch"] == "dit":
        shape = (
            f"dit R={opts['resolution']}x{opts['channels']} depth={opts['depth']} width={opts['width']} "
            f"heads={opts['heads']} p={opts['dit_patch']} ({(opts['resolution'] // opts['dit_patch']) ** 2} tokens)"
        )
    else:
        cres = ",".join(map(str, opts["cres"]))
        attn = ",".join(map(str, opts["attn"]))
        shape = (
            f"{opts['arch']} R={opts['resolution']} cbase={opts['cbase']} cres={cres} blocks={opts['blocks']} "
            f"attn={attn}"
        )
    return (
        f"{shape} ({count_parameters(setup.denoiser.net):,} parameters), batch {opts['batch']}, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}; {name}{threads}; torch {torch.__version__}"
    )


def print_table(tallies: dict[str, Tally], R: int) -> None:
    header = f"{'config':<7}{'steps':>6}{'images':>8}{'images/s':>10}{'steps/s':>9}{'crop px/step':>14}  {'peak memory'}"
    print(header)
    print("-" * len(header))
    for name, t in tallies.items():
        print(
            f"{name:<7}{t.steps:>6}{t.images:>8}{t.images / t.seconds:>10.2f}{t.steps / t.seconds:>9.3f}"
            f"{t.pixels / t.steps:>14.0f}  {t.memory}"
        )
    mix = tallies["patch"].steps_by_size
    print(
        "patch crop mix (steps): "
        + ", ".join(f"{s}x{s}: {mix.get(s, 0)}" for s in sorted(mix))
        + f"; crop px/step counts crop pixels x images ({R}x{R} full)"
    )


def contention_note(threads: int, load: float) -> str | None:
    """A warning when other processes compete for the cores (the 1-minute load average counts our threads too).

    OpenMP threads meet at a barrier after every parallel op; when one is descheduled the others wait
    for it, which adds a roughly fixed time per step and pulls the ratio toward images per step (~1.9)."""
    cores = os.cpu_count() or 1
    others = load - threads
    if threads > 1 and others > 0.5 and threads + others > cores:
        return (
            f"note: load average {load:.1f} on {cores} cores with {threads} torch threads: other processes "
            f"compete for the cores, OpenMP threads stall each other and add a per-step cost; "
            f"rerun with --threads 1 or on an idle machine"
        )
    return None


def print_profile(setup: Setup, args: argparse.Namespace, opts: dict) -> None:
    """--profile-steps: each crop size of the patch schedule timed alone, beside the loader's rate."""
    rows = profile_sizes(setup, args.profile_steps)
    full_size, full_n, full_t = rows[-1]
    # The loader decodes full-size images whatever the crop (it collates only the crops, which costs
    # less): a 16x16 step needs R/16 = 4x as many.
    pixels = setup.cfgs["full"].network.img_channels == 3
    loader = loader_rate(opts["resolution"], args.loader_workers, rows[0][1]) if pixels else math.nan
    print()
    print(
        f"{'crop':>7}{'images':>8}{'ms/step':>10}{'images/s':>10}{'px rate vs full':>17}"
        f"{'loader images/s':>17}{'loader/step':>13}"
    )
    for size, n, t in rows:
        px_rate = (n * size * size / t) / (full_n * full_size * full_size / full_t)
        print(
            f"{f'{size}x{size}':>7}{n:>8}{t * 1e3:>10.1f}{n / t:>10.2f}{px_rate:>17.2f}"
            f"{loader:>17.1f}{loader / (n / t):>13.2f}"
        )
    print(
        f"loader images/s: the data path alone ({args.loader_workers} workers, uint8 {opts['resolution']}px "
        "images, cached); loader/step > 1 means the loader keeps up"
    )
    probs = setup.schedules["patch"].probs
    expected = sum(p * n for p, (_, n, _) in zip(probs, rows, strict=True)) / sum(
        p * t for p, (_, _, t) in zip(probs, rows, strict=True)
    )
    print(f"ratio from per-size times at the schedule's probabilities: {expected / (full_n / full_t):.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    opts = resolve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args, opts)

    setup = build_setup(args, opts)
    print(describe(args, opts, setup))
    memory = {name: "n/a (--no-memory)" if args.no_memory else "n/a" for name in CONFIGS}
    for name in CONFIGS:
        if setup.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(setup.dev)
        warm_up(setup, name, args.warmup, args.seed)
        if setup.dev.type == "cuda":
            memory[name] = f"{torch.cuda.max_memory_allocated(setup.dev) / 2**20:.0f} MiB allocated"
    if setup.dev.type == "cpu" and not args.no_memory:
        memory = {name: cpu_memory(argv, name) for name in CONFIGS}  # a fresh process each: honest peaks

    tallies = interleaved(setup, args.steps, args.block, args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # mostly the timed minute
    for name in CONFIGS:
        tallies[name].memory = memory[name]
    print()
    print_table(tallies, opts["resolution"])
    if setup.dev.type == "cpu" and not args.no_memory:
        print(
            "peak memory: ru_maxrss of a fresh process doing one step of each crop size (+ over its imports)"
        )
    note = contention_note(torch.get_num_threads(), load) if setup.dev.type == "cpu" else None
    if note:
        print(note)
    img_mult, px_mult, ideal = ideal_ratio(setup.schedules["patch"], setup.batch)
    print(
        f"schedule: {img_mult:.2f}x images per step for {px_mult:.2f}x pixels; "
        f"ideal ratio if cost followed pixels {ideal:.2f}"
    )
    full, patch = tallies["full"], tallies["patch"]
    run_img, run_px = (
        (patch.images / patch.steps) / (full.images / full.steps),
        (patch.pixels / patch.steps) / (full.pixels / full.steps),
    )
    print(
        f"this run's crop mix: {run_img:.2f}x images per step for {run_px:.2f}x pixels; "
        f"ideal ratio {run_img / run_px:.2f}"
    )

    if args.profile_steps:
        print_profile(setup, args, opts)

    ratio = (tallies["patch"].images / tallies["patch"].seconds) / (
        tallies["full"].images / tallies["full"].seconds
    )
    print(f"patch/full throughput ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{os.path.basename(__file__)}: error: {e}", file=sys.stderr)
        sys.exit(2)
