"""``ddpm``: the ancestral sampler of Ho et al. 2020 (Algorithm 2), on the full chain or on a strided sub-chain with
respaced betas (Nichol & Dhariwal 2021, Sec. 4). With a learned variance (improved DDPM) it uses it."""

from __future__ import annotations

import torch

from ddpm_lightning.diffusion.gaussian import GaussianDiffusion, as_timesteps
from ddpm_lightning.diffusion.samplers.core import Chain, Evaluate, Step, register


def ddpm_step(
    diffusion: GaussianDiffusion,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor,
    clip_denoised: bool = True,
    var_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} of p(x_{t-1} | x_t) (Algorithm 2), given the predicted eps.

    The mean is the posterior mean (Eq. 7) at the predicted x_0, optionally clipped to [-1, 1] as in Ho et al.'s
    code; without clipping it equals Eq. 11. The variance is beta_t (fixed_large), beta~_t (fixed_small) or the
    learned one from the network's variance channels ``var_values`` (:meth:`GaussianDiffusion.log_variance`); no noise
    is added where t == 0.
    """
    t = as_timesteps(t, x_t)
    x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _, _ = diffusion.q_posterior(x0, x_t, t)
    log_variance = diffusion.log_variance(var_values, x_t, t)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * log_variance) * noise


def _ancestral(chain: Chain) -> Step:
    """Algorithm 2; on a sub-chain it steps through the respaced process, indexed 0..n-1 from low to high t.

    A learned variance is used as learned: on a sub-chain its Eq. 15 interpolates between the respaced beta'_t and
    beta~'_t (Nichol & Dhariwal 2021, Sec. 4)."""
    diffusion, timesteps = chain.diffusion, chain.timesteps
    respaced = len(timesteps) < diffusion.num_timesteps
    process = diffusion.respaced(timesteps) if respaced else diffusion

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        eps, var_values = evaluate(x_t, timesteps[i])
        t = len(timesteps) - 1 - i if respaced else timesteps[i]
        noise = chain.noise.draw(chain.device)
        return ddpm_step(process, eps, x_t, t, noise, clip_denoised=chain.clip_denoised, var_values=var_values)

    return step


register("ddpm", _ancestral)
