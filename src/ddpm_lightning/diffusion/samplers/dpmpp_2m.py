"""``dpmpp_2m``: DPM-Solver++(2M) of Lu et al. 2022 (Algorithm 2), deterministic; uses the network's mean only."""

from __future__ import annotations

import math

import torch

from ddpm_lightning.diffusion.gaussian import GaussianDiffusion
from ddpm_lightning.diffusion.samplers.core import Chain, Evaluate, Step, register


def alpha_sigma_lambda(diffusion: GaussianDiffusion, t: int) -> tuple[float, float, float]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t) (half the log-SNR) of
    DPM-Solver, in float64; t < 0 is the clean data: (1, 0, inf)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    alpha, sigma = float(diffusion.sqrt_alphas_cumprod[t]), float(diffusion.sqrt_one_minus_alphas_cumprod[t])
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def dpmpp_2m_step(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_next: int,
    x0_prev: torch.Tensor | None = None,
    t_prev: int | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step x_t -> x_{t_next} (Lu et al. 2022, Algorithm 2), from the data prediction x0 at t
    and, for the second order, x0_prev at the previous timestep t_prev (None: first order, = DDIM eta 0).

    x_next = sigma_next / sigma_t x_t - alpha_next (exp(-h) - 1) D with h = lambda_next - lambda_t and
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = (lambda_t - lambda_prev) / h. ``t_next < 0`` is the clean data
    (sigma = 0, h = inf): that last step is first order and returns x0.
    """
    if t_next < 0:
        return x0
    alpha_next, sigma_next, lambda_next = alpha_sigma_lambda(diffusion, t_next)
    _, sigma_t, lambda_t = alpha_sigma_lambda(diffusion, t)
    h = lambda_next - lambda_t
    D = x0
    if x0_prev is not None:
        if t_prev is None:
            raise ValueError("dpmpp_2m_step with x0_prev needs its timestep t_prev")
        r = (lambda_t - alpha_sigma_lambda(diffusion, t_prev)[2]) / h
        D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    return sigma_next / sigma_t * x_t - alpha_next * math.expm1(-h) * D


def _dpmpp_2m(chain: Chain) -> Step:
    """Lu et al. 2022, Algorithm 2: deterministic, uses the network's mean (x0) only; a learned variance is
    ignored."""
    diffusion, timesteps = chain.diffusion, chain.timesteps
    previous: list[torch.Tensor] = []  # the data prediction at the previous timestep

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        eps = evaluate(x_t, timesteps[i]).eps
        x0 = diffusion.predict_x0_from_eps(x_t, torch.full((x_t.shape[0],), timesteps[i], device=x_t.device), eps)
        if chain.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x0_prev, t_prev = (previous[-1], timesteps[i - 1]) if previous else (None, None)
        previous[:] = [x0]
        return dpmpp_2m_step(diffusion, x0, x_t, timesteps[i], t_next, x0_prev=x0_prev, t_prev=t_prev)

    return step


register("dpmpp_2m", _dpmpp_2m, to_clean_data=True)
