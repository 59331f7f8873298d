"""Noise schedules beta_1..beta_T, computed in float64, and the setting that names one (:class:`NoiseSchedule`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from ddpm_lightning import choices
from ddpm_lightning.settings import Setting

SCHEDULES = choices.SCHEDULES
ScheduleName = Literal[choices.SCHEDULES]  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule(Setting):
    """The noise schedule setting of a model: a name and its constants (:func:`make_betas`); T is the model's own
    ``num_timesteps``.

    Args:
        name: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021).
        beta_start, beta_end: the linear schedule's endpoints at T = 1000 (rescaled by 1000 / T for other T).
        cosine_s: the cosine schedule's offset s.

    In YAML: ``schedule: {name: linear, beta_start: 1.0e-4, beta_end: 0.02}`` or a bare name, ``schedule: cosine``.
    """

    KEY, NAMES = "schedule", SCHEDULES

    name: ScheduleName = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; allowed: {', '.join(SCHEDULES)}")
        if not self.cosine_s >= 0:
            raise ValueError(f"schedule.cosine_s must be >= 0, got {self.cosine_s}")

    def betas(self, num_timesteps: int) -> torch.Tensor:
        """beta_1..beta_T in float64 (:func:`make_betas`)."""
        return make_betas(
            self.name, num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end, cosine_s=self.cosine_s
        )


def make_betas(
    schedule: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the float64 betas of shape (num_timesteps,) for a named schedule.

    - ``"linear"`` (Ho et al. 2020, Sec. 4): ``linspace(beta_start, beta_end, T)``. For T other than 1000 the
      endpoints are rescaled by ``1000 / T`` (as in Nichol & Dhariwal 2021), so that abar_T stays close to zero and
      the process keeps the same total amount of noise.
    - ``"cosine"`` (Nichol & Dhariwal 2021, Eq. 17): abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s=0.008,
      beta_t = 1 - abar(t)/abar(t-1), clipped at ``max_beta`` = 0.999 to avoid singularities near t = T.
    """
    if num_timesteps <= 0:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}")
    T = int(num_timesteps)
    if schedule == "linear":
        scale = 1000.0 / T
        lo, hi = beta_start * scale, beta_end * scale
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1 after rescaling by 1000/T, "
                f"got beta_start={lo}, beta_end={hi} for num_timesteps={T}"
            )
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(max=max_beta)
    raise ValueError(f"unknown noise schedule {schedule!r}; known schedules: {', '.join(SCHEDULES)}")
