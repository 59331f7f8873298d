"""Learned uncertainty weighting of the loss (EDM2, Karras et al. 2024, Sec. 5.1 and Eq. 21):

    L = E_t [ L_t / exp(u(t)) + u(t) ],

with L_t the per-example loss at timestep t and u a one-layer head on a Fourier embedding of the noise level. For a
fixed network the minimiser is u(t) = log E[L_t | t], so every t's loss is brought to the same scale while training:
the weighting adapts itself instead of being searched.

:class:`LossWeightingConfig` is a model's weighting setting: this one, min-SNR-gamma or none.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ddpm_lightning import choices
from ddpm_lightning.diffusion.gaussian import LossWeighting
from ddpm_lightning.settings import Setting

__all__ = ["LearnedLossWeight", "LossWeightingConfig"]


@dataclasses.dataclass(frozen=True)
class LossWeightingConfig(Setting):
    """The weighting of L_simple: ``"none"`` (the paper), ``"min_snr"`` (min-SNR-gamma, Hang et al. 2023, clipped at
    ``gamma``; see :class:`~ddpm_lightning.diffusion.GaussianDiffusion`) or ``"learned"`` (:class:`LearnedLossWeight`).

    In YAML: ``loss_weighting: {name: min_snr, gamma: 5.0}`` or a bare name, ``loss_weighting: min_snr``.
    """

    KEY, NAMES = "loss_weighting", choices.LOSS_WEIGHTINGS

    name: LossWeighting = "none"
    gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.name not in choices.LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {self.name!r}; allowed: {', '.join(choices.LOSS_WEIGHTINGS)}")
        if not self.gamma > 0:
            raise ValueError(f"loss_weighting.gamma must be > 0, got {self.gamma}")


class LearnedLossWeight(nn.Module):
    """u(t) = linear(sqrt(2) cos(2 pi (f c_noise(t) + p))), c_noise = log(sigma_t) / 4 with
    sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t) (EDM2's noise conditioning), f ~ N(0, 1) and
    p ~ U[0, 1) fixed features drawn from ``seed``. The linear starts at 0, so that at the start the loss is the
    unweighted one.

    Args:
        alphas_cumprod: (T,) the schedule's alphas_cumprod (float64).
        channels: Fourier features.
        seed: the features' seed (independent of the global RNG).
    """

    #: the timestep bins of :meth:`observe`'s running mean of the loss
    NUM_BINS = 25

    def __init__(self, alphas_cumprod: torch.Tensor, channels: int = 128, seed: int = 0):
        super().__init__()
        self.num_timesteps = len(alphas_cumprod)
        abar = alphas_cumprod.to(torch.float64).clamp(1e-12, 1 - 1e-12)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("c_noise", (0.125 * torch.log((1 - abar) / abar)).float(), persistent=False)
        self.register_buffer("freqs", torch.randn(channels, generator=generator), persistent=False)
        self.register_buffer("phases", torch.rand(channels, generator=generator), persistent=False)
        # the running mean of the loss per bin of t, for the curve beside u(t); no state of training
        self.register_buffer("loss_sum", torch.zeros(self.NUM_BINS), persistent=False)
        self.register_buffer("loss_count", torch.zeros(self.NUM_BINS), persistent=False)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """u(t) for integer timesteps t (B,), shape (B,)."""
        c = self.c_noise[t][:, None]
        features = math.sqrt(2) * torch.cos(2 * math.pi * (c * self.freqs + self.phases))
        return self.linear(features).squeeze(1)

    def weigh(self, losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t / exp(u(t)) + u(t) for per-example losses (B,) at timesteps t (B,)."""
        u = self(t)
        return losses / torch.exp(u) + u

    @torch.no_grad()
    def observe(self, losses: torch.Tensor, t: torch.Tensor, decay: float = 0.99) -> None:
        """Add per-example losses (B,) at t (B,) to the per-bin running means (on the device: no host sync)."""
        bins = t * self.NUM_BINS // self.num_timesteps
        self.loss_sum.mul_(decay).index_add_(0, bins, losses.detach().float())
        self.loss_count.mul_(decay).index_add_(0, bins, torch.ones_like(losses, dtype=torch.float32))

    @torch.no_grad()
    def curve(self) -> dict[str, list[float]]:
        """u(t) at every t, and the log of the running mean loss per bin (NaN for a bin not seen yet) at the bins'
        centres: the curves that u(t) follows as it learns."""
        t = torch.arange(self.num_timesteps, device=self.freqs.device)
        centres = (torch.arange(self.NUM_BINS, dtype=torch.float64) + 0.5) * self.num_timesteps / self.NUM_BINS
        mean = (self.loss_sum / self.loss_count.clamp(min=1e-12)).cpu()
        log_mean = torch.where(self.loss_count.cpu() > 0, mean.clamp(min=1e-12).log(), torch.nan)
        return {
            "t": t.tolist(),
            "u": self(t).float().cpu().tolist(),
            "bin_t": centres.tolist(),
            "log_loss": log_mean.tolist(),
        }
