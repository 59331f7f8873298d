"""Evaluation metrics: offline Inception-v3 weights for FID."""

from ddpm_lightning.metrics.inception_weights import (
    FID_WEIGHTS_FILENAME,
    build_fid_extractor,
    check_fid_weights,
    convert_fid_helper_weights,
    fid_weights_main,
    find_cached_weights,
    missing_weights_message,
    prepare_fid_weights,
    resolve_fid_weights,
)

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "build_fid_extractor",
    "check_fid_weights",
    "convert_fid_helper_weights",
    "fid_weights_main",
    "find_cached_weights",
    "missing_weights_message",
    "prepare_fid_weights",
    "resolve_fid_weights",
]
