"""Evaluation: FID and KID on Inception-v3 features, reference statistics, and the detector."""

from patchdiff.metrics.detector import Detector, load_detector, tf_bilinear_resize
from patchdiff.metrics.features import dataset_features, gather_in_order, generated_features
from patchdiff.metrics.fid import (
    METRICS,
    Reference,
    compute_metrics,
    feature_statistics,
    frechet_distance,
    load_reference,
    parse_metric_names,
    reference_from_features,
    save_reference,
    score_features,
)
from patchdiff.metrics.kid import kernel_inception_distance

__all__ = [
    "METRICS",
    "Detector",
    "Reference",
    "compute_metrics",
    "dataset_features",
    "feature_statistics",
    "frechet_distance",
    "gather_in_order",
    "generated_features",
    "kernel_inception_distance",
    "load_detector",
    "load_reference",
    "parse_metric_names",
    "reference_from_features",
    "save_reference",
    "score_features",
    "tf_bilinear_resize",
]
