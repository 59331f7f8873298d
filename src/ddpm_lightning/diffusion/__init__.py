"""Diffusion maths in pure torch: schedules, the Gaussian process, timestep samplers and reverse-chain samplers (no
Lightning, progress bars or files here)."""

from ddpm_lightning.diffusion.gaussian import (
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    OBJECTIVES,
    VARIANCES,
    Denoiser,
    GaussianDiffusion,
    LossType,
    LossWeighting,
    Prediction,
    extract,
)
from ddpm_lightning.diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from ddpm_lightning.diffusion.samplers import (
    SAMPLERS,
    SPACINGS,
    Guide,
    NoiseSource,
    Sampler,
    SamplerConfig,
    Spacing,
    sample,
    sampling_timesteps,
)
from ddpm_lightning.diffusion.schedules import SCHEDULES, make_betas
from ddpm_lightning.diffusion.timesteps import TIMESTEP_SAMPLINGS, LossSecondMomentSampler, TimestepSampling

__all__ = [
    "LOSS_TYPES",
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "TIMESTEP_SAMPLINGS",
    "VARIANCES",
    "Denoiser",
    "GaussianDiffusion",
    "Guide",
    "LossSecondMomentSampler",
    "LossType",
    "LossWeighting",
    "NoiseSource",
    "Prediction",
    "Sampler",
    "SamplerConfig",
    "Spacing",
    "TimestepSampling",
    "discretized_gaussian_log_likelihood",
    "extract",
    "make_betas",
    "mean_flat",
    "normal_kl",
    "sample",
    "sampling_timesteps",
]
