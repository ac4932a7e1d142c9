"""The training loop: Patch Diffusion on top of EDM, one process or many under torchrun.

Each step: draw the step's crop size (the same on every process), load `batch_gpu * R/P` images per
process and accumulation round, each cut at a random place by the loader workers (training/stream.py),
add the crops' coordinates on the device, take the EDM loss, average gradients (DDP), scrub non-finite
values, step Adam, update the EMA. Ticks log; snapshots write the EMA weights, a sample grid and the
resumable training state.

This module holds the step (`train_step`) and the entry point (`train`); set-up and resuming live in
setup.py, the run itself (step loop, ticks, snapshots, checkpoints, stop signals) in run.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from patchdiff import distributed as dist
from patchdiff.config import TrainConfig, to_json
from patchdiff.denoisers import build_denoiser
from patchdiff.latent import prepare_batch
from patchdiff.loss import edm_loss
from patchdiff.networks import count_parameters
from patchdiff.networks.edm2 import renormalize_weights_
from patchdiff.patching import crop_coords, loss_mask
from patchdiff.training.run import Run
from patchdiff.training.setup import prepare
from patchdiff.training.signals import StopRequests

__all__ = ["train", "train_step"]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_step(
    ddp,
    denoiser,
    optimizer,
    scaler,
    rounds_data,
    crop: tuple[int, int],
    cfg: TrainConfig,
    dev: torch.device,
    rounds: int,
    band: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, int]:
    """One optimiser step over `rounds` accumulation rounds of `stream.Crop` batches: crops already cut at
    size `crop` (uint8 pixels, or float16 latent mean and std), labels, each crop's offset in its image.

    band: the noise-level quantiles of this crop size (--noise-bands), or None for all of them.
    Returns the step's mean loss (a device tensor: no host sync) and the images per round."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum, n = torch.zeros((), device=dev), 0
    # Gradients are averaged across processes only in the last round; one process has nothing to skip
    # (`ddp` may then be the compiled denoiser, which has no no_sync).
    wrapped = getattr(ddp, "_orig_mod", ddp)  # torch.compile's wrapper around the model (or DDP)
    ddp_model = wrapped if isinstance(wrapped, DistributedDataParallel) else None
    for r, batch in enumerate(rounds_data):
        data, labels, top, left = batch[:4]
        augment = batch[4] if len(batch) > 4 and batch[4] is not None and batch[4].numel() else None
        n = data.shape[0]
        if tuple(data.shape[-2:]) != tuple(crop):
            raise ValueError(f"a round of {tuple(data.shape[-2:])} crops in a step of {tuple(crop)} crops")
        y = prepare_batch(data, dev, cfg)  # pixels to [-1, 1], or a fresh latent sample of the crops
        # The coordinates follow from the offsets and the full image's size: nothing else crosses over.
        coords = crop_coords(top, left, crop, cfg.image_size, dev) if cfg.patch.coords else None
        # --crop-margin: the window's context pixels inside the image are seen, not scored.
        whole = tuple(crop) == tuple(cfg.image_size)
        mask = (
            None
            if whole or not cfg.patch.margin
            else loss_mask(top, left, crop, cfg.image_size, cfg.patch.margin, dev)
        )
        label_dim = cfg.network.label_dim
        # One-hot on the host: on CUDA, one_hot would check the label range with a device sync.
        onehot = F.one_hot(labels, label_dim).float().to(dev, non_blocking=True) if label_dim else None
        sync = ddp_model.no_sync() if ddp_model is not None and r < rounds - 1 else contextlib.nullcontext()
        with sync:
            with autocast(dev, cfg.precision):
                loss = edm_loss(
                    ddp,
                    y,
                    coords,
                    onehot,
                    cfg.loss,
                    full_hw=cfg.image_size,
                    band=band,
                    augment_labels=None if augment is None else augment.to(dev, non_blocking=True),
                    mask=mask,
                )
            scaler.scale(loss / rounds).backward()
        loss_sum += loss.detach() / rounds
    # A non-finite loss leaves NaNs in the gradients: scrub them so one bad batch cannot poison the
    # weights; the caller stops the run if it keeps happening (checked at ticks, no per-step sync).
    scaler.unscale_(optimizer)
    for p in denoiser.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if cfg.network.arch == "edm2" or cfg.loss.weighting == "learned":  # forced weight normalisation (EDM2)
        renormalize_weights_(denoiser)
    return loss_sum, n


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    progress: bool = True,
    device: str | None = None,
    dry_run: bool = False,
    grid: int = 64,
    overrides=None,
    compile: bool = False,
    replan: bool = False,
) -> Path | None:
    """Train as configured; returns the run directory (None for a dry run).

    resume: a state file, a run directory, or "auto" (the newest run under cfg.outdir, or a fresh run
    when there is none). A resumed run keeps its saved config except for the field paths in `overrides`
    (the CLI passes the flags given on its command line; None means RUN_CONTROL). compile: torch.compile
    the network, one static graph per crop size. replan: a resumed progressive run moves the phase
    boundaries it has not reached to where its (new) duration puts them."""
    dev = dist.init_from_env(device)
    if cfg.precision == "fp32":  # fp32 means fp32: no TF32 matmuls or convolutions (as EDM does)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    setup = prepare(cfg, resume, dist.world_size(), overrides, lock=not dry_run, replan=replan)
    if dry_run:
        if dist.is_main():
            cfg, schedule, plan = setup.cfg, setup.schedule, setup.plan
            torch.manual_seed(cfg.seed)
            if setup.state_path:
                print(f"resuming {setup.state_path} at step {setup.counters['step']}; the effective config:")
            for change in setup.changes:
                print(f"resume: {change} (from the command line)")
            for note in setup.notes:
                print(f"resume: {note}")
            print(to_json(cfg))
            print(f"parameters: {count_parameters(build_denoiser(cfg, pretrained=False).net):,}")
            print(
                f"crop sizes {schedule.sizes} p={tuple(round(p, 3) for p in schedule.probs)}, images/step "
                f"{plan.images_per_step}, expected {plan.expected_images:.1f}, {plan.total_steps} steps"
                + (f", whole images from step {plan.finish_step}" if plan.finish_step is not None else "")
            )
        return None
    with StopRequests() as stop:
        try:
            run = Run(setup, dev, progress, grid, stop, train_step, compile=compile)
        except BaseException:
            if setup.lock:
                setup.lock.release()
            raise
        try:
            run.loop()
        finally:
            run.close()
    return run.run_dir
