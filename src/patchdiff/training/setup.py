"""Everything a run decides before its first step: checked flags, the resumed state and the effective
config, the batch split, the step plan and the run directory. `prepare` checks all of it before anything
is written (only `new_run_dir` creates a folder, and the run lock a file)."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchdiff import distributed as dist
from patchdiff.config import TrainConfig, from_json
from patchdiff.config_flags import check_settings
from patchdiff.data import ImageDataset, open_dataset
from patchdiff.data.latents import resolve_latent
from patchdiff.patching import PatchSchedule, StepPlan, resolve_schedule
from patchdiff.snapshot import newest_snapshot, read_snapshot
from patchdiff.training.checkpoint import (
    StateError,
    check_state,
    find_resume_state,
    load_state,
)
from patchdiff.training.lock import RunLock, RunLockedError
from patchdiff.training.posthoc_ema import MAX_SIGMA_REL

# A resumed run's network must match its saved weights.
FIXED_ON_RESUME = ("network.arch", "network.model_channels", "network.channel_mult", "network.num_blocks")
FIXED_ON_RESUME += ("network.attn_resolutions", "cond", "patch.coords", "network.depth", "network.width")
FIXED_ON_RESUME += ("network.heads", "network.dit_patch", "network.prediction", "latent.norm")
FIXED_ON_RESUME += ("network.coord_embed",)
FIXED_ON_RESUME += ("network.augment_dim", "subset", "subset_seed")
# The step plan counts images (kimg, LR ramp, EMA, phases) and picks crop sizes from these, step by step
# from step 0: changed on resume, they would recount the steps already taken.
COUNTED_ON_RESUME = ("batch", "seed", "patch.schedule", "patch.sizes", "patch.probs", "patch.batch_mult")
COUNTED_ON_RESUME += (
    "patch.margin",
    "patch.real_p",
    "patch.latent",
    "patch.finish_full",
    "patch.crop_kimg",
    "patch.min_crop",
)
FIXED_ON_RESUME += ("loss.weighting", "posthoc_ema")  # learned u(sigma) weights; EMA profiles since step 0


def check_config(cfg: TrainConfig) -> None:
    """Values that would silently train on nonsense (a NaN learning rate, zero steps) are refused."""
    check_settings(cfg)  # each flag's own check (config_flags.TRAIN_FLAGS)
    if cfg.ema_unit not in ("images", "steps"):
        raise ValueError(f"--ema-unit {cfg.ema_unit!r}: choose images or steps")
    if cfg.max_bad_steps < 1:
        raise ValueError(f"max_bad_steps {cfg.max_bad_steps}: must be at least 1")
    for sigma_rel in cfg.posthoc_ema:
        if not 0.0 < sigma_rel < MAX_SIGMA_REL:
            raise ValueError(f"--posthoc-ema {sigma_rel}: each sigma_rel must be in (0, {MAX_SIGMA_REL})")
    if len(set(cfg.posthoc_ema)) != len(cfg.posthoc_ema):
        raise ValueError(f"--posthoc-ema {','.join(map(str, cfg.posthoc_ema))}: a sigma_rel is repeated")


def check_outdir(outdir: str) -> None:
    """--outdir must be (or become) a writable folder; checked before anything is created."""
    path = Path(outdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--outdir {outdir} is a file, not a folder; pick another --outdir")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(f"--outdir {outdir}: {existing} is a file, not a folder; pick another --outdir")
    try:  # os.access says yes to root everywhere; creating a file is the real test
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"--outdir {outdir}: {existing} is not writable ({error.strerror}); pick another --outdir"
        ) from None


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value) if rest else value})


def merge_resumed(saved: TrainConfig, given: TrainConfig, overrides) -> tuple[TrainConfig, list[str]]:
    """The saved config with the settings in `overrides` (field paths such as "duration_kimg" or
    "network.dropout") taken from `given`; returns it and one line per changed setting."""
    cfg, changes = saved, []
    for path in sorted(overrides):
        old, new = _get(saved, path), _get(given, path)
        if old == new:
            continue
        if path in FIXED_ON_RESUME:
            raise ValueError(
                f"{path} is {new!r} on the command line but {old!r} in the resumed run; "
                f"a resumed run keeps its network and training images (drop the flag or start a new run)"
            )
        if path in COUNTED_ON_RESUME:
            raise ValueError(
                f"{path} is {new!r} on the command line but {old!r} in the resumed run; the images seen "
                f"so far are counted with it (drop the flag or start a new run)"
            )
        cfg = _set(cfg, path, new)
        changes.append(f"{path}: {old!r} -> {new!r}")
    return cfg, changes


def resolve(cfg: TrainConfig, dataset: ImageDataset) -> TrainConfig:
    """Fill in what the data set decides: image size, channels, classes; check the batch split."""
    H, W = dataset.resolution
    if cfg.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs class labels, but {cfg.data} has no dataset.json labels")
    augment_dim = check_augment(cfg)
    net = dataclasses.replace(
        cfg.network,
        resolution=min(H, W),
        img_channels=dataset.num_channels,
        coord_channels=2 if cfg.patch.coords else 0,
        label_dim=dataset.num_classes if cfg.cond else 0,
        augment_dim=augment_dim,
    )
    for name, value in (("H", H), ("W", W)):
        if value % net.min_crop:
            raise ValueError(
                f"image {name}={value} of {cfg.data} is not a multiple of {net.min_crop}, which "
                f"--cres {','.join(map(str, net.channel_mult))} needs; convert with `patchdiff dataset --resolution`"
            )
    return dataclasses.replace(cfg, network=net, image_size=(H, W))


def check_augment(cfg: TrainConfig) -> int:
    """--augment p: checked against the data and the backbone; returns the network's augment_dim.

    Latent sets are refused: a rotation or scaling of a VAE latent is not the latent of the rotated image.
    A run trained with augmentation keeps its label input when resumed with --augment 0."""
    from patchdiff.augment import AUGMENT_DIM
    from patchdiff.networks import AUGMENT_ARCHITECTURES

    p = cfg.augment
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"--augment {p}: must be a probability in [0, 1]")
    if p == 0:
        return cfg.network.augment_dim
    if cfg.latent.vae:
        raise ValueError(
            f"--augment {p}: {cfg.data} is a latent data set, and geometric transforms of latents are not "
            "latents of transformed images; drop --augment or train on pixels"
        )
    if cfg.network.arch not in AUGMENT_ARCHITECTURES:
        raise ValueError(
            f"--augment {p} needs an augmentation-label input, which --arch {cfg.network.arch} lacks; "
            f"use --arch {', '.join(AUGMENT_ARCHITECTURES)}, or drop --augment"
        )
    return AUGMENT_DIM


def batch_split(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(batch_gpu, accumulation rounds) with batch = batch_gpu * rounds * world."""
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    if batch_gpu < 1 or cfg.batch % (batch_gpu * world):
        raise ValueError(
            f"--batch {cfg.batch} must be a multiple of --batch-gpu {batch_gpu} x {world} processes"
        )
    return batch_gpu, cfg.batch // (batch_gpu * world)


