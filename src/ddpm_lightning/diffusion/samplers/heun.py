"""``heun``: Karras et al. 2022 (Algorithms 1 and 2), 2nd order on the probability-flow ODE in the sigma
parameterisation of the process (:meth:`GaussianDiffusion.sigmas`), with Karras spacing and optional churn noise, in
its own options (:class:`HeunOptions`); uses the network's mean only."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm_lightning.diffusion.gaussian import GaussianDiffusion
from ddpm_lightning.diffusion.samplers.core import Chain, Evaluate, SamplerConfig, SamplerOptions, Step, register

#: Karras et al. 2022 cap sigma_max at 80 for CIFAR-10; the linear schedule's last sigma is ~157, the cosine's ~2e4
KARRAS_SIGMA_MAX = 80.0


@dataclass(frozen=True)
class HeunOptions(SamplerOptions):
    """Heun's settings (Karras et al. 2022, Algorithm 2): the spacing's rho, the largest sigma (None: the
    schedule's, capped at 80) and the churn noise (S_churn, S_tmin, S_tmax, S_noise)."""

    rho: float = 7.0
    sigma_max: float | None = None
    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if self.sigma_max is not None and not self.sigma_max > 0:
            raise ValueError(f"sigma_max must be > 0 or None (the schedule's, capped at 80), got {self.sigma_max}")
        if not (self.S_churn >= 0 and self.S_noise >= 0 and 0 <= self.S_tmin <= self.S_tmax):
            raise ValueError(
                f"Heun's churn needs S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax, got S_churn={self.S_churn}"
                f", S_noise={self.S_noise}, S_tmin={self.S_tmin}, S_tmax={self.S_tmax}"
            )

    def label(self) -> str:
        return f"_churn{self.S_churn:g}" if self.S_churn > 0 else ""


def karras_sigmas(
    diffusion: GaussianDiffusion, num_steps: int, rho: float = 7.0, sigma_max: float | None = None
) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i = 0..N-1, each rounded to the nearest sigma of the schedule (their ``iDDPMPrecond.round_sigma``), float64,
    high to low, without the final 0. sigma_min is the schedule's smallest (t = 0); sigma_max the schedule's largest
    capped at 80, or ``sigma_max`` (also capped by the schedule's largest)."""
    sigmas = diffusion.sigmas
    largest = float(sigmas[-1])
    s_max = min(largest, KARRAS_SIGMA_MAX if sigma_max is None else float(sigma_max))
    s_min = float(sigmas[0])
    if num_steps == 1:
        levels = torch.tensor([s_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        levels = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return diffusion.round_sigma(levels.to(sigmas.device))


def heun_step(
    denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    """One step of Karras et al. 2022, Algorithm 1 (lines 4-8) on dx/dsigma = (x - D(x; sigma)) / sigma, in the
    sigma parameterisation x = x_0 + sigma eps: an Euler step to ``sigma_next``, corrected with the slope there
    (the trapezoidal rule) unless ``sigma_next`` is 0. ``denoise(x, sigma)`` is D, the x_0 prediction."""
    d = (x - denoise(x, sigma)) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_next
    d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)


def _heun(chain: Chain) -> Step:
    """Karras et al. 2022, Algorithm 2 (Algorithm 1 when S_churn = 0) on the VP process seen through its sigmas.

    The state between steps is the process's x_t; a step works on x = x_t sqrt(1 + sigma_t^2) = x_0 + sigma_t eps
    (the first from x = sigma_0 x_T: Algorithm 1's x_0 ~ N(0, sigma_0^2 I)). D(x; sigma) = x - sigma eps(x_t, t) is
    the x_0 prediction of the network evaluated at the timestep t of sigma (the sigmas are rounded to the
    schedule's grid, as EDM's ``iDDPMPrecond``), clipped to [-1, 1] when asked. Churn: at a level sigma in
    [S_tmin, S_tmax] noise raises it to sigma^ = round(sigma (1 + gamma)), gamma = min(S_churn / N, sqrt(2) - 1),
    before the step (Algorithm 2, lines 4-6)."""
    diffusion, config = chain.diffusion, chain.config
    options = _options(config)
    sigmas = _heun_sigmas(diffusion, config)  # (N,) float64, high to low
    levels = [*sigmas.tolist(), 0.0]
    gamma = min(options.S_churn / len(sigmas), math.sqrt(2.0) - 1.0)

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = int(diffusion.timestep_of_sigma(torch.tensor(sigma, dtype=torch.float64)))
            eps = evaluate(x / math.sqrt(1.0 + sigma**2), t).eps
            x0 = x - sigma * eps
            return x0.clamp(-1.0, 1.0) if chain.clip_denoised else x0

        sigma, sigma_next = levels[i], levels[i + 1]
        x = x_t * (sigma if i == 0 else math.sqrt(1.0 + sigma**2))
        if gamma > 0 and options.S_tmin <= sigma <= options.S_tmax:
            sigma_hat = float(diffusion.round_sigma(torch.tensor(sigma * (1 + gamma), dtype=torch.float64)))
            noise = chain.noise.draw(chain.device)
            x = x + math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * options.S_noise * noise
            sigma = sigma_hat
        x_next = heun_step(denoise, x, sigma, sigma_next)
        return x_next / math.sqrt(1.0 + sigma_next**2)

    return step


def _heun_sigmas(diffusion: GaussianDiffusion, config: SamplerConfig) -> torch.Tensor:
    options = _options(config)
    return karras_sigmas(diffusion, config.num_steps(diffusion.num_timesteps), options.rho, options.sigma_max)


def _options(config: SamplerConfig) -> HeunOptions:
    if not isinstance(config.options, HeunOptions):
        raise TypeError(f"heun needs HeunOptions, got {config.options!r}")
    return config.options


def _heun_visited(diffusion: GaussianDiffusion, config: SamplerConfig) -> list[int]:
    return diffusion.timestep_of_sigma(_heun_sigmas(diffusion, config)).tolist()


register(
    "heun",
    _heun,
    spacings=("karras",),
    options=HeunOptions,
    # N steps: two evaluations each, but one for the last (an Euler step to sigma = 0)
    evaluations=lambda steps: 2 * steps - 1,
    visited=_heun_visited,
)
