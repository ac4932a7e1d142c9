"""The training loop: Patch Diffusion on top of EDM, one process or many under torchrun.

Each step: draw the step's crop size (the same on every process), load `batch_gpu * R/P` images per
process and accumulation round, crop each at a random place with its coordinates, take the EDM loss,
average gradients (DDP), scrub non-finite values, step Adam, update the EMA. Ticks log; snapshots
write the EMA weights, a sample grid and the resumable training state.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from patchdiff import distributed as dist
from patchdiff.config import TrainConfig, from_json, to_json
from patchdiff.data import ImageDataset
from patchdiff.generation import Model, build_denoiser, generate, image_grid, to_pil
from patchdiff.loss import edm_loss
from patchdiff.networks import count_parameters
from patchdiff.patching import PatchSchedule, random_patches, resolve_schedule
from patchdiff.training.checkpoint import (
    STATE_NAME,
    atomic_write,
    find_resume_state,
    load_state,
    save_snapshot,
    save_state,
)
from patchdiff.training.ema import ema_beta, update_ema
from patchdiff.training.stream import StepPlan, StreamSampler, step_seed


class NonFiniteLossError(RuntimeError):
    pass


# Settings a resumed run takes from the command line; everything else comes from its saved config.
RUN_CONTROL = (
    "data",  # the same images may have moved
    "duration_kimg",
    "tick_kimg",
    "snap_ticks",
    "workers",
    "cache",
    "metrics",
    "metric_num",
    "detector",
    "metric_ref",
    "max_bad_steps",
)


def resolve(cfg: TrainConfig, dataset: ImageDataset) -> TrainConfig:
    """Fill in what the data set decides: image size, channels, classes; check the batch split."""
    H, W = dataset.resolution
    if cfg.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs class labels, but {cfg.data} has no dataset.json labels")
    net = dataclasses.replace(
        cfg.network,
        resolution=min(H, W),
        img_channels=dataset.num_channels,
        coord_channels=2 if cfg.patch.coords else 0,
        label_dim=dataset.num_classes if cfg.cond else 0,
    )
    for name, value in (("H", H), ("W", W)):
        if value % net.min_crop:
            raise ValueError(
                f"image {name}={value} of {cfg.data} is not a multiple of {net.min_crop}, which "
                f"--cres {','.join(map(str, net.channel_mult))} needs; convert with `patchdiff dataset --resolution`"
            )
    return dataclasses.replace(cfg, network=net, image_size=(H, W))


def batch_split(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(batch_gpu, accumulation rounds) with batch = batch_gpu * rounds * world."""
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    if batch_gpu < 1 or cfg.batch % (batch_gpu * world):
        raise ValueError(
            f"--batch {cfg.batch} must be a multiple of --batch-gpu {batch_gpu} x {world} processes"
        )
    return batch_gpu, cfg.batch // (batch_gpu * world)


def make_plan(cfg: TrainConfig, schedule: PatchSchedule, batch_gpu: int, rounds: int, world: int) -> StepPlan:
    per_step = tuple(
        schedule.images_per_round(batch_gpu, i) * rounds * world for i in range(len(schedule.sizes))
    )
    return StepPlan(schedule, cfg.seed, per_step, cfg.duration_kimg * 1000)