def make_plan(
    cfg: TrainConfig,
    schedule: PatchSchedule,
    batch_gpu: int,
    rounds: int,
    world: int,
    saved_bounds: tuple[int, ...] = (),
) -> StepPlan:
    per_step = schedule.images_per_step(batch_gpu, rounds, world)
    return StepPlan(schedule, cfg.seed, per_step, cfg.duration_kimg * 1000, tuple(saved_bounds))


def init_snapshot_file(path: str) -> Path:
    """--init-snapshot: a snapshot file, or a run (or import) folder's newest snapshot."""
    return newest_snapshot(path) if Path(path).is_dir() else Path(path)


def snapshot_network(cfg: TrainConfig):
    """(network config, sigma_data) of --init-snapshot."""
    try:
        _, saved, _ = read_snapshot(init_snapshot_file(cfg.init_snapshot))
    except (ValueError, TypeError) as error:
        raise ValueError(f"--init-snapshot {cfg.init_snapshot}: {' '.join(str(error).split())}") from None
    if saved.network.precond != "edm":  # EDM's VP / VE training (its sigma and lambda) is not ours
        raise ValueError(
            f"--init-snapshot {cfg.init_snapshot}: its network uses {saved.network.precond.upper()} "
            "preconditioning, which generate and fid calc support but training does not"
        )
    return saved.network, saved.loss.sigma_data


def check_snapshot_fits(cfg: TrainConfig, net) -> None:
    """The data decides resolution, channels, classes and coordinates; they must be the snapshot's."""
    fields = ("resolution", "img_channels", "coord_channels", "label_dim")
    wrong = [
        f"{f} {getattr(net, f)} (data: {getattr(cfg.network, f)})"
        for f in fields
        if getattr(net, f) != getattr(cfg.network, f)
    ]
    if wrong:
        raise ValueError(
            f"--init-snapshot {cfg.init_snapshot} does not fit {cfg.data}: the snapshot's {', '.join(wrong)}; "
            "use data of its size and channels (and --cond / --no-coords as it was trained)"
        )


