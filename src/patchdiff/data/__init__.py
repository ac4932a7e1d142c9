"""Data: the training-set readers (ImageDataset, LatentDataset), image sources, and the `patchdiff dataset`
converter (images, or latents with --vae)."""

from patchdiff.data.convert import TRANSFORMS, ConvertSummary, convert_dataset, fit_image, parse_resolution
from patchdiff.data.dataset import ImageDataset
from patchdiff.data.latents import LatentDataset, is_latent_dataset, open_dataset
from patchdiff.data.sources import IMAGE_EXTENSIONS, Source, open_source

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRANSFORMS",
    "ConvertSummary",
    "ImageDataset",
    "LatentDataset",
    "Source",
    "convert_dataset",
    "fit_image",
    "is_latent_dataset",
    "open_dataset",
    "open_source",
    "parse_resolution",
]
