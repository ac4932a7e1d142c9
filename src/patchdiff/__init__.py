"""patchdiff: patch-wise training of EDM diffusion models (Patch Diffusion, Wang et al. 2023)."""

from patchdiff.canvas import Canvas, centred_canvas, region_canvas, tiled_denoiser
from patchdiff.config import LossConfig, NetworkConfig, PatchConfig, TrainConfig, network_preset
from patchdiff.generation import Model, generate, load
from patchdiff.inpaint import Known, inpainting_denoiser
from patchdiff.loss import edm_loss
from patchdiff.patching import StepPlan, coordinate_features, coordinate_grid, crop_at, resolve_schedule
from patchdiff.precond import Denoiser, edm_scalings
from patchdiff.sampling import edm_sampler, euler_sampler, guidance_combine, guided_denoiser, karras_sigmas

__version__ = "0.1.0"

__all__ = [
    "Canvas",
    "Denoiser",
    "Known",
    "LossConfig",
    "Model",
    "NetworkConfig",
    "PatchConfig",
    "StepPlan",
    "TrainConfig",
    "centred_canvas",
    "coordinate_features",
    "coordinate_grid",
    "crop_at",
    "edm_loss",
    "edm_sampler",
    "edm_scalings",
    "euler_sampler",
    "generate",
    "guidance_combine",
    "guided_denoiser",
    "inpainting_denoiser",
    "karras_sigmas",
    "load",
    "network_preset",
    "region_canvas",
    "resolve_schedule",
    "tiled_denoiser",
]
