"""``ddim``: Song et al. 2021 (Eq. 12), eta >= 0 (the setting's ``eta``); uses the network's mean only."""

from __future__ import annotations

import torch

from ddpm_lightning.diffusion.gaussian import GaussianDiffusion, as_timesteps
from ddpm_lightning.diffusion.samplers.core import Chain, Evaluate, Step, register


def ddim_step(
    diffusion: GaussianDiffusion,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12); ``t_prev < 0`` means abar_prev = 1.

    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev) (Eq. 16): eta = 0 is
    deterministic, eta = 1 with t_prev = t - 1 is the DDPM posterior variance beta~_t.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t = as_timesteps(t, x_t)
    t_prev = as_timesteps(t_prev, x_t)
    x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = diffusion.predict_eps_from_x0(x_t, t, x0)
    abar_t = diffusion.abar(t, x_t)
    abar_prev = diffusion.abar(t_prev, x_t)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


def _ddim(chain: Chain) -> Step:
    """Song et al. 2021, Eq. 12: uses the network's mean (eps) only; a learned variance is ignored (sigma from eta)."""
    timesteps, eta = chain.timesteps, chain.config.eta

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        eps = evaluate(x_t, timesteps[i]).eps
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        noise = chain.noise.draw(chain.device) if eta > 0 else None
        return ddim_step(
            chain.diffusion, eps, x_t, timesteps[i], t_next, eta=eta, noise=noise, clip_denoised=chain.clip_denoised
        )

    return step


register("ddim", _ddim, uses_eta=True)
