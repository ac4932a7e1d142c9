"""Training speed of this tree against another commit: steady-state s/kimg, interleaved runs.

Each side is the real `patchdiff train` command run in a subprocess with PYTHONPATH pointing at that
side's sources (the other commit is checked out with `git worktree add` into a temporary folder). Runs
alternate in ABBA order, so a drift in machine load falls on both sides alike. Steady state: the first
tick of every run (start-up, first steps of each crop size) is dropped; s/kimg is the remaining time over
the remaining kimg, and each side's value is the median over its runs. Peak memory is the run's
`mem_gb` (ru_maxrss on CPU). The last line printed is `train s/kimg ratio vs <commit>: X`.

The default configuration is issue 9's: CPU, fp32, 64x64 DDPM++ with cbase 32, 2 blocks, attention at
16, batch 8, the paper's stochastic crop schedule (real_p 0.5), 2 threads.

    python benchmarks/speed_vs_commit.py                    # against 07547af
    python benchmarks/speed_vs_commit.py 07547af --pairs 3 --kimg 1.6 --tick 0.4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The issue's configuration; flags that both sides' CLIs know.
TRAIN_FLAGS = [
    *("--arch", "ddpmpp", "--cbase", "32", "--cres", "1,2,2,2", "--blocks", "2", "--attn", "16"),
    *("--batch", "8", "--precision", "fp32", "--patch-schedule", "stochastic", "--real-p", "0.5"),
    *("--device", "cpu", "--grid", "0", "--snap", "1000", "--no-progress"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Steady-state train s/kimg of this tree vs a git commit.")
    p.add_argument(
        "commit", nargs="?", default="07547af", help="the commit to compare with (default 07547af)"
    )
    p.add_argument("--pairs", type=int, default=2, help="ABBA pairs of runs per side (default 2)")
    p.add_argument("--kimg", type=float, default=1.2, help="training length of each run in kimg")
    p.add_argument("--tick", type=float, default=0.3, help="tick length in kimg (the first is dropped)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (default 2)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of each run (default 1)")
    p.add_argument("--images", type=int, default=256, help="random 64x64 training images (default 256)")
    p.add_argument("--extra", default="", help="extra train flags for this tree only, e.g. '--compile'")
    return p


def make_dataset(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def run_side(src: Path, data: Path, outdir: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One training run of the tree whose sources are `src`; its steady-state s/kimg and peak memory."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "patchdiff", "train", "--data", str(data), "--outdir", str(outdir)]
    cmd += [*TRAIN_FLAGS, "--duration", str(args.kimg), "--tick", str(args.tick)]
    cmd += ["--workers", str(args.workers), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: training with {src} failed:\n{done.stderr[-2000:]}")
    stats = next(outdir.glob("*/stats.jsonl"))
    ticks = [r for r in map(json.loads, stats.read_text().splitlines()) if r.get("kind") == "tick"]
    if len(ticks) < 2:
        raise SystemExit(f"error: {stats} has {len(ticks)} ticks; raise --kimg or lower --tick")
    steady = ticks[1:]
    seconds = steady[-1]["time_s"] - ticks[0]["time_s"]
    kimg = steady[-1]["kimg"] - ticks[0]["kimg"]
    return dict(s_per_kimg=seconds / kimg, mem_gb=max(r["mem_gb"] for r in ticks))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="speed-vs-commit-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.commit],
            check=True,
            capture_output=True,
        )
        try:
            make_dataset(tmp / "data", args.images)
            sides = {"this tree": (ROOT / "src", args.extra.split()), args.commit: (base / "src", [])}
            results: dict[str, list[dict]] = {name: [] for name in sides}
            order = [n for _ in range(args.pairs) for n in (list(sides), list(sides)[::-1])[_ % 2]]
            for i, name in enumerate(order):
                src, extra = sides[name]
                r = run_side(src, tmp / "data", tmp / f"out{i}", args, extra)
                results[name].append(r)
                print(
                    f"run {i + 1}/{len(order)} {name}: {r['s_per_kimg']:.2f} s/kimg, {r['mem_gb']:.2f} GB peak",
                    flush=True,
                )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    ours = statistics.median(r["s_per_kimg"] for r in results["this tree"])
    theirs = statistics.median(r["s_per_kimg"] for r in results[args.commit])
    mem = {n: max(r["mem_gb"] for r in rs) for n, rs in results.items()}
    print(
        f"this tree: {ours:.2f} s/kimg, peak {mem['this tree']:.2f} GB; "
        f"{args.commit}: {theirs:.2f} s/kimg, peak {mem[args.commit]:.2f} GB"
    )
    print(f"train s/kimg ratio vs {args.commit}: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