def load_init_weights(denoiser, path: str) -> None:
    """The --init-snapshot weights into a freshly built denoiser."""
    state, _, _ = read_snapshot(init_snapshot_file(path))
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as error:
        msg = str(error).strip().splitlines()[0][:200]
        raise ValueError(f"--init-snapshot {path} does not fit the network of its config ({msg})") from None


def new_run_dir(cfg: TrainConfig) -> Path:
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ids = [
        int(p.name.split("-")[0]) for p in outdir.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()
    ]
    name = Path(cfg.data.rstrip("/")).stem or "data"
    for i in range(max(ids, default=-1) + 1, max(ids, default=-1) + 100):
        run_dir = outdir / f"{i:05d}-{name}-{cfg.network.arch}-{cfg.patch.schedule}"
        try:
            run_dir.mkdir()  # atomic: two runs starting at once take different numbers
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"--outdir {outdir}: could not create a new run directory")


# What a library call `train(cfg, resume=...)` takes from `cfg` when resuming; everything else comes
# from the saved config. The CLI passes the flags given on its command line instead.
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
    "checkpoint_kimg",
    "checkpoint_minutes",
    "loggers",
)


@dataclass
class Setup:
    """What a run decides before it builds anything: config, data, crop sizes, plan, resumed state."""

    cfg: TrainConfig
    dataset: ImageDataset
    schedule: PatchSchedule
    plan: StepPlan
    batch_gpu: int
    rounds: int
    state: dict | None = None
    state_path: Path | None = None
    counters: dict | None = None
    changes: tuple[str, ...] = ()
    lock: RunLock | None = None
    notes: tuple[str, ...] = ()  # what a resumed run keeps or changes besides its settings (logged)


def read_resumed(
    state_path: Path, given: TrainConfig, overrides
) -> tuple[dict, dict, TrainConfig, list[str]]:
    """(state, counters, effective config, changed settings) of a run to resume."""
    state = load_state(state_path)
    check_state(state_path, state)
    try:
        saved = from_json(TrainConfig, state["config"])
        counters = json.loads(state["counters"])
        counters["step"], counters["position"]
    except (ValueError, TypeError, KeyError) as error:
        raise StateError(f"{state_path} holds an unreadable config or counters ({error})") from None
    cfg, changes = merge_resumed(saved, given, RUN_CONTROL if overrides is None else overrides)
    return state, counters, cfg, changes


def keep_latent(saved: TrainConfig, found: TrainConfig, state_path: Path) -> TrainConfig:
    """A resumed latent run keeps its VAE and its scaling: the weights were trained on latents of that
    VAE, scaled so, whatever set --data points to now (a re-encoded set has other channel statistics)."""
    old, new = saved.latent.vae, found.latent.vae
    if old and new != old:
        raise ValueError(
            f"--data {found.data} holds latents of the VAE {new!r}, but the run {state_path.parent} was "
            f"trained on latents of {old!r}; point --data at a latent set of that VAE or start a new run"
        )
    if not old:
        return found
    kept = dataclasses.replace(found.latent, shift=saved.latent.shift, scale=saved.latent.scale)
    return dataclasses.replace(found, latent=kept)


def phases_on_resume(saved: list[int], fresh: list[int], step: int, replan: bool) -> tuple[tuple, list[str]]:
    """The phase boundaries a resumed progressive run uses, and what to log about them.

    A run keeps the boundaries it was planned with (a longer --duration lengthens only the last phase),
    so the images already counted stay as they were. With `replan`, boundaries not yet reached move to
    where the new duration puts them; those already passed stay (moving them would recount past steps)."""
    if saved[:-1] == fresh[:-1]:
        return tuple(saved), []
    if not replan:
        return tuple(saved), [
            f"progressive phases keep their boundaries at steps {saved[:-1]} (planned for the first "
            f"duration; this duration alone would put them at {fresh[:-1]}); only the last phase changes "
            "length. --replan moves the boundaries not yet reached"
        ]
    moved = [old if old <= step else max(new, step) for old, new in zip(saved[:-1], fresh[:-1], strict=True)]
    moved = [max(moved[: i + 1]) for i in range(len(moved))]  # phases stay in order
    note = f"--replan: progressive phase boundaries {saved[:-1]} -> {moved} (steps; now at step {step})"
    return (*moved, 0), [note]


