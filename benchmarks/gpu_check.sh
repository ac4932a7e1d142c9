#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes on an H100/H200): the paper's 64x64 DDPM++ throughput,
# patch vs full, in bf16 and fp32, then the demo trained on CUDA in fp32 as a smoke test.
# Usage from the repository root on a CUDA machine with PyTorch:  bash benchmarks/gpu_check.sh [OUTDIR]
# Everything printed is also written to OUTDIR (default: gpu-check/); record it in docs/benchmarks.md.
set -euo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 benchmarks/throughput.py --paper --device cuda --precision bf16 --steps 200 2>&1 | tee "$out/throughput-bf16.txt"
python3 benchmarks/throughput.py --paper --device cuda --precision fp32 --steps 100 2>&1 | tee "$out/throughput-fp32.txt"
timeout 300 python3 -m patchdiff demo --outdir /tmp/gpu-demo --no-progress 2>&1 | tail -5 | tee "$out/demo.txt"
cp /tmp/gpu-demo/samples.png /tmp/gpu-demo/loss.png "$out/" 2>/dev/null || true
