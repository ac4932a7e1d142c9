#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on an H100/H200): the paper's 64x64 DDPM++ (cbase 128, 4 blocks,
# attention at 16, batch 64 per GPU) trained by `patchdiff train` in bf16 with --compile, whole images vs
# Patch Diffusion's crops, on random images. Prints per run: images/s, achieved TFLOP/s, MFU against the
# dense bf16 peak, peak memory and the compile time per crop size (from the run's stats.jsonl, first tick
# dropped). Usage from the repository root:  bash benchmarks/gpu_check.sh [OUTDIR]
set -euo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 - "$work/data" <<'PY'
import sys, pathlib, numpy as np
from PIL import Image
d = pathlib.Path(sys.argv[1]); d.mkdir()
rng = np.random.default_rng(0)
for i in range(2048):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
PY
for schedule in full stochastic; do
  timeout 220 python3 -m patchdiff train --data "$work/data" --outdir "$work/$schedule" --arch ddpmpp \
    --cbase 128 --cres 1,2,2,2 --blocks 4 --attn 16 --batch 64 --patch-schedule "$schedule" \
    --precision bf16 --compile --device cuda --workers 8 --duration 60 --tick 10 --snap 1000 --grid 0 \
    --no-progress 2>&1 | tail -4 | tee "$out/train-$schedule.txt" || echo "$schedule: run failed or timed out"
done
python3 - "$work" <<'PY' | tee "$out/summary.txt"
import json, sys, pathlib
for schedule in ("full", "stochastic"):
    stats = sorted(pathlib.Path(sys.argv[1], schedule).glob("*/stats.jsonl"))
    ticks = [r for r in map(json.loads, stats[0].read_text().splitlines()) if r["kind"] == "tick"] if stats else []
    if len(ticks) < 2:
        print(f"{schedule}: too few ticks ({len(ticks)})"); continue
    t, k = ticks[-1]["time_s"] - ticks[0]["time_s"], ticks[-1]["kimg"] - ticks[0]["kimg"]
    steady = ticks[1:]
    tf = sum(r["tflops"] for r in steady) / len(steady)
    mfu = sum(r.get("mfu", float("nan")) for r in steady) / len(steady)
    print(f"{schedule}: {1000 * k / t:.0f} images/s, {tf:.1f} TFLOP/s, MFU {mfu:.1%}, "
          f"peak {max(r['mem_gb'] for r in ticks):.1f} GB, compile s {ticks[-1].get('compile_s')}")
PY
