"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3.2 and App. C), written from the paper.

A power-function EMA averages the weights seen up to time t with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose width relative to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Its update is
theta_hat <- beta theta_hat + (1 - beta) theta with beta = (1 - n / t)^(gamma + 1), t the images seen after
a step of n images: the weight it gives the step (t - n, t] is then exactly the profile's integral over
that interval, so the stored average is the continuous profile whatever the step sizes.

Training tracks a few profiles and stores them at every snapshot. Any other profile (t_r, gamma_r) is
afterwards approximated as a linear combination of the stored ones: the weights x minimise the L2
distance between the profiles, i.e. solve A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_r>.
Times are measured in images; the solution does not change if all times are scaled by one factor.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from patchdiff.config import TrainConfig
from patchdiff.denoisers import build_denoiser
from patchdiff.generation import Model, check_finite, check_sampling_args
from patchdiff.latent import load_vae
from patchdiff.metrics.detector import Detector
from patchdiff.metrics.features import generated_features
from patchdiff.metrics.fid import Reference, score_on_main, scoring_setup
from patchdiff.snapshot import read_snapshot, save_snapshot

MAX_SIGMA_REL = 0.2997  # the widest power-function profile (gamma near -0.28)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile of exponent gamma (> -1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has this sigma_rel: the largest real root of
    sigma_rel^2 (gamma + 2)^2 (gamma + 3) - (gamma + 1) = 0 (the narrow branch, as in the paper)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel} must be in (0, {MAX_SIGMA_REL}) for a power-function EMA")
    s2 = sigma_rel**2
    # s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1))


def power_ema_beta(images_this_step: float, images_seen: float, gamma: float) -> float:
    """beta = (1 - n / t)^(gamma + 1) for a step of n images that ends at t images."""
    return (1.0 - images_this_step / images_seen) ** (gamma + 1) if images_seen > 0 else 0.0


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral over [0, min(t_a, t_b)] of the product (broadcasts):
    (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) t_a^(ga+1) t_b^(gb+1)), m = min(t_a, t_b); in log space."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    log = (
        np.log(g_a + 1)
        + np.log(g_b + 1)
        + (g_a + g_b + 1) * np.log(m)
        - np.log(g_a + g_b + 1)
        - (g_a + 1) * np.log(t_a)
        - (g_b + 1) * np.log(t_b)
    )
    return np.exp(log)


def solve_weights(
    t_stored: Sequence[float], gamma_stored: Sequence[float], t_target: float, gamma_target: float
) -> np.ndarray:
    """The least-squares weights x of the stored profiles (t_i, gamma_i) whose combination best matches
    the profile (t_target, gamma_target) in L2 (App. C.3): A x = b, solved by least squares."""
    t = np.asarray(t_stored, dtype=np.float64)
    g = np.asarray(gamma_stored, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no stored EMA profiles to reconstruct from")
    scale = max(t.max(), t_target)  # times in units of the latest time: keeps the powers in range
    t, t_r = t / scale, t_target / scale
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, t_r, gamma_target)
    return np.linalg.lstsq(A, b, rcond=None)[0]


class PowerEMA:
    """The tracked profiles of one training run: a copy of the denoiser per sigma_rel."""

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: nn.Module, images_this_step: float, images_seen: float) -> None:
        net_params = [p.detach() for p in net.parameters()]
        for ema, gamma in zip(self.emas, self.gammas, strict=True):
            beta = power_ema_beta(images_this_step, images_seen, gamma)
            torch._foreach_lerp_(list(ema.parameters()), net_params, 1.0 - beta)
            for b_ema, b_net in zip(ema.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b_net)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"{s:g}": ema.state_dict() for s, ema in zip(self.sigma_rels, self.emas, strict=True)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        keys = [f"{s:g}" for s in self.sigma_rels]
        if sorted(state) != sorted(keys):
            raise ValueError(f"the state tracks post-hoc EMA sigma_rel {sorted(state)}, the run {keys}")
        for key, ema in zip(keys, self.emas, strict=True):
            ema.load_state_dict(state[key])


def snapshot_name(step: int, sigma_rel: float) -> str:
    """The file of the profile sigma_rel at a snapshot, in the run folder."""
    return f"phema-{step:08d}-{sigma_rel:.3f}.safetensors"


# --------------------------------------------------------------------------- reconstruction from a run