def prepare(
    cfg: TrainConfig, resume: str | None, world: int, overrides=None, lock: bool = False, replan: bool = False
) -> Setup:
    """Check everything that can be checked before anything is written; with `lock`, rank 0 holds the
    resumed run's directory from before its state is read until the run ends."""
    check_config(cfg)
    check_outdir(cfg.outdir)
    state_path = find_resume_state(resume, cfg.outdir) if resume else None
    run_lock = _lock_resumed(state_path) if lock else None
    try:
        return _plan_run(cfg, state_path, world, overrides, replan, run_lock)
    except BaseException:
        if run_lock:
            run_lock.release()
        raise


def _lock_resumed(state_path: Path | None) -> RunLock | None:
    """Rank 0 locks the folder of the run to resume; every rank stops if it is locked."""
    run_lock, error = None, None
    if state_path is not None and dist.is_main():
        try:
            run_lock = RunLock(state_path.parent).acquire()
        except RunLockedError as e:
            error = e
    dist.agree_on_error(error)
    return run_lock


def _plan_run(
    cfg: TrainConfig, state_path: Path | None, world: int, overrides, replan: bool, run_lock: RunLock | None
) -> Setup:
    """The Setup: the resumed state and config, the fine-tuning start, the data set, the crop sizes, the
    batch split and the step plan."""
    state, counters, changes = None, None, []
    if state_path is not None:
        state, counters, cfg, changes = read_resumed(state_path, cfg, overrides)
        _check_resumed(cfg, state_path)
    start = snapshot_network(cfg) if state is None and cfg.init_snapshot else None
    if start is not None:  # fine-tuning: the snapshot's network, not the flags'
        cfg = _fine_tuned(cfg, *start)
    dataset = _training_set(cfg)
    latent = resolve_latent(cfg, dataset)
    if state_path is not None:
        latent = keep_latent(cfg, latent, state_path)
    cfg = resolve(latent, dataset)
    if start is not None:
        check_snapshot_fits(cfg, start[0])
    schedule = resolve_schedule(cfg.patch, tuple(cfg.image_size), cfg.network.min_crop)
    batch_gpu, rounds = batch_split(cfg, world)
    _check_extras(cfg)
    bounds = tuple(counters.get("phase_bounds", ())) if counters else ()
    notes: list[str] = []
    if bounds and schedule.kind == "progressive":
        fresh = make_plan(cfg, schedule, batch_gpu, rounds, world).phase_bounds
        bounds, notes = phases_on_resume(list(bounds), fresh, counters["step"], replan)
    plan = make_plan(cfg, schedule, batch_gpu, rounds, world, bounds)
    return Setup(
        cfg,
        dataset,
        schedule,
        plan,
        batch_gpu,
        rounds,
        state,
        state_path,
        counters,
        tuple(changes),
        run_lock,
        tuple(notes),
    )


def _check_resumed(cfg: TrainConfig, state_path: Path) -> None:
    """The resumed config (the saved one with the command line's changes) as a new one is checked."""
    check_config(cfg)
    if cfg.augment > 0 and not cfg.network.augment_dim:
        raise ValueError(
            f"--augment {cfg.augment}: the resumed run {state_path} was trained without it, so its "
            "network has no augmentation input; drop --augment or start a new run"
        )


def _fine_tuned(cfg: TrainConfig, network, sigma_data: float) -> TrainConfig:
    """The config of a run that starts from --init-snapshot: that snapshot's network and sigma_data."""
    if cfg.augment > 0 and not network.augment_dim:
        raise ValueError(
            f"--augment {cfg.augment}: the network of --init-snapshot {cfg.init_snapshot} has no "
            "augmentation input; drop --augment"
        )
    return dataclasses.replace(
        cfg, network=network, loss=dataclasses.replace(cfg.loss, sigma_data=sigma_data)
    )


def _training_set(cfg: TrainConfig):
    """The data set of --data (latent or images), or its --subset."""
    dataset = open_dataset(cfg.data, xflip=cfg.xflip, cache=cfg.cache)
    if cfg.subset:
        from patchdiff.data.subset import training_subset

        dataset = training_subset(dataset, cfg.subset, cfg.subset_seed)
    return dataset


def _check_extras(cfg: TrainConfig) -> None:
    """--metrics and --logger are checked before training, not at the first snapshot or record."""
    if cfg.metrics:
        from patchdiff.metrics import parse_metric_names

        parse_metric_names(cfg.metrics)
    if cfg.loggers:
        from patchdiff.training.loggers import check_loggers

        check_loggers(cfg.loggers)  # a missing package: one line naming the extra, before any write
