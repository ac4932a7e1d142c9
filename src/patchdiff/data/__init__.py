"""Data: the training-set reader (ImageDataset), image sources, and the `patchdiff dataset` converter."""

from patchdiff.data.convert import TRANSFORMS, ConvertSummary, convert_dataset, fit_image, parse_resolution
from patchdiff.data.dataset import ImageDataset
from patchdiff.data.sources import IMAGE_EXTENSIONS, Source, open_source

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRANSFORMS",
    "ConvertSummary",
    "ImageDataset",
    "Source",
    "convert_dataset",
    "fit_image",
    "open_source",
    "parse_resolution",
]
