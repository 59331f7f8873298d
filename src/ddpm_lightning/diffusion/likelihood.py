"""Log-likelihood pieces of the variational bound, in nats, elementwise (names as in improved-diffusion).

``normal_kl`` is the KL between two diagonal Gaussians (the bound's L_1..L_{T-1} and L_T); the discretized Gaussian is
Ho et al. 2020's decoder L_0 (their Eq. 13) for data in [-1, 1] on the 256-level grid of 8-bit images.
"""

from __future__ import annotations

import torch

__all__ = ["discretized_gaussian_log_likelihood", "mean_flat", "normal_kl"]

#: half the width of one of the 256 bins of [-1, 1]
HALF_BIN = 1.0 / 255.0


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats:
    0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)."""
    tensor = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor))
    mean1, logvar1, mean2, logvar2 = (
        torch.as_tensor(x, dtype=tensor.dtype, device=tensor.device) for x in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_bin_probability(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised bounds, from the tail nearer to the bin (no cancellation)."""
    upper_tail = lower > 0  # both bounds in the upper tail: Phi(-lower) - Phi(-upper)
    a = torch.where(upper_tail, -upper, lower)
    b = torch.where(upper_tail, -lower, upper)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b)))
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=0.0))).clamp(min=-1e4)


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise, in nats, of the bin of x under N(means, exp(log_scales)^2) discretized on 256 levels.

    x lies on the grid of [-1, 1] (x = 2 k / 255 - 1, k = 0..255); the bin of x is [x - 1/255, x + 1/255], except
    the edge bins, which are open-ended: (-inf, -1 + 1/255] and [1 - 1/255, inf) (Ho et al. 2020, Eq. 13), so that
    the 256 probabilities sum to 1.
    """
    if not x.shape == means.shape:
        raise ValueError(f"x and means must have the same shape, got {tuple(x.shape)} and {tuple(means.shape)}")
    inv_std = torch.exp(-log_scales)
    centered = x - means
    upper = torch.where(x > 1.0 - HALF_BIN, torch.full_like(x, torch.inf), (centered + HALF_BIN) * inv_std)
    lower = torch.where(x < -1.0 + HALF_BIN, torch.full_like(x, -torch.inf), (centered - HALF_BIN) * inv_std)
    return _log_bin_probability(lower, upper)