def new_run_dir(cfg: TrainConfig) -> Path:
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ids = [
        int(p.name.split("-")[0]) for p in outdir.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()
    ]
    name = Path(cfg.data.rstrip("/")).stem or "data"
    run_dir = outdir / f"{max(ids, default=-1) + 1:05d}-{name}-{cfg.network.arch}-{cfg.patch.schedule}"
    run_dir.mkdir()
    return run_dir


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_grid(model: Model, path: Path, num: int, num_steps: int = 18) -> None:
    images = generate(model, range(num), batch_size=min(num, 64), num_steps=num_steps)
    atomic_write(path, lambda tmp: to_pil(image_grid(images)).save(tmp, format="PNG"))


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
) -> tuple[torch.Tensor, int]:
    """One optimiser step over `rounds` accumulation rounds of (uint8 images, labels) at crop size `crop`.

    Returns the step's mean loss (a device tensor: no host sync) and the images per round."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum, n = torch.zeros((), device=dev), 0
    for r, (images, labels) in enumerate(rounds_data):
        n = images.shape[0]
        y = images.to(dev, non_blocking=True).to(torch.float32) / 127.5 - 1
        y, coords = random_patches(y, crop)
        label_dim = cfg.network.label_dim
        # One-hot on the host: on CUDA, one_hot would check the label range with a device sync.
        onehot = F.one_hot(labels, label_dim).float().to(dev, non_blocking=True) if label_dim else None
        sync = ddp.no_sync() if ddp is not denoiser and r < rounds - 1 else contextlib.nullcontext()
        with sync:
            with autocast(dev, cfg.precision):
                loss = edm_loss(
                    ddp, y, coords if cfg.patch.coords else None, onehot, cfg.loss, full_hw=cfg.image_size
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
    return loss_sum, n


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    progress: bool = True,
    device: str | None = None,
    dry_run: bool = False,
    grid: int = 64,
) -> Path | None:
    """Train as configured; returns the run directory (None for a dry run)."""
    dev = dist.init_from_env(device)
    rank, world = dist.rank(), dist.world_size()
    state_path = find_resume_state(resume, cfg.outdir) if resume else None
    state = load_state(state_path) if state_path else None
    if state is not None:  # a resumed run keeps what defines its training; run control may change
        saved = from_json(TrainConfig, state["config"])
        cfg = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in RUN_CONTROL})
    dataset = ImageDataset(cfg.data, xflip=cfg.xflip, cache=cfg.cache)
    cfg = resolve(cfg, dataset)
    schedule = resolve_schedule(cfg.patch, tuple(cfg.image_size), cfg.network.min_crop)
    batch_gpu, rounds = batch_split(cfg, world)
    if cfg.metrics:
        from patchdiff.metrics import parse_metric_names

        parse_metric_names(cfg.metrics)  # fail before training, not at the first snapshot
    plan = make_plan(cfg, schedule, batch_gpu, rounds, world)

    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    denoiser = build_denoiser(cfg).to(dev)
    if dry_run:
        if dist.is_main():
            print(to_json(cfg))
            print(f"parameters: {count_parameters(denoiser.net):,}")
            print(
                f"crop sizes {schedule.sizes} p={tuple(round(p, 3) for p in schedule.probs)}, images/step "
                f"{plan.images_per_step}, expected {plan.expected_images:.1f}, {plan.total_steps} steps"
            )
        return None

    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    counters = dict(step=0, position=0, images=0, time_s=0.0, crops={}, steps_by_size={})
    if state is not None:
        denoiser.load_state_dict(state["denoiser"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        counters = json.loads(state["counters"])
        run_dir = state_path.parent  # the run continues in place, wherever it was moved to
    else:
        run_dir = new_run_dir(cfg) if dist.is_main() else None
    run_dir = Path(dist.broadcast_object(str(run_dir)))
    main = dist.is_main()
    log_file = open(run_dir / "log.txt", "a") if main else None  # noqa: SIM115 (kept open for the run)

    def log(msg: str) -> None:
        if main:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    if main:
        atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(to_json(cfg)))
    log(
        f"{'resuming' if state else 'starting'} {run_dir} at step {counters['step']} on {world} x {dev}; "
        f"{count_parameters(denoiser.net):,} parameters; crop sizes {schedule.sizes}; "
        f"{plan.total_steps} steps of {plan.expected_images:.1f} images (expected)"
    )

    ddp = denoiser
    if world > 1:
        ddp = DistributedDataParallel(
            denoiser, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False
        )
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    sampler = StreamSampler(
        len(dataset), plan, batch_gpu, rounds, rank, world, counters["step"], counters["position"]
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    batches = iter(loader)
    stats_path = run_dir / "stats.jsonl"
    model = Model(ema, cfg, dev)
    step = counters["step"]
    tick_kimg = cfg.tick_kimg
    next_tick = (math.floor(plan.nimg(step) / 1000 / tick_kimg) + 1) * tick_kimg
    ticks_done = 0
    loss_sum = torch.zeros((), device=dev)
    bad_streak = torch.zeros((), device=dev)
    worst_streak = torch.zeros((), device=dev)
    tick_steps, tick_start, tick_nimg = 0, time.time(), plan.nimg(step)
    bar = tqdm(
        total=plan.total_steps, initial=step, unit="step", disable=not (progress and main), dynamic_ncols=True
    )

    metric_cache: dict = {}

    def metric_setup():
        """Detector and reference statistics, loaded (or computed from the data) once per run."""
        if not metric_cache:
            from patchdiff.metrics import (
                dataset_features,
                load_detector,
                load_reference,
                reference_from_features,
                save_reference,
            )

            detector = load_detector(cfg.detector or None, dev)
            ref_path = Path(cfg.metric_ref) if cfg.metric_ref else run_dir / "reference.npz"
            if ref_path.is_file():
                reference = load_reference(ref_path)
            else:
                log(f"computing reference statistics of {cfg.data} for {', '.join(cfg.metrics)}")
                features = dataset_features(
                    ImageDataset(cfg.data, verify=False), detector, batch=64, progress=progress and main
                )
                reference = reference_from_features(features)
                if main:
                    save_reference(reference, ref_path)
            metric_cache.update(detector=detector, reference=reference)
        return metric_cache["detector"], metric_cache["reference"]

    def snapshot() -> None:
        name = f"{step:08d}"
        if main:
            save_snapshot(
                run_dir / f"snapshot-{name}.safetensors", ema, cfg, step=step, kimg=plan.nimg(step) / 1000
            )
            save_state(
                run_dir / STATE_NAME,
                dict(
                    config=to_json(cfg),
                    denoiser=denoiser.state_dict(),
                    ema=ema.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(),
                    counters=json.dumps(counters),
                ),
            )
            if grid:  # after the state: a failure while sampling cannot cost the resumable state
                write_grid(model, run_dir / f"grid-{name}.png", grid)
        if cfg.metrics:
            from patchdiff.metrics import compute_metrics

            detector, reference = metric_setup()
            values = compute_metrics(
                cfg.metrics,
                model,
                reference,
                cfg.metric_num,
                detector,
                batch=min(64, cfg.metric_num),
                seed=0,
                progress=progress,
            )
            if main:
                record = dict(
                    kind="metrics",
                    step=step,
                    kimg=plan.nimg(step) / 1000,
                    time_s=counters["time_s"],
                    **values,
                )
                with open(stats_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log(" ".join(f"{k} {v:.4g}" for k, v in values.items()))
        dist.barrier()

    try:
        while step < plan.total_steps:
            index = plan.size_index(step)
            crop = schedule.crop_shape(index)
            torch.manual_seed(step_seed(cfg.seed, rank, step))  # crops, sigma, noise, dropout of this step
            nimg = plan.nimg(step)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1.0)
            rounds_data = (next(batches) for _ in range(rounds))
            loss, n = train_step(ddp, denoiser, optimizer, scaler, rounds_data, crop, cfg, dev, rounds)
            loss_sum += loss
            bad_streak = (bad_streak + 1) * (~torch.isfinite(loss))
            worst_streak = torch.maximum(worst_streak, bad_streak)
            step_images = plan.nimg(step + 1) - nimg
            update_ema(
                ema,
                denoiser,
                ema_beta(step_images, nimg + step_images, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio),
            )
            size = str(schedule.sizes[index])
            counters["crops"][size] = counters["crops"].get(size, 0) + n * rounds * world
            counters["steps_by_size"][size] = counters["steps_by_size"].get(size, 0) + 1
            counters["images"] += n * rounds * world
            counters["position"] += n * rounds * world
            step += 1
            counters["step"] = step
            tick_steps += 1
            bar.update(1)

            done = step >= plan.total_steps
            if plan.nimg(step) / 1000 >= next_tick or done:
                now = time.time()
                counters["time_s"] += now - tick_start
                loss_mean = dist.all_reduce_mean(loss_sum / tick_steps).item()
                if dist.all_reduce_mean(worst_streak).item() >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"the loss was non-finite for {cfg.max_bad_steps} steps in a row at step {step}; "
                        f"the last good state is {run_dir / STATE_NAME}. Lower --lr, use --precision fp32, "
                        f"or check the data"
                    )
                kimg = plan.nimg(step) / 1000
                dk = kimg - tick_nimg / 1000
                record = dict(
                    kind="tick",
                    step=step,
                    kimg=kimg,
                    time_s=counters["time_s"],
                    loss=loss_mean,
                    lr=optimizer.param_groups[0]["lr"],
                    s_per_kimg=(now - tick_start) / max(dk, 1e-9),
                    steps_per_s=tick_steps / max(now - tick_start, 1e-9),
                    images=counters["images"],
                    crops=counters["crops"],
                    steps_by_size=counters["steps_by_size"],
                    mem_gb=peak_memory_gb(dev),
                )
                if main:
                    with open(stats_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                log(
                    f"step {step} kimg {kimg:.3f} loss {loss_mean:.4f} sec/kimg {record['s_per_kimg']:.2f} "
                    f"steps/s {record['steps_per_s']:.2f} mem {record['mem_gb']:.2f}GB"
                )
                bar.set_postfix(kimg=f"{kimg:.1f}", loss=f"{loss_mean:.4f}")
                ticks_done += 1
                if done or (cfg.snap_ticks > 0 and ticks_done % cfg.snap_ticks == 0):
                    if bad_streak.item() == 0:
                        snapshot()
                    else:  # never overwrite the last good state with one taken mid-way through a bad streak
                        log(
                            f"skipping the snapshot at step {step}: the last {int(bad_streak.item())} losses were non-finite"
                        )
                loss_sum.zero_()
                worst_streak.zero_()
                tick_steps, tick_start, tick_nimg = 0, time.time(), plan.nimg(step)
                next_tick = (math.floor(kimg / tick_kimg) + 1) * tick_kimg
    finally:
        bar.close()
        del batches
        if log_file:
            log_file.close()
    return run_dir