def stored_profiles(run_dir: str | os.PathLike) -> list[tuple[Path, int, float, float]]:
    """(file, step, images, gamma) of every stored profile in a run folder, from the metadata only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    found = []
    for path in sorted(run_dir.glob("phema-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            found.append(
                (
                    path,
                    int(json.loads(meta["patchdiff.step"])),
                    float(json.loads(meta["patchdiff.images"])),
                    float(json.loads(meta["patchdiff.gamma"])),
                )
            )
        except Exception as error:  # damaged file or foreign metadata
            raise ValueError(f"{path} is not a readable post-hoc EMA snapshot ({error})") from None
    if not found:
        raise FileNotFoundError(
            f"{run_dir} has no post-hoc EMA snapshots (phema-*.safetensors); train with "
            "--posthoc-ema 0.05,0.10 (the default with --arch edm2)"
        )
    return found


def reconstructed_states(
    run_dir: str | os.PathLike, sigma_rels: Sequence[float], step: int | None = None
) -> tuple[list[dict[str, torch.Tensor]], TrainConfig, dict, int]:
    """The denoiser's state averaged with each sigma_rel's power-function profile at the snapshot `step`
    (default: the newest), from the profiles stored up to that step: (states, config, info of the
    newest stored profile, step). Buffers come from the newest profile. Snapshots are read one at a time."""
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]  # checks them before any work
    profiles = stored_profiles(run_dir)
    steps = sorted({p[1] for p in profiles})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step}: {run_dir} has post-hoc EMA snapshots at steps {steps}")
    profiles = [p for p in profiles if p[1] <= step]
    t_r = next(p[2] for p in profiles if p[1] == step)
    weights = np.stack(
        [solve_weights([p[2] for p in profiles], [p[3] for p in profiles], t_r, g) for g in gammas]
    )  # [targets, stored]
    newest_state, cfg, info = read_snapshot(next(p[0] for p in profiles if p[1] == step))
    buffers = {name for name, _ in build_denoiser(cfg, pretrained=False).named_buffers()}
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    for i, (path, *_) in enumerate(profiles):
        state = load_file(str(path))
        for target, acc in enumerate(sums):
            for key, value in state.items():
                if key not in buffers:
                    term = value.to(torch.float64) * float(weights[target, i])
                    acc[key] = acc[key] + term if key in acc else term
    states = [{k: (acc[k].to(v.dtype) if k in acc else v) for k, v in newest_state.items()} for acc in sums]
    return states, cfg, dict(info, images=t_r), step


def reconstruct(
    run_dir: str | os.PathLike, sigma_rels: Sequence[float], dest: str | os.PathLike, step: int | None = None
) -> list[Path]:
    """Write, for each sigma_rel, the denoiser averaged with that power-function profile at the snapshot
    `step` (default: the newest) as DEST/sigma-<sigma_rel>/snapshot-<step>.safetensors, from the profiles
    stored up to that step. Returns the files written."""
    states, cfg, info, step = reconstructed_states(run_dir, sigma_rels, step)
    t_r = info["images"]
    denoiser = build_denoiser(cfg, pretrained=False)
    written = []
    for sigma_rel, state in zip(sigma_rels, states, strict=True):
        out = Path(dest) / f"sigma-{sigma_rel:.3f}" / f"snapshot-{step:08d}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        denoiser.load_state_dict(state)
        save_snapshot(
            out, denoiser, cfg, step=step, kimg=info.get("kimg", t_r / 1000), images=t_r, sigma_rel=sigma_rel
        )
        written.append(out)
    return written


def posthoc_models(
    run_dir: str | os.PathLike,
    sigma_rels: Sequence[float],
    device: str | torch.device | None = None,
    step: int | None = None,
    vae: str | None = None,
) -> Iterator[tuple[float, int, Model]]:
    """(sigma_rel, step, Model) for each sigma_rel, reconstructed in memory and ready to sample like
    patchdiff.generation.load's; one network on the device at a time."""
    states, cfg, _, step = reconstructed_states(run_dir, sigma_rels, step)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if vae and not cfg.latent.vae:
        raise ValueError(f"--vae {vae} given, but {run_dir} was trained on pixels and needs no VAE")
    decoder = load_vae(vae, device) if vae else None
    for sigma_rel, state in zip(sigma_rels, states, strict=True):
        check_finite(state, f"{run_dir} (post-hoc EMA sigma_rel {sigma_rel:g})")
        denoiser = build_denoiser(cfg, pretrained=False)
        denoiser.load_state_dict(state)
        yield (
            float(sigma_rel),
            step,
            Model(denoiser.to(device).eval().requires_grad_(False), cfg, device, decoder),
        )


def sweep_sigma_rel(
    names: Sequence[str],
    run_dir: str | os.PathLike,
    sigma_rels: Sequence[float],
    ref: str | Reference,
    num: int,
    detector: str | Detector | None,
    batch: int,
    seed: int = 0,
    progress: bool = False,
    *,
    step: int | None = None,  # the snapshot to reconstruct at (default: the newest)
    device: str | torch.device | None = None,
    vae: str | None = None,
    **sampling: Any,  # generated_features' num_steps, class_label, cfg_scale, sampler, S_churn, ...
) -> list[dict[str, float]]:
    """Score the post-hoc EMA of each sigma_rel (EDM2, Sec. 3.2), reconstructed in memory from the
    profiles a run stored, on the same seeds: [{"sigma_rel", "step", "fid", ...}, ...] in the order given.
    Same result on every rank."""
    sampling.setdefault("num_steps", None)  # None: the default sampler's steps, as in compute_metrics

    names, reference, device, detector = scoring_setup(names, ref, num, detector, device)
    rows = []
    for sigma_rel, at_step, model in posthoc_models(run_dir, sigma_rels, device, step, vae):
        if not rows and sampling["num_steps"] is not None:  # refuse bad settings before the first sample
            label, scale = sampling.get("class_label"), sampling.get("cfg_scale", 1.0)
            check_sampling_args(model, range(seed, seed + num), batch, sampling["num_steps"], label, scale)
        features = generated_features(
            model, detector, range(seed, seed + num), batch=batch, progress=progress, **sampling
        )
        rows.append(
            {"sigma_rel": sigma_rel, "step": at_step, **score_on_main(names, features, reference, seed)}
        )
    return rows


def best_sigma_rel(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The row of the lowest FID (of the lowest KID when FID was not computed)."""
    key = "fid" if "fid" in rows[0] else "kid"
    return min(rows, key=lambda row: row[key])


def check_sigma_rels(values: Sequence[float]) -> None:
    """--sigma-rel: at least one value, each a sigma_rel a power-function profile can have."""
    if not values:
        raise ValueError("--sigma-rel needs at least one value, e.g. 0.05,0.1")
    for s in values:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as error:
            raise ValueError(f"--sigma-rel: {error}") from None
