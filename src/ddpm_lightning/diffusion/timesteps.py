"""Which timesteps a training step sees, and with which weights.

- ``uniform``: t ~ Uniform{0..T-1} (Ho et al. 2020).
- ``loss_second_moment``: p_t proportional to sqrt(E[L_t^2]) (Nichol & Dhariwal 2021, Sec. 3.3), with weights
  1 / (T p_t) so that the weighted loss estimates the uniform one without bias.
- ``logit_normal``: t = floor(sigmoid(u) T) clipped to T-1, u ~ N(loc, scale^2) (Esser et al. 2024, Sec. 3.1).
- ``laplace``: lambda ~ Laplace(loc, scale) on the log-SNR lambda_t = log(abar_t / (1 - abar_t)), mapped to the t
  whose lambda_t is nearest (Hang et al. 2024).

The drawn distribution of ``logit_normal`` and ``laplace`` is the loss weighting (unweighted, weights 1); with
``unbiased`` they return the importance weights 1 / (T p_t) instead, as ``loss_second_moment`` does by default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

__all__ = [
    "TIMESTEP_SAMPLINGS",
    "LaplaceSampler",
    "LogitNormalSampler",
    "LossSecondMomentSampler",
    "TimestepSampling",
    "TimestepSamplingConfig",
]

TimestepSampling = Literal["uniform", "loss_second_moment", "logit_normal", "laplace"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
#: (loc, scale) when not given: SD3's m = 0, s = 1; Hang et al.'s mu = 0, b = 0.5
_DEFAULT_LOC_SCALE = {"logit_normal": (0.0, 1.0), "laplace": (0.0, 0.5)}


@dataclass(frozen=True)
class TimestepSamplingConfig:
    """How training draws t: one validated setting (``model.timestep_sampling``).

    Args:
        name: one of :data:`TIMESTEP_SAMPLINGS`.
        loc, scale: the location and scale of ``logit_normal`` (of u, in logit space; default 0, 1) and ``laplace``
            (of lambda, the log-SNR; default 0, 0.5); the other distributions take none. scale > 0.
        unbiased: weight each loss by 1 / (T p_t), so that the mean estimates the uniform-t loss. None: the
            distribution's default (True for ``loss_second_moment``, whose p_t follows the loss; False for the
            others, whose p_t is the loss weighting).

    In YAML: ``timestep_sampling: {name: logit_normal, loc: 0.0, scale: 1.0}``; a bare name takes the defaults.
    """

    name: TimestepSampling = "uniform"
    loc: float | None = None
    scale: float | None = None
    unbiased: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {self.name!r}; allowed: {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.name not in _DEFAULT_LOC_SCALE:
            if self.loc is not None or self.scale is not None:
                raise ValueError(
                    f"timestep_sampling {self.name!r} takes no loc or scale (got loc={self.loc}, scale={self.scale}); "
                    f"only {', '.join(_DEFAULT_LOC_SCALE)} do"
                )
        else:
            loc, scale = _DEFAULT_LOC_SCALE[self.name]
            loc = loc if self.loc is None else self.loc
            scale = scale if self.scale is None else self.scale
            for key, value in (("loc", loc), ("scale", scale)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"timestep_sampling {key} must be a finite number, got {value!r}")
            if not scale > 0:
                raise ValueError(f"timestep_sampling scale must be > 0, got {scale}")
            object.__setattr__(self, "loc", float(loc))
            object.__setattr__(self, "scale", float(scale))
        if self.unbiased is not None and not isinstance(self.unbiased, bool):
            raise ValueError(f"timestep_sampling unbiased must be true, false or null, got {self.unbiased!r}")
        if self.unbiased is None:
            object.__setattr__(self, "unbiased", self.name == "loss_second_moment")

    @classmethod
    def parse(cls, value: TimestepSamplingConfig | Mapping[str, Any] | str | None) -> TimestepSamplingConfig:
        """A setting from a setting, a mapping (YAML), a bare name or None (uniform)."""
        if isinstance(value, TimestepSamplingConfig):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(
                    f"unknown timestep_sampling key(s) {', '.join(unknown)}; allowed: name, loc, scale, unbiased"
                )
            return cls(**value)
        if isinstance(value, str):
            return cls(name=value)  # type: ignore[arg-type]
        if value is None:
            return cls()
        raise ValueError(f"a timestep_sampling setting must be a mapping or a name, got {value!r}")

    def to_setting(self) -> str | dict[str, Any]:
        """Plain types for hyper-parameters: the bare name when nothing else differs from the name's defaults (so
        that the settings of earlier runs read as they always have), else a mapping."""
        fields = {"name": self.name}
        if self.name in _DEFAULT_LOC_SCALE:
            fields.update(loc=self.loc, scale=self.scale)
        if self.unbiased != (self.name == "loss_second_moment"):
            fields["unbiased"] = self.unbiased
        return self.name if len(fields) == 1 else fields

    def build(
        self, alphas_cumprod: torch.Tensor
    ) -> LossSecondMomentSampler | LogitNormalSampler | LaplaceSampler | None:
        """The sampler for a schedule (float64 abar_t of shape (T,)); None for ``uniform`` (the training loss draws
        t itself)."""
        T = alphas_cumprod.numel()
        if self.name == "uniform":
            return None
        if self.name == "loss_second_moment":
            return LossSecondMomentSampler(T, unbiased=bool(self.unbiased))
        if self.name == "logit_normal":
            return LogitNormalSampler(T, self.loc, self.scale, unbiased=bool(self.unbiased))
        return LaplaceSampler(alphas_cumprod, self.loc, self.scale, unbiased=bool(self.unbiased))


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def _laplace_cdf(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    z = (x - loc) / scale
    return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1.0 - 0.5 * torch.exp(-z.clamp(min=0)))


class _FixedDistribution:
    """A p_t fixed at construction (float64, shape (T,)): no state, nothing to gather across processes."""

    stateful = False

    def __init__(self, probabilities: torch.Tensor, unbiased: bool) -> None:
        self.num_timesteps = probabilities.numel()
        self._p = probabilities
        self.unbiased = unbiased
        if unbiased and not bool((probabilities > 0).all()):
            zero = int((probabilities == 0).sum())
            raise ValueError(
                f"unbiased timestep weights 1 / (T p_t) need p_t > 0 at every t, but {zero} of the "
                f"{self.num_timesteps} timesteps have p_t = 0 in float64: widen the scale or set unbiased: false"
            )

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 of shape (T,)."""
        return self._p

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` timesteps (long) and their weights (float32): 1, or 1 / (T p_t) when ``unbiased``. Drawn
        on the CPU (from ``generator``, else the global RNG) and moved to ``device``."""
        t = self._draw(batch_size, generator)
        if self.unbiased:
            weights = (1.0 / (self.num_timesteps * self._p[t])).float()
        else:
            weights = torch.ones(batch_size)
        return t.to(device), weights.to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Nothing to learn from the losses."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore (a checkpoint of another sampler's state is ignored)."""


class LogitNormalSampler(_FixedDistribution):
    """t = min(floor(sigmoid(u) T), T - 1) with u ~ N(loc, scale^2): the logit-normal density of SD3 (Esser et al.
    2024, Eq. 19) on the integer grid, where t = k takes sigmoid(u) in [k/T, (k+1)/T), so
    P(t = k) = Phi((logit((k+1)/T) - loc) / scale) - Phi((logit(k/T) - loc) / scale)."""

    def __init__(self, num_timesteps: int, loc: float = 0.0, scale: float = 1.0, unbiased: bool = False) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.loc, self.scale = float(loc), float(scale)
        T = num_timesteps
        edges = torch.arange(T + 1, dtype=torch.float64) / T
        cdf = _normal_cdf((torch.logit(edges) - self.loc) / self.scale)  # logit(0) = -inf, logit(1) = +inf
        super().__init__(cdf[1:] - cdf[:-1], unbiased)

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        u = self.loc + self.scale * torch.randn(batch_size, dtype=torch.float64, generator=generator)
        return (torch.sigmoid(u) * self.num_timesteps).floor().long().clamp(0, self.num_timesteps - 1)


class LaplaceSampler(_FixedDistribution):
    """lambda ~ Laplace(loc, scale) on the log-SNR (Hang et al. 2024), mapped to the t whose
    lambda_t = log(abar_t / (1 - abar_t)) is nearest: t = k takes lambda between the midpoints of lambda_k and its
    neighbours (lambda_t decreases with t), so P(t = k) = F(mid_{k-1,k}) - F(mid_{k,k+1}) with F the Laplace CDF
    and the outer midpoints +inf and -inf."""

    def __init__(
        self, alphas_cumprod: torch.Tensor, loc: float = 0.0, scale: float = 0.5, unbiased: bool = False
    ) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.dim() != 1 or abar.numel() == 0 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1)")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.loc, self.scale = float(loc), float(scale)
        self.log_snr = torch.log(abar) - torch.log1p(-abar)  # lambda_t, decreasing in t
        if abar.numel() > 1 and not bool((self.log_snr[1:] < self.log_snr[:-1]).all()):
            raise ValueError("the schedule's log-SNR must decrease with t")
        # the grid in increasing order of -lambda, and the midpoints between neighbours
        self._edges = -0.5 * (self.log_snr[1:] + self.log_snr[:-1])
        inf = torch.tensor([math.inf], dtype=torch.float64)
        upper = torch.cat([inf, -self._edges])  # lambda above which t < k
        lower = torch.cat([-self._edges, -inf])
        cdf = _laplace_cdf
        super().__init__(cdf(upper, self.loc, self.scale) - cdf(lower, self.loc, self.scale), unbiased)

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        # inverse CDF: lambda = loc - scale sign(v) log(1 - 2|v|), v = U(0, 1) - 1/2
        v = torch.rand(batch_size, dtype=torch.float64, generator=generator) - 0.5
        log_snr = self.loc - self.scale * torch.sign(v) * torch.log1p(-2.0 * v.abs())
        return torch.searchsorted(self._edges, -log_snr)


class LossSecondMomentSampler:
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses seen at each t, mixed with the uniform
    distribution (weight ``uniform_prob``); uniform until every t has ``history`` losses (improved DDPM Sec. 3.3).

    The state (``history`` of shape (T, K), ``counts`` of shape (T,)) changes only through :meth:`update`: feed it the
    same losses on every process (all of them, gathered) and every process samples from the same p_t. All updates
    run on the device (no host sync). ``unbiased`` False drops the weights 1 / (T p_t) (weights 1).
    """

    stateful = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3, unbiased: bool = True):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        if history < 1:
            raise ValueError(f"history must be a positive number of losses per timestep, got {history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.num_timesteps = num_timesteps
        self.uniform_prob = uniform_prob
        self.unbiased = unbiased
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
        losses then estimates the uniform mean without bias (weights 1 when not ``unbiased``)."""
        self.to(device)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        if not self.unbiased:
            return t, torch.ones(batch_size, device=t.device)
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
        """Restore the history; an empty state (a checkpoint of a stateless sampler) leaves it empty."""
        if not state:
            return
        if tuple(state["history"].shape) != tuple(self.history.shape):
            raise ValueError(
                f"the checkpoint's timestep history has shape {tuple(state['history'].shape)}, this run's "
                f"{tuple(self.history.shape)} (num_timesteps x history)"
            )
        device = self.history.device
        self.history = state["history"].to(device, torch.float64)
        self.counts = state["counts"].to(device, torch.long)
