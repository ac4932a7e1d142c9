"""Sampling cost and quality: the default sampler against EDM's 18-step Heun, side by side in one run.

Every configuration `sampler:steps` samples the same seeds with the same model. Time is measured on one
fixed batch, in rounds that visit the configurations forward, then backward (ABBA...), so that a drift
in machine load falls on all alike. On a CPU the time is the process's CPU time (`time.process_time`),
which other processes on a shared machine do not inflate; on a GPU it is wall time between syncs.
With `--fid`, every configuration also generates `--num` images (seeds 0..num-1) and is scored with
FID and KID against `--ref`. The last line printed is `sampling time ratio (default/heun-18): X`.

    python benchmarks/sampling.py                      # a fresh tiny model: the time ratio only
    python benchmarks/sampling.py --model RUN --fid --ref REF.npz --num 1000 \\
        --configs heun:18,dpmpp-2m:13,dpmpp-2m:10 --json results.jsonl --plot fid.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from patchdiff.config import TrainConfig, network_preset
from patchdiff.denoisers import build_denoiser
from patchdiff.files import atomic_write
from patchdiff.generation import Model, iter_images, load
from patchdiff.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, NETWORK_CALLS, resolve_sampler

BASELINE = ("heun", 18)


@dataclass
class Row:
    sampler: str
    steps: int
    calls: int
    seconds: float = 0.0  # per timed batch, averaged over rounds
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None

    @property
    def name(self) -> str:
        return f"{self.sampler}-{self.steps}"


def parse_configs(text: str) -> list[tuple[str, int]]:
    """'heun:18,dpmpp-2m:13' -> [('heun', 18), ('dpmpp-2m', 13)]; a bare name takes its default steps."""
    configs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, steps = part.partition(":")
        try:
            configs.append(resolve_sampler(name, int(steps) if steps else None))
        except ValueError as error:
            raise ValueError(
                f"--configs {part!r}: {error} (expected sampler:steps, e.g. dpmpp-2m:13)"
            ) from None
    return configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="run directory or snapshot (default: a freshly initialised tiny model)")
    p.add_argument("--configs", default="", help="more sampler:steps rows, e.g. euler:18,dpmpp-2m:10")
    p.add_argument("--batch", type=int, default=16, help="images in the timed batch (and per FID batch)")
    p.add_argument("--rounds", type=int, default=4, help="timing rounds; each times every configuration once")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--fid", action="store_true", help="also score every configuration (needs --ref)")
    p.add_argument("--ref", help="reference statistics .npz from `patchdiff fid ref` (with features for KID)")
    p.add_argument("--detector", help="TorchScript detector (default: as `patchdiff fid` finds it)")
    p.add_argument("--num", type=int, default=1000, help="images per configuration for FID/KID")
    p.add_argument("--json", help="append one JSON line per configuration here as it finishes")
    p.add_argument("--plot", help="with --fid: write a PNG of FID against network calls here")
    return p


def tiny_model(device: torch.device) -> Model:
    """A ~30k-parameter DDPM++ at 16x16 with seeded random weights: costs like a network, looks like noise."""
    net = network_preset(
        "ddpmpp", 16, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,)
    )
    cfg = TrainConfig(network=net)
    torch.manual_seed(0)
    return Model(build_denoiser(cfg).to(device).eval().requires_grad_(False), cfg, device)


def sample_batch(model: Model, sampler: str, steps: int, seeds: Sequence[int]) -> torch.Tensor:
    (_, images), *_ = iter_images(model, seeds, batch_size=len(seeds), num_steps=steps, sampler=sampler)
    return images


def timed(model: Model, row: Row, seeds: Sequence[int]) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        sample_batch(model, row.sampler, row.steps, seeds)
        torch.cuda.synchronize(model.device)
        return time.perf_counter() - start
    start = time.process_time()
    sample_batch(model, row.sampler, row.steps, seeds)
    return time.process_time() - start


def time_rows(model: Model, rows: list[Row], batch: int, rounds: int) -> None:
    seeds = list(range(batch))
    for row in rows:  # warm-up: kernels, allocator, oneDNN primitives
        sample_batch(model, row.sampler, 1, seeds)
    for r in range(rounds):
        for row in rows if r % 2 == 0 else rows[::-1]:
            row.seconds += timed(model, row, seeds) / rounds


def score_rows(model: Model, rows: list[Row], args: argparse.Namespace) -> None:
    from patchdiff.metrics.detector import load_detector
    from patchdiff.metrics.features import generated_features
    from patchdiff.metrics.fid import load_reference, score_features

    ref = load_reference(args.ref)
    names = ("fid", "kid") if ref.features is not None else ("fid",)
    detector = load_detector(args.detector, model.device)
    for row in rows:
        features = generated_features(
            model, detector, range(args.num), args.batch, row.steps, sampler=row.sampler
        )
        scores = score_features(names, features, ref)
        row.fid, row.kid, row.kid_std = scores["fid"], scores.get("kid"), scores.get("kid_std")
        print(f"scored {row.name}: fid {row.fid:.3f}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**asdict(row), "num": args.num}) + "\n")


def print_table(rows: list[Row], unit: str) -> None:
    base = rows[0]
    print(f"{'sampler':<10}{'steps':>6}{'calls':>6}{unit:>12}{'vs heun-18':>11}{'FID':>9}{'KID x1e3':>16}")
    for row in rows:
        fid = f"{row.fid:9.3f}" if row.fid is not None else f"{'-':>9}"
        kid = f"{row.kid * 1e3:8.3f} ± {row.kid_std * 1e3:5.3f}" if row.kid is not None else f"{'-':>16}"
        print(
            f"{row.sampler:<10}{row.steps:>6}{row.calls:>6}{row.seconds:>12.3f}"
            f"{row.seconds / base.seconds:>11.2f}{fid}{kid}"
        )


def plot_rows(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for sampler in dict.fromkeys(r.sampler for r in rows):
        mine = sorted((r.calls, r.fid) for r in rows if r.sampler == sampler and r.fid is not None)
        ax.plot(*zip(*mine, strict=True), marker="o", label=sampler)
    ax.set_xlabel("network calls per image")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        raise ValueError(f"--batch {args.batch} and --rounds {args.rounds} must be >= 1")
    if args.fid and not args.ref:
        raise ValueError(
            "--fid needs --ref REF.npz (make one with `patchdiff fid ref --data ... --dest ...`)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load(args.model, device) if args.model else tiny_model(device)
    default = (DEFAULT_SAMPLER, DEFAULT_STEPS[DEFAULT_SAMPLER])
    configs = list(dict.fromkeys([BASELINE, default, *parse_configs(args.configs)]))
    rows = [Row(name, steps, NETWORK_CALLS[name](steps)) for name, steps in configs]
    params = sum(p.numel() for p in model.denoiser.parameters())
    H, W = model.image_size
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"model {args.model or 'tiny (random weights)'}: {params:,} parameters, {H}x{W}; {device}{threads}")
    time_rows(model, rows, args.batch, args.rounds)
    if args.fid:
        score_rows(model, rows, args)
    unit = "cpu s/batch" if device.type == "cpu" else "s/batch"
    print(f"timed batch: {args.batch} images, {args.rounds} rounds")
    print_table(rows, unit)
    if args.plot and args.fid:
        plot_rows(rows, args.plot)
    base, new = rows[0], rows[configs.index(default)]
    if args.fid:
        print(f"FID (default/heun-18): {new.fid:.3f} / {base.fid:.3f} ({new.fid / base.fid - 1:+.1%})")
    print(f"sampling time ratio (default/heun-18): {new.seconds / base.seconds:.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{os.path.basename(__file__)}: error: {e}", file=sys.stderr)
        sys.exit(2)
