"""patchdiff: patch-wise training of EDM diffusion models (Patch Diffusion, Wang et al. 2023)."""

from patchdiff.config import LossConfig, NetworkConfig, PatchConfig, TrainConfig, network_preset
from patchdiff.generation import Model, generate, load
from patchdiff.loss import edm_loss
from patchdiff.patching import coordinate_grid, random_patches, resolve_schedule
from patchdiff.precond import Denoiser, edm_scalings
from patchdiff.sampling import edm_sampler, euler_sampler, guidance_combine, guided_denoiser, karras_sigmas

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "LossConfig",
    "Model",
    "NetworkConfig",
    "PatchConfig",
    "TrainConfig",
    "coordinate_grid",
    "edm_loss",
    "edm_sampler",
    "edm_scalings",
    "euler_sampler",
    "generate",
    "guidance_combine",
    "guided_denoiser",
    "karras_sigmas",
    "load",
    "network_preset",
    "random_patches",
    "resolve_schedule",
]
