"""Diffusion maths in pure torch: schedules, the Gaussian process and samplers (no Lightning here)."""

from ddpm_lightning.diffusion.gaussian import OBJECTIVES, VARIANCES, Denoiser, GaussianDiffusion, extract
from ddpm_lightning.diffusion.samplers import (
    SAMPLERS,
    SPACINGS,
    NoiseSource,
    Sampler,
    SamplerConfig,
    Spacing,
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
    "Denoiser",
    "GaussianDiffusion",
    "NoiseSource",
    "Sampler",
    "SamplerConfig",
    "Spacing",
    "extract",
    "make_betas",
    "sample",
    "sampling_timesteps",
]
