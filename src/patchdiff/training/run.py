"""A training run: set-up from a `Setup`, the step loop, ticks, snapshots, checkpoints and stop signals.

`Run.loop()` calls `step()` until the plan is done. After each step the ranks agree on stop requests
and clock-driven checkpoints (`requests()`); at each tick the losses and non-finite streaks are read
(the only device syncs), and every `snap_ticks` ticks a snapshot is written with the state.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from patchdiff import distributed as dist
from patchdiff.config import to_json
from patchdiff.data import ImageDataset
from patchdiff.denoisers import build_denoiser
from patchdiff.files import atomic_write
from patchdiff.generation import Model, generate, image_grid, to_pil
from patchdiff.networks import count_parameters
from patchdiff.snapshot import save_snapshot
from patchdiff.training.checkpoint import (
    STATE_NAME,
    StateError,
    remove_temporaries,
    save_state,
    settle_state,
    state_in,
    truncate_stats,
)
from patchdiff.training.ema import ema_beta, update_ema
from patchdiff.training.faults import Faults
from patchdiff.training.lock import RunLock
from patchdiff.training.mfu import achieved, flops_by_crop
from patchdiff.training.optim import lr_at, make_adam
from patchdiff.training.posthoc_ema import PowerEMA, snapshot_name
from patchdiff.training.setup import Setup, load_init_weights, new_run_dir
from patchdiff.training.signals import RunInterruptedError, StopRequests, ignore_stop_signals, signal_name
from patchdiff.training.stream import CropDataset, StreamSampler, clock, step_seed


class NonFiniteLossError(RuntimeError):
    pass


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_grid(model: Model, path: Path, num: int, num_steps: int | None = None):
    """Write the sample grid of `num` images; returns it (uint8 [H, W, C]) for the loggers."""
    images = generate(model, range(num), batch_size=min(num, 64), num_steps=num_steps)
    grid = image_grid(images)
    atomic_write(path, lambda tmp: to_pil(grid).save(tmp, format="PNG"))
    return grid


class Run:
    """One training run, built from a Setup: `loop()` calls `step()` until the plan is done, `tick()` at
    each tick (which may `snapshot()`), `checkpoint()` on its own interval, `interrupt()` on a signal."""

    def __init__(
        self,
        setup: Setup,
        dev: torch.device,
        progress: bool,
        grid: int,
        stop: StopRequests,
        train_step: Callable,
        compile: bool = False,
    ):
        self.cfg, self.schedule, self.plan = setup.cfg, setup.schedule, setup.plan
        self.dev, self.progress, self.grid, self.rounds, self.stop = dev, progress, grid, setup.rounds, stop
        self.rank, self.world, self.main = dist.rank(), dist.world_size(), dist.is_main()
        self.lock = setup.lock
        self.train_step = train_step  # training/loop.py's, passed in so that this module stays below it

        self.build_networks(setup)
        self.counters = dict(step=0, position=0, images=0, time_s=0.0, crops={}, steps_by_size={})
        if setup.state is not None:
            self.restore(setup)
        # Progressive phases are fixed for the run's life, whatever a resumed command line says.
        self.counters["phase_bounds"] = self.plan.phase_bounds
        self.open_run(setup)
        # Counted once per crop size (before DDP wraps the model): each tick's TFLOP/s costs no sync.
        self.flops_by_size = flops_by_crop(self.denoiser, self.schedule, self.cfg.network.img_channels)
        self.tick_flops = 0.0
        self.wrap_network(compile)
        self.batches = self.open_stream(setup)
        self.model = Model(self.ema, self.cfg, dev)
        self.metric_cache: dict = {}
        self.faults = Faults(self.rank)
        self.host_group = dist.host_group()
        self.start_clocks()

    # ------------------------------------------------------------------ set-up, in the order __init__ runs it

    def build_networks(self, setup: Setup) -> None:
        """The denoiser (the seed's initial weights, or --init-snapshot's), its EMA copies, Adam and the
        fp16 gradient scaler."""
        cfg, dev, new_run = self.cfg, self.dev, setup.state is None
        torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
        self.denoiser = build_denoiser(cfg, pretrained=new_run).to(dev)  # a resumed run has its weights
        if new_run and cfg.init_snapshot:
            load_init_weights(self.denoiser, cfg.init_snapshot)  # fine-tuning starts from these weights
        if dev.type == "cuda":  # what cuDNN's fastest convolutions and bf16 tensor cores want
            self.denoiser = self.denoiser.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.denoiser).eval().requires_grad_(False)
        self.phema = PowerEMA(self.denoiser, cfg.posthoc_ema) if cfg.posthoc_ema else None
        self.optimizer = make_adam(self.denoiser.parameters(), cfg.lr, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")

    def restore(self, setup: Setup) -> None:
        """A resumed run's weights, optimiser and scaler states and counters, from its training state."""
        state = setup.state
        try:
            self.denoiser.load_state_dict(state["denoiser"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.phema is not None:
                self.phema.load_state_dict(state.get("phema", {}))
        except (RuntimeError, ValueError, KeyError) as error:
            msg = str(error).strip().splitlines()[0][:200]
            raise StateError(f"{setup.state_path} does not fit the network of its config ({msg})") from None
        self.counters = setup.counters

    def open_run(self, setup: Setup) -> None:
        """The run's folder, config.json, log (its first lines say what starts or resumes) and loggers; a
        resumed run's stats.jsonl loses the records past its state."""
        cfg, resumed = self.cfg, setup.state is not None
        self.run_dir = self.open_run_dir(setup)
        self.at_step = self.state_step = self.counters["step"]
        self.stats_path = self.run_dir / "stats.jsonl"
        self.log_file = open(self.run_dir / "log.txt", "a") if self.main else None  # noqa: SIM115 (kept open)
        if self.main:
            atomic_write(self.run_dir / "config.json", lambda tmp: Path(tmp).write_text(to_json(cfg)))
        sched, plan = self.schedule, self.plan
        windows = (
            f" seen in windows {tuple(sched.crop_shape(i)[0] for i in range(len(sched.sizes)))}"
            if sched.margin
            else ""
        )
        self.log(
            f"{'resuming' if resumed else 'starting'} {self.run_dir} at step {self.at_step} on "
            f"{self.world} x {self.dev}; {count_parameters(self.denoiser.net):,} parameters; crop sizes "
            f"{sched.sizes}{windows}; {plan.total_steps} steps, {plan.duration_nimg / max(plan.total_steps, 1):.1f} "
            "images per step on average"  # phased schedules load more, smaller images in their crop phases
        )
        for change in setup.changes:
            self.log(f"resume: {change} (from the command line)")
        for note in setup.notes:
            self.log(f"resume: {note}")
        if resumed and self.main:
            dropped = truncate_stats(self.stats_path, self.at_step)
            if dropped:
                self.log(
                    f"resume: dropped {dropped} stats.jsonl records past step {self.at_step} (lost work)"
                )
        self.loggers = None  # tensorboard / wandb sinks of the stats records, rank 0 only
        if cfg.loggers:
            self.open_loggers(not resumed)

    def wrap_network(self, compile: bool) -> None:
        """`self.ddp`, the denoiser the step calls: wrapped by DDP over several processes, compiled with
        --compile (one static graph per crop size, a handful of sizes: each compiles on its first step)."""
        self.ddp = self.denoiser
        if self.world > 1:
            self.ddp = DistributedDataParallel(
                self.denoiser,
                device_ids=[self.dev] if self.dev.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.compile_s: dict[str, float] | None = None
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
            self.ddp = torch.compile(self.ddp, dynamic=False)
            self.compile_s = {}

    def open_stream(self, setup: Setup):
        """The iterator of this process's accumulation rounds, from the resumed step and stream position."""
        cfg = self.cfg
        sampler = StreamSampler(
            len(setup.dataset),
            self.plan,
            setup.batch_gpu,
            self.rounds,
            self.rank,
            self.world,
            self.at_step,
            self.counters["position"],
            cfg.augment,
        )
        # The workers cut each image at its CropKey before collation: only crops are pinned and copied.
        loader = torch.utils.data.DataLoader(
            CropDataset(setup.dataset),
            batch_sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=self.dev.type == "cuda",
            persistent_workers=cfg.workers > 0,
            prefetch_factor=4 if cfg.workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
        )
        return iter(loader)

    def start_clocks(self) -> None:
        """The device-side accumulators (read only at ticks and checkpoints: no host sync in the hot
        loop), the tick and checkpoint schedule from the current step, and the progress bar."""
        cfg, plan, dev, sizes = self.cfg, self.plan, self.dev, self.schedule.sizes
        self.loss_sum = torch.zeros((), device=dev)
        self.loss_by_size = torch.zeros(len(sizes), device=dev)  # summed per crop size in a tick
        self.steps_by_index = [0] * len(sizes)
        self.bad_streak = torch.zeros((), device=dev)
        self.worst_streak = torch.zeros((), device=dev)
        self.ticks_done = 0
        kimg = plan.nimg(self.at_step) / 1000
        self.next_tick = self.after(kimg, cfg.tick_kimg)
        self.next_checkpoint = self.after(kimg, cfg.checkpoint_kimg) if cfg.checkpoint_kimg else math.inf
        self.checkpoint_time = time.time()
        self.tick_steps, self.tick_start, self.tick_nimg = 0, time.time(), plan.nimg(self.at_step)
        self.bar = tqdm(
            total=plan.total_steps,
            initial=self.at_step,
            unit="step",
            disable=not (self.progress and self.main),
            dynamic_ncols=True,
        )

    def open_run_dir(self, setup: Setup) -> Path:
        """The resumed run's folder (rank 0 already holds its lock), or a new one, locked by rank 0."""
        if setup.state_path is not None:
            run_dir = setup.state_path.parent  # the run continues in place, wherever it was moved to
            if self.main:
                remove_temporaries(run_dir)
                settle_state(run_dir)  # the state just read may be a state.pt.new a crash left unrenamed
        elif self.main:
            run_dir = new_run_dir(self.cfg)
            self.lock = RunLock(run_dir).acquire()
        return Path(dist.broadcast_object(str(run_dir) if self.main else None))

    def open_loggers(self, new_run: bool) -> None:
        """Rank 0 opens the loggers; if one cannot start (say W&B without a login), every rank stops,
        and a new run's folder, which holds nothing yet, is removed."""
        from patchdiff.training.loggers import open_loggers

        error = None
        if self.main:
            resumed = None if new_run else self.plan.nimg(self.at_step) / 1000
            try:
                self.loggers = open_loggers(
                    self.cfg.loggers, self.run_dir, json.loads(to_json(self.cfg)), resumed
                )
            except Exception as e:
                error = e
                if new_run:
                    self.log_file.close()
                    self.lock.release()
                    shutil.rmtree(self.run_dir, ignore_errors=True)
        dist.agree_on_error(error)

    # ------------------------------------------------------------------ small helpers

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    @staticmethod
    def after(kimg: float, interval: float) -> float:
        return (math.floor(kimg / interval) + 1) * interval

    def append_stats(self, record: dict) -> None:
        if self.main:
            with open(self.stats_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.loggers:
                self.loggers.record(record)

    def close(self) -> None:
        self.bar.close()
        del self.batches
        if self.log_file:
            self.log_file.close()
        if self.loggers:
            self.loggers.close()
        if self.lock:
            self.lock.release()

    # ------------------------------------------------------------------ the loop

    def loop(self) -> None:
        if self.at_step >= self.plan.total_steps:
            self.score_finished_run()
        while self.at_step < self.plan.total_steps:
            self.step()
            done = self.at_step >= self.plan.total_steps
            signum, clock_due = self.requests()
            kimg = self.plan.nimg(self.at_step) / 1000
            if kimg >= self.next_tick or done:
                self.tick(done)
            if not done and (clock_due or kimg >= self.next_checkpoint) and self.state_step != self.at_step:
                self.checkpoint()
            if signum and not done:
                self.interrupt(signum)

    def requests(self) -> tuple[int, bool]:
        """(stop signal, checkpoint due by the clock), the same on every rank.

        A signal may reach one rank only (Ctrl-C on one node) and each rank has its own clock, so the
        ranks agree on both with one all-reduce of two integers per step. It runs on a CPU (gloo)
        group: it waits only for the other hosts to finish enqueuing this step, never for the GPU, so
        the hot loop stays free of device syncs; a few tens of microseconds next to a step of tens of
        milliseconds. Checking every few steps instead would save little and delay a preempted job."""
        minutes = self.cfg.checkpoint_minutes
        clock_due = int(self.main and minutes > 0 and time.time() - self.checkpoint_time >= minutes * 60)
        if self.world == 1:
            return self.stop.signum, bool(clock_due)
        flags = dist.all_reduce_max(torch.tensor([self.stop.signum, clock_due]), self.host_group)
        return int(flags[0]), bool(flags[1])

    def step(self) -> None:
        cfg, plan, step = self.cfg, self.plan, self.at_step
        index = plan.size_index(step)
        crop = self.schedule.crop_shape(index)
        torch.manual_seed(step_seed(cfg.seed, self.rank, step))  # sigma, noise, latents, dropout of this step
        counted, counted_step = clock(plan, step, cfg.ema_unit, cfg.batch)  # images, or steps x --batch
        lr = lr_at(counted, step, plan.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rounds_data = (next(self.batches) for _ in range(self.rounds))
        size = str(self.schedule.sizes[index])
        first = self.compile_s is not None and size not in self.compile_s
        start = time.time() if first else 0.0
        loss, n = self.train_step(
            self.ddp,
            self.denoiser,
            self.optimizer,
            self.scaler,
            rounds_data,
            crop,
            cfg,
            self.dev,
            self.rounds,
            band=self.schedule.noise_band(index) if cfg.patch.noise_bands else None,
        )
        if first:  # the first step of a size compiles its graph: timed once (a device sync, once per size)
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
            self.compile_s[size] = time.time() - start
            self.log(f"compiled the step for crop size {size}: {self.compile_s[size]:.1f} s")
        loss = self.faults.after_step(step, self.schedule.sizes[index], loss)
        self.loss_sum += loss
        self.loss_by_size[index] += loss
        self.steps_by_index[index] += 1
        self.bad_streak = (self.bad_streak + 1) * (~torch.isfinite(loss))
        self.worst_streak = torch.maximum(self.worst_streak, self.bad_streak)
        beta = ema_beta(counted_step, counted + counted_step, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        update_ema(self.ema, self.denoiser, beta)
        if self.phema is not None:
            nimg = plan.nimg(step)  # the profiles' time is images seen (the paper's t)
            self.phema.update(self.denoiser, plan.nimg(step + 1) - nimg, plan.nimg(step + 1))
        c, size, seen = self.counters, str(self.schedule.sizes[index]), n * self.rounds * self.world
        c["crops"][size] = c["crops"].get(size, 0) + seen
        c["steps_by_size"][size] = c["steps_by_size"].get(size, 0) + 1
        c["images"] += seen
        self.tick_flops += self.flops_by_size[self.schedule.sizes[index]] * seen
        c["flops"] = c.get("flops", 0.0) + self.flops_by_size[self.schedule.sizes[index]] * seen
        c["position"] += seen
        self.at_step = c["step"] = step + 1
        self.tick_steps += 1
        self.bar.update(1)

    def streaks(self) -> tuple[int, int]:
        """(current, worst since the last tick) non-finite streaks, the maximum over ranks: one rank's
        fp16 overflow must stop (or hold back the state of) every rank at the same step."""
        both = dist.all_reduce_max(torch.stack([self.bad_streak, self.worst_streak]))
        return int(both[0].item()), int(both[1].item())

    def tick_loss_by_size(self) -> dict[str, float]:
        """The tick's mean loss of each crop size it trained on (every rank trains the same sizes)."""
        sums = dist.all_reduce_mean(self.loss_by_size).tolist()
        return {
            str(size): sums[i] / n
            for i, (size, n) in enumerate(zip(self.schedule.sizes, self.steps_by_index, strict=True))
            if n
        }

    def tick(self, done: bool) -> None:
        cfg, step, c = self.cfg, self.at_step, self.counters
        now = time.time()
        c["time_s"] += now - self.tick_start
        loss_mean = dist.all_reduce_mean(self.loss_sum / self.tick_steps).item()
        bad, worst = self.streaks()
        if worst >= cfg.max_bad_steps:
            state = state_in(self.run_dir)
            raise NonFiniteLossError(
                f"the loss was non-finite for {cfg.max_bad_steps} steps in a row at step {step}; "
                + (f"the last good state is {state}" if state else "no training state was written yet")
                + ". Lower --lr, use --precision fp32, or check the data"
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
            flops=c.get("flops", 0.0),  # cumulative counted training FLOPs (flops.py), for FID-vs-FLOPs plots
            crops=c["crops"],
            steps_by_size=c["steps_by_size"],
            mem_gb=peak_memory_gb(self.dev),
            loss_by_size=self.tick_loss_by_size(),
            **achieved(self.tick_flops, now - self.tick_start, self.dev, self.world),
        )
        if self.compile_s:
            record["compile_s"] = dict(self.compile_s)
        self.append_stats(record)
        self.log(
            f"step {step} kimg {kimg:.3f} loss {loss_mean:.4f} sec/kimg {record['s_per_kimg']:.2f} "
            f"steps/s {record['steps_per_s']:.2f} TFLOP/s {record['tflops']:.3g} mem {record['mem_gb']:.2f}GB"
            + (f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
        )
        self.bar.set_postfix(kimg=f"{kimg:.1f}", loss=f"{loss_mean:.4f}")
        self.ticks_done += 1
        if done or (cfg.snap_ticks > 0 and self.ticks_done % cfg.snap_ticks == 0):
            if bad == 0:
                self.snapshot()
            else:  # never overwrite the last good state with one taken mid-way through a bad streak
                self.log(f"skipping the snapshot at step {step}: the last {bad} losses were non-finite")
        self.loss_sum.zero_()
        self.loss_by_size.zero_()
        self.steps_by_index = [0] * len(self.schedule.sizes)
        self.worst_streak.zero_()
        self.tick_steps, self.tick_start, self.tick_nimg = 0, time.time(), self.plan.nimg(step)
        self.tick_flops = 0.0
        self.next_tick = self.after(kimg, cfg.tick_kimg)

    # ------------------------------------------------------------------ writing

    def state_dict(self) -> dict:
        return dict(
            config=to_json(self.cfg),
            denoiser=self.denoiser.state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            counters=json.dumps(self.counters),
            **({"phema": self.phema.state_dict()} if self.phema is not None else {}),
        )

    def write_state(self) -> None:
        """Rank 0 writes; every rank learns whether that worked (so a full disk stops all of them)."""
        error = None
        if self.main:
            try:
                save_state(self.run_dir / STATE_NAME, self.state_dict())
            except RuntimeError as e:
                error = e
        dist.agree_on_error(error)
        kimg = self.plan.nimg(self.at_step) / 1000
        self.state_step, self.checkpoint_time = self.at_step, time.time()
        if self.cfg.checkpoint_kimg:
            self.next_checkpoint = self.after(kimg, self.cfg.checkpoint_kimg)

    def checkpoint(self) -> bool:
        """The resumable state between snapshots; held back while the losses are non-finite."""
        bad, _ = self.streaks()
        if bad:
            self.log(f"skipping the checkpoint at step {self.at_step}: the last {bad} losses were non-finite")
            return False
        self.write_state()
        return True

    def interrupt(self, signum: int) -> None:
        """Stop at this step boundary: save the state, then leave with one line on how to resume."""
        saved = self.state_step == self.at_step or self.checkpoint()
        state = state_in(self.run_dir)
        where = (
            f"the state is saved in {state}"
            if saved
            else f"the losses were non-finite, so the last good state {state or '(none)'} was kept"
        )
        message = (
            f"stopped by {signal_name(signum)} at step {self.at_step}; {where}; "
            f"continue with the same command plus --resume {self.run_dir}"
        )
        if self.log_file:  # the CLI prints the message: into the log only, so the console gets one line
            self.log_file.write(message + "\n")
        raise RunInterruptedError(message, signum)

    def snapshot(self) -> None:
        step, name = self.at_step, f"{self.at_step:08d}"
        error = None
        if self.main:
            kimg = self.plan.nimg(step) / 1000
            path = self.run_dir / f"snapshot-{name}.safetensors"
            try:
                save_snapshot(path, self.ema, self.cfg, step=step, kimg=kimg)
                if self.phema is not None:  # the power-function profiles, for `patchdiff ema`
                    for s, gamma, ema in zip(
                        self.phema.sigma_rels, self.phema.gammas, self.phema.emas, strict=True
                    ):
                        info = dict(
                            step=step, kimg=kimg, images=self.plan.nimg(step), sigma_rel=s, gamma=gamma
                        )
                        save_snapshot(self.run_dir / snapshot_name(step, s), ema, self.cfg, **info)
            except Exception as e:  # OSError, or safetensors' own error type on a full disk
                reason = (
                    getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
                )
                state = state_in(self.run_dir)
                error = RuntimeError(
                    f"could not write the snapshot {path}: {reason[:200]}; the training state "
                    + (f"{state} is kept" if state else "was not written yet")
                )
        dist.agree_on_error(error)
        self.write_state()
        if self.main and self.grid:  # after the state: a failure while sampling cannot cost the state
            grid = write_grid(self.model, self.run_dir / f"grid-{name}.png", self.grid)
            if self.loggers:
                self.loggers.image("samples", grid, self.plan.nimg(step) / 1000)
        if self.cfg.metrics:
            self.evaluate_metrics()
        dist.barrier()

    def score_finished_run(self) -> None:
        """A finished run resumed (as `patchdiff compare` does after a failure) whose last snapshot has
        no metrics record, because scoring failed (a missing or broken --detector): score its EMA now,
        rather than report it done without the numbers it was run for."""
        if not self.cfg.metrics:
            return
        missing = 0
        if self.main:  # truncate_stats dropped torn lines on resume, so every line parses
            lines = self.stats_path.read_text().splitlines() if self.stats_path.is_file() else []
            scored = {r.get("step") for r in map(json.loads, lines) if r.get("kind") == "metrics"}
            missing = int(self.at_step not in scored)
        if self.world > 1:
            missing = int(dist.all_reduce_max(torch.tensor([missing]), self.host_group)[0])
        if missing:
            self.log(f"the run is finished, but step {self.at_step} has no metrics: scoring it now")
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
            dict(
                kind="metrics",
                step=step,
                kimg=kimg,
                time_s=self.counters["time_s"],
                flops=self.counters.get("flops", 0.0),
                **values,
            )
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
