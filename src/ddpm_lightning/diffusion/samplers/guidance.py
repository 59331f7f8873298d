"""Guidance of any sampler: classifier-free guidance (Ho & Salimans 2021) of a class-conditional model and
autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") by a weaker model.

With class labels y and a guidance scale s the network is evaluated on the conditional and the null
("unconditional") labels in one batched forward, and the samplers step with eps~ = eps(x_t, null) + s (eps(x_t, y) -
eps(x_t, null)) (diffusers' convention: s = 1 is plain conditional sampling, s = 0 unconditional); see :func:`guided`.
Autoguidance guides with a weaker model of the same process instead: D_w = D_guide + w (D_main - D_guide), see
:class:`Guide`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ddpm_lightning.diffusion.gaussian import Denoiser, GaussianDiffusion, Prediction
from ddpm_lightning.diffusion.samplers.core import Evaluate


def guided(
    diffusion: GaussianDiffusion, model: Callable[..., torch.Tensor], y: torch.Tensor, null_label: int, scale: float
) -> Denoiser:
    """The denoiser ``(x_t, t) -> output`` of a class-conditional ``model(x_t, t, y=...)`` for labels y (B,), guided
    with scale s (Ho & Salimans 2021, Eq. 6, in diffusers' convention).

    s = 1: the conditional output, one forward. Otherwise the conditional and the unconditional (``null_label``)
    halves run in one batched forward and the mean channels become out(null) + s (out(y) - out(null)). This is
    guidance in the network's output space, whatever the objective: eps, x_0 and v are affine in the output with
    coefficients of (x_t, t) alone (:meth:`GaussianDiffusion.model_output_to_eps`), so it is the same as guiding
    eps~ = eps(null) + s (eps(y) - eps(null)). A learned variance keeps the conditional output's variance channels.
    """
    if scale == 1:
        return lambda x_t, t: model(x_t, t, y=y)
    null = torch.full_like(y, null_label)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null])).float()  # (2B, C', H, W)
        mean_cond, var_values = diffusion.split_output(output[: len(y)])
        mean_uncond, _ = diffusion.split_output(output[len(y) :])
        mean = mean_uncond + scale * (mean_cond - mean_uncond)
        return mean if var_values is None else torch.cat([mean, var_values], dim=1)

    return denoise


class Guide(NamedTuple):
    """The weaker model of autoguidance (Karras et al. 2024) with its own process: an earlier checkpoint of the same
    run or a smaller network, of the same T and betas; its objective and variance may differ from the main model's.

    With w = ``autoguidance_scale`` the samplers step with eps_w = eps_guide + w (eps_main - eps_guide). eps and x_0
    are affine in each other with the same coefficients of (x_t, t) for both models (the same process), so this is
    D_w = D_guide + w (D_main - D_guide) of the paper, whatever each network predicts (eps, x_0 or v). A learned
    variance stays the main model's."""

    diffusion: GaussianDiffusion
    model: Denoiser


def check_guide(diffusion: GaussianDiffusion, guide: Guide) -> None:
    """Refuse a guide whose process differs from the main model's (another T or other betas)."""
    T, T_guide = diffusion.num_timesteps, guide.diffusion.num_timesteps
    if T != T_guide:
        raise ValueError(
            f"the autoguidance guide has T = {T_guide}, the model T = {T}: the guide needs the same process"
        )
    if not torch.equal(diffusion.betas.cpu(), guide.diffusion.betas.cpu()):
        raise ValueError(
            "the autoguidance guide has another noise schedule (betas) than the model: the guide needs the same process"
        )


def evaluator(
    diffusion: GaussianDiffusion, model: Denoiser, guide: Guide | None, scale: float, batch: int, device: torch.device
) -> Evaluate:
    def evaluate(x_t: torch.Tensor, t_int: int) -> Prediction:
        t = torch.full((batch,), t_int, dtype=torch.long, device=device)
        prediction = diffusion.predict(model, x_t, t)
        if guide is None or scale == 1:
            return prediction
        eps_guide = guide.diffusion.predict(guide.model, x_t, t).eps
        return Prediction(eps_guide + scale * (prediction.eps - eps_guide), prediction.var_values)

    return evaluate
