"""Diffusion maths in pure torch: schedules, the Gaussian process and samplers (no Lightning here)."""

from ddpm_lightning.diffusion.gaussian import OBJECTIVES, VARIANCES, GaussianDiffusion, extract
from ddpm_lightning.diffusion.samplers import (
    SAMPLERS,
    SPACINGS,
    NoiseSource,
    Sampler,
    Spacing,
    check_sampler,
    sample,
    sampling_timesteps,
)
from ddpm_lightning.diffusion.schedules import SCHEDULES, make_betas

__all__ = [
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "VARIANCES",
    "GaussianDiffusion",
    "NoiseSource",
    "Sampler",
    "Spacing",
    "check_sampler",
    "extract",
    "make_betas",
    "sample",
    "sampling_timesteps",
]
