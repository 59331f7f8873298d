"""Reverse-chain samplers behind one setting, :class:`SamplerConfig`, reproducible from seeds.

One file per sampler, each registering itself (:func:`register`) with its step factory and its own options:
``ddpm`` (:mod:`.ddpm`, Ho et al. 2020, Algorithm 2), ``ddim`` (:mod:`.ddim`, Song et al. 2021, Eq. 12),
``dpmpp_2m`` (:mod:`.dpmpp_2m`, Lu et al. 2022, Algorithm 2) and ``heun`` (:mod:`.heun`, Karras et al. 2022,
Algorithms 1-2, with :class:`HeunOptions`). :mod:`.core` holds the registry and the setting, :mod:`.loop` the
reverse chain (:func:`sample`), :mod:`.guidance` classifier-free guidance and autoguidance, :mod:`.noise` the
seeded noise. Adding a sampler is one new file that calls :func:`register` (imported here for the built-in ones).
"""

from ddpm_lightning.diffusion.samplers.core import (
    SAMPLERS,
    SPACINGS,
    Chain,
    Evaluate,
    Sampler,
    SamplerConfig,
    SamplerOptions,
    SamplerSpec,
    Spacing,
    Step,
    register,
    registered,
    sampling_timesteps,
    spec_of,
)
from ddpm_lightning.diffusion.samplers.ddim import ddim_step
from ddpm_lightning.diffusion.samplers.ddpm import ddpm_step
from ddpm_lightning.diffusion.samplers.dpmpp_2m import alpha_sigma_lambda, dpmpp_2m_step
from ddpm_lightning.diffusion.samplers.guidance import Guide, check_guide, guided
from ddpm_lightning.diffusion.samplers.heun import KARRAS_SIGMA_MAX, HeunOptions, heun_step, karras_sigmas
from ddpm_lightning.diffusion.samplers.loop import nearest_visited, sample
from ddpm_lightning.diffusion.samplers.noise import NoiseSource

__all__ = [
    "KARRAS_SIGMA_MAX",
    "SAMPLERS",
    "SPACINGS",
    "Chain",
    "Evaluate",
    "Guide",
    "HeunOptions",
    "NoiseSource",
    "Sampler",
    "SamplerConfig",
    "SamplerOptions",
    "SamplerSpec",
    "Spacing",
    "Step",
    "alpha_sigma_lambda",
    "check_guide",
    "ddim_step",
    "ddpm_step",
    "dpmpp_2m_step",
    "guided",
    "heun_step",
    "karras_sigmas",
    "nearest_visited",
    "register",
    "registered",
    "sample",
    "sampling_timesteps",
    "spec_of",
]
