"""Achieved training compute: counted FLOPs per crop size, TFLOP/s per tick, and MFU on known GPUs.

The FLOPs of one step's forward + backward per image are counted once per crop size at start-up
(`patchdiff.flops.step_flops_per_image`, torch.utils.flop_counter), so the hot loop only adds host
floats. MFU divides the achieved rate by the dense bf16 peak of the device (a small table by name;
unknown devices and CPUs get none).
"""

from __future__ import annotations

import copy

import torch

from patchdiff.flops import step_flops_per_image
from patchdiff.patching import PatchSchedule

# Dense bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name (first match).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("L4", 121.0),
)


def peak_for_name(name: str) -> float | None:
    """Dense bf16 peak in TFLOP/s of a GPU by its name, or None when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None (CPU, or a GPU not in the table)."""
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def flops_by_crop(denoiser, schedule: PatchSchedule, channels: int) -> dict[int, float]:
    """Counted FLOPs per training image at each crop size of the schedule.

    Counted on the host (a copy of a GPU model), outside the training RNG stream (fork_rng), leaving
    no gradients: a run trains bit-identically with or without this count."""
    on_cpu = next(denoiser.parameters()).device.type == "cpu"
    net = denoiser if on_cpu else copy.deepcopy(denoiser).cpu()
    with torch.random.fork_rng(devices=[]):
        return {
            size: step_flops_per_image(net, channels, schedule.crop_shape(i))
            for i, size in enumerate(schedule.sizes)
        }


def achieved(flops: float, seconds: float, device: torch.device, world: int) -> dict[str, float]:
    """{'tflops': achieved TFLOP/s of the whole job} plus 'mfu' (per device, 0..1) where the peak is known."""
    tflops = flops / max(seconds, 1e-9) / 1e12
    out = dict(tflops=tflops)
    peak = peak_tflops(device)
    if peak:
        out["mfu"] = tflops / (peak * world)
    return out
