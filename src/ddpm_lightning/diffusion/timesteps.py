"""Which timesteps a training step sees: uniform (Ho et al. 2020) or importance-sampled by the loss's second moment
(Nichol & Dhariwal 2021, Sec. 3.3), whose estimate of the summed loss stays unbiased through weights 1 / (T p_t)."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["TIMESTEP_SAMPLINGS", "LossSecondMomentSampler", "TimestepSampling"]

TimestepSampling = Literal["uniform", "loss_second_moment"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "loss_second_moment")


class LossSecondMomentSampler:
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses seen at each t, mixed with the uniform
    distribution (weight ``uniform_prob``); uniform until every t has ``history`` losses (improved DDPM Sec. 3.3).

    The state (``history`` of shape (T, K), ``counts`` of shape (T,)) changes only through :meth:`update`: feed it the
    same losses on every process (all of them, gathered) and every process samples from the same p_t. All updates
    run on the device (no host sync).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        if history < 1:
            raise ValueError(f"history must be a positive number of losses per timestep, got {history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.num_timesteps = num_timesteps
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def to(self, device: torch.device | str) -> LossSecondMomentSampler:
        self.history, self.counts = self.history.to(device), self.counts.to(device)
        return self

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 of shape (T,): uniform until warmed up (every t has a full history)."""
        T = self.num_timesteps
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64, device=self.history.device)
        weights = self.history.pow(2).mean(dim=1).sqrt()
        weights = weights / weights.sum().clamp_min(torch.finfo(torch.float64).tiny)
        importance = weights * (1.0 - self.uniform_prob) + self.uniform_prob / T
        warmed_up = (self.counts >= self.history.shape[1]).all()
        return torch.where(warmed_up, importance, uniform)

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` timesteps t ~ p_t and their weights 1 / (T p_t) (float32): the weighted mean of per-example
        losses then estimates the uniform mean without bias."""
        self.to(device)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each loss to its timestep's history (in the given order; the oldest drop out)."""
        t = t.reshape(-1).to(self.history.device)
        losses = losses.reshape(-1).to(self.history)
        T, K = self.history.shape
        n = torch.bincount(t, minlength=T)  # new losses per timestep
        # the old entries shift left by the number of new ones
        shift = n.clamp(max=K)
        index = torch.arange(K, device=t.device) + shift[:, None]
        history = torch.where(index < K, self.history.gather(1, index.clamp(max=K - 1)), 0.0)
        # the rank of each loss among those of its timestep, in the given order; the last K of each timestep stay
        order = torch.sort(t, stable=True).indices
        start = torch.cumsum(n, 0) - n
        rank = torch.empty_like(t)
        rank[order] = torch.arange(t.numel(), device=t.device) - start[t[order]]
        position = K - (n[t] - rank)
        keep = position >= 0
        history[t[keep], position[keep]] = losses[keep]
        self.history = history
        self.counts = (self.counts + n).clamp(max=K)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["history"].shape) != tuple(self.history.shape):
            raise ValueError(
                f"the checkpoint's timestep history has shape {tuple(state['history'].shape)}, this run's "
                f"{tuple(self.history.shape)} (num_timesteps x history)"
            )
        device = self.history.device
        self.history = state["history"].to(device, torch.float64)
        self.counts = state["counts"].to(device, torch.long)
