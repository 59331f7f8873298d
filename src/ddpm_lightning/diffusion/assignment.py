"""Minimum-distance noise assignment within a batch (Immiscible Diffusion, Li et al. 2024): the batch's noise draws
are permuted so that the total distance between each image and its noise is smallest (a linear assignment), which
shortens the paths that training pairs images with."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["assign_noise"]


@torch.no_grad()
def assign_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` (B, ...) permuted along the batch so that sum_i ||x0_i - noise_i|| is smallest (each draw used
    once): the marginal of every draw is still N(0, I)."""
    if x0.shape != noise.shape:
        raise ValueError(f"images {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float())  # (B, B)
    _, columns = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(columns, device=noise.device)]
