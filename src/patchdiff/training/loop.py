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
from dataclasses import dataclass
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
from patchdiff.training.setup import batch_split, make_plan, new_run_dir, resolve
from patchdiff.training.stream import StepPlan, StreamSampler, step_seed

__all__ = ["NonFiniteLossError", "batch_split", "make_plan", "resolve", "train", "train_step"]


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
                loss = edm_loss(ddp, y, coords if cfg.patch.coords else None, onehot, cfg.loss)
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


@dataclass(frozen=True)
class Setup:
    """What a run decides before it builds anything: config, data, crop sizes, plan, resumed state."""

    cfg: TrainConfig
    dataset: ImageDataset
    schedule: PatchSchedule
    plan: StepPlan
    batch_gpu: int
    rounds: int
    state: dict | None
    state_path: Path | None


def prepare(cfg: TrainConfig, resume: str | None, world: int) -> Setup:
    """Check everything that can be checked before anything is written."""
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
    return Setup(cfg, dataset, schedule, plan, batch_gpu, rounds, state, state_path)


class Run:
    """One training run: built from a Setup, then `loop()` calls `step()` until the plan is done,
    `tick()` at each tick and `snapshot()` every `snap_ticks` ticks."""

    def __init__(self, setup: Setup, dev: torch.device, progress: bool, grid: int):
        self.cfg, self.schedule, self.plan = cfg, schedule, plan = setup.cfg, setup.schedule, setup.plan
        self.dev, self.progress, self.grid, self.rounds = dev, progress, grid, setup.rounds
        self.rank, self.world, self.main = dist.rank(), dist.world_size(), dist.is_main()
        state = setup.state

        torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
        self.denoiser = build_denoiser(cfg).to(dev)
        self.ema = copy.deepcopy(self.denoiser).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.counters = dict(step=0, position=0, images=0, time_s=0.0, crops={}, steps_by_size={})
        if state is not None:
            self.denoiser.load_state_dict(state["denoiser"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.counters = json.loads(state["counters"])
            run_dir = setup.state_path.parent  # the run continues in place, wherever it was moved to
        else:
            run_dir = new_run_dir(cfg) if self.main else None
        self.run_dir = Path(dist.broadcast_object(str(run_dir)))
        self.stats_path = self.run_dir / "stats.jsonl"
        self.log_file = open(self.run_dir / "log.txt", "a") if self.main else None  # noqa: SIM115 (kept open)
        if self.main:
            atomic_write(self.run_dir / "config.json", lambda tmp: Path(tmp).write_text(to_json(cfg)))
        self.log(
            f"{'resuming' if state else 'starting'} {self.run_dir} at step {self.counters['step']} on "
            f"{self.world} x {dev}; {count_parameters(self.denoiser.net):,} parameters; crop sizes "
            f"{schedule.sizes}; {plan.total_steps} steps of {plan.expected_images:.1f} images (expected)"
        )

        self.ddp = self.denoiser
        if self.world > 1:
            self.ddp = DistributedDataParallel(
                self.denoiser, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False
            )
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")
        if state is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.at_step = self.counters["step"]
        sampler = StreamSampler(
            len(setup.dataset),
            plan,
            setup.batch_gpu,
            self.rounds,
            self.rank,
            self.world,
            self.at_step,
            self.counters["position"],
        )
        loader = torch.utils.data.DataLoader(
            setup.dataset,
            batch_sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=dev.type == "cuda",
            persistent_workers=cfg.workers > 0,
            prefetch_factor=4 if cfg.workers > 0 else None,
        )
        self.batches = iter(loader)
        self.model = Model(self.ema, cfg, dev)
        self.metric_cache: dict = {}
        # Device-side accumulators, read only at ticks: no host sync in the hot loop.
        self.loss_sum = torch.zeros((), device=dev)
        self.bad_streak = torch.zeros((), device=dev)
        self.worst_streak = torch.zeros((), device=dev)
        self.ticks_done = 0
        self.next_tick = self.tick_after(plan.nimg(self.at_step) / 1000)
        self.tick_steps, self.tick_start, self.tick_nimg = 0, time.time(), plan.nimg(self.at_step)
        self.bar = tqdm(
            total=plan.total_steps,
            initial=self.at_step,
            unit="step",
            disable=not (progress and self.main),
            dynamic_ncols=True,
        )

    # ------------------------------------------------------------------ small helpers

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def tick_after(self, kimg: float) -> float:
        return (math.floor(kimg / self.cfg.tick_kimg) + 1) * self.cfg.tick_kimg

    def append_stats(self, record: dict) -> None:
        if self.main:
            with open(self.stats_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()
        del self.batches
        if self.log_file:
            self.log_file.close()

    # ------------------------------------------------------------------ the loop

    def loop(self) -> None:
        while self.at_step < self.plan.total_steps:
            self.step()
            done = self.at_step >= self.plan.total_steps
            if self.plan.nimg(self.at_step) / 1000 >= self.next_tick or done:
                self.tick(done)

    def step(self) -> None:
        cfg, plan, step = self.cfg, self.plan, self.at_step
        index = plan.size_index(step)
        crop = self.schedule.crop_shape(index)
        torch.manual_seed(step_seed(cfg.seed, self.rank, step))  # crops, sigma, noise, dropout of this step
        nimg = plan.nimg(step)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1.0)
        rounds_data = (next(self.batches) for _ in range(self.rounds))
        loss, n = train_step(
            self.ddp,
            self.denoiser,
            self.optimizer,
            self.scaler,
            rounds_data,
            crop,
            cfg,
            self.dev,
            self.rounds,
        )
        self.loss_sum += loss
        self.bad_streak = (self.bad_streak + 1) * (~torch.isfinite(loss))
        self.worst_streak = torch.maximum(self.worst_streak, self.bad_streak)
        step_images = plan.nimg(step + 1) - nimg
        beta = ema_beta(step_images, nimg + step_images, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        update_ema(self.ema, self.denoiser, beta)
        c, size, seen = self.counters, str(self.schedule.sizes[index]), n * self.rounds * self.world
        c["crops"][size] = c["crops"].get(size, 0) + seen
        c["steps_by_size"][size] = c["steps_by_size"].get(size, 0) + 1
        c["images"] += seen
        c["position"] += seen
        self.at_step = c["step"] = step + 1
        self.tick_steps += 1
        self.bar.update(1)

    def tick(self, done: bool) -> None:
        cfg, step, c = self.cfg, self.at_step, self.counters
        now = time.time()
        c["time_s"] += now - self.tick_start
        loss_mean = dist.all_reduce_mean(self.loss_sum / self.tick_steps).item()
        if dist.all_reduce_mean(self.worst_streak).item() >= cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"the loss was non-finite for {cfg.max_bad_steps} steps in a row at step {step}; "
                f"the last good state is {self.run_dir / STATE_NAME}. Lower --lr, use --precision fp32, "
                f"or check the data"
            )
        kimg = self.plan.nimg(step) / 1000
        dk = kimg - self.tick_nimg / 1000
        record = dict(
            kind="tick",
            step=step,
            kimg=kimg,
            time_s=c["time_s"],
            loss=loss_mean,
            lr=self.optimizer.param_groups[0]["lr"],
            s_per_kimg=(now - self.tick_start) / max(dk, 1e-9),
            steps_per_s=self.tick_steps / max(now - self.tick_start, 1e-9),
            images=c["images"],
            crops=c["crops"],
            steps_by_size=c["steps_by_size"],
            mem_gb=peak_memory_gb(self.dev),
        )
        self.append_stats(record)
        self.log(
            f"step {step} kimg {kimg:.3f} loss {loss_mean:.4f} sec/kimg {record['s_per_kimg']:.2f} "
            f"steps/s {record['steps_per_s']:.2f} mem {record['mem_gb']:.2f}GB"
        )
        self.bar.set_postfix(kimg=f"{kimg:.1f}", loss=f"{loss_mean:.4f}")
        self.ticks_done += 1
        if done or (cfg.snap_ticks > 0 and self.ticks_done % cfg.snap_ticks == 0):
            if self.bad_streak.item() == 0:
                self.snapshot()
            else:  # never overwrite the last good state with one taken mid-way through a bad streak
                self.log(
                    f"skipping the snapshot at step {step}: the last {int(self.bad_streak.item())} losses "
                    f"were non-finite"
                )
        self.loss_sum.zero_()
        self.worst_streak.zero_()
        self.tick_steps, self.tick_start, self.tick_nimg = 0, time.time(), self.plan.nimg(step)
        self.next_tick = self.tick_after(kimg)

    # ------------------------------------------------------------------ writing

    def state_dict(self) -> dict:
        return dict(
            config=to_json(self.cfg),
            denoiser=self.denoiser.state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            counters=json.dumps(self.counters),
        )

    def snapshot(self) -> None:
        step, name = self.at_step, f"{self.at_step:08d}"
        if self.main:
            kimg = self.plan.nimg(step) / 1000
            save_snapshot(
                self.run_dir / f"snapshot-{name}.safetensors", self.ema, self.cfg, step=step, kimg=kimg
            )
            save_state(self.run_dir / STATE_NAME, self.state_dict())
            if self.grid:  # after the state: a failure while sampling cannot cost the resumable state
                write_grid(self.model, self.run_dir / f"grid-{name}.png", self.grid)
        if self.cfg.metrics:
            self.evaluate_metrics()
        dist.barrier()

    def evaluate_metrics(self) -> None:
        from patchdiff.metrics import compute_metrics

        cfg, step = self.cfg, self.at_step
        detector, reference = self.metric_setup()
        values = compute_metrics(
            cfg.metrics,
            self.model,
            reference,
            cfg.metric_num,
            detector,
            batch=min(64, cfg.metric_num),
            seed=0,
            progress=self.progress,
        )
        kimg = self.plan.nimg(step) / 1000
        self.append_stats(
            dict(kind="metrics", step=step, kimg=kimg, time_s=self.counters["time_s"], **values)
        )
        self.log(" ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def metric_setup(self):
        """Detector and reference statistics, loaded (or computed from the data) once per run."""
        if not self.metric_cache:
            from patchdiff.metrics import (
                dataset_features,
                load_detector,
                load_reference,
                reference_from_features,
                save_reference,
            )

            cfg = self.cfg
            detector = load_detector(cfg.detector or None, self.dev)
            ref_path = Path(cfg.metric_ref) if cfg.metric_ref else self.run_dir / "reference.npz"
            if ref_path.is_file():
                reference = load_reference(ref_path)
            else:
                self.log(f"computing reference statistics of {cfg.data} for {', '.join(cfg.metrics)}")
                features = dataset_features(
                    ImageDataset(cfg.data, verify=False),
                    detector,
                    batch=64,
                    progress=self.progress and self.main,
                )
                reference = reference_from_features(features)
                if self.main:
                    save_reference(reference, ref_path)
            self.metric_cache.update(detector=detector, reference=reference)
        return self.metric_cache["detector"], self.metric_cache["reference"]


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
    setup = prepare(cfg, resume, dist.world_size())
    if dry_run:
        if dist.is_main():
            cfg, schedule, plan = setup.cfg, setup.schedule, setup.plan
            torch.manual_seed(cfg.seed)
            print(to_json(cfg))
            print(f"parameters: {count_parameters(build_denoiser(cfg).net):,}")
            print(
                f"crop sizes {schedule.sizes} p={tuple(round(p, 3) for p in schedule.probs)}, images/step "
                f"{plan.images_per_step}, expected {plan.expected_images:.1f}, {plan.total_steps} steps"
            )
        return None
    run = Run(setup, dev, progress, grid)
    try:
        run.loop()
    finally:
        run.close()
    return run.run_dir
