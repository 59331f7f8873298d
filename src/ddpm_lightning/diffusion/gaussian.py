"""The Gaussian diffusion process of Ho et al. 2020: forward noising, posterior, loss and one reverse step.

Buffers are named after the paper's symbols (and Ho et al.'s ``diffusion_utils_2.py``), computed once in float64
and gathered per batch by :func:`extract`. Equation numbers refer to Ho et al. 2020 unless stated otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lightning.diffusion import samplers

Variance = Literal["fixed_large", "fixed_small"]
Objective = Literal["eps", "x0", "v"]
VARIANCES = ("fixed_large", "fixed_small")
OBJECTIVES = ("eps", "x0", "v")

#: ``model(x_t, t) -> prediction`` with x_t of shape (B, C, H, W) and t of shape (B,) (int64).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(buffer: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather ``buffer[t]`` for a batch of timesteps and shape it to broadcast against ``x`` (in x's dtype)."""
    out = buffer.to(t.device)[t].to(x.dtype)  # (B,)
    return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def _as_timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return t.to(device=x.device, dtype=torch.long)


class GaussianDiffusion(nn.Module):
    """Forward process q(x_t | x_0), its posterior, L_simple and the reverse steps of DDPM, DDIM and DPM-Solver++.

    Args:
        betas: float64 noise schedule of shape (T,), e.g. from :func:`make_betas`.
        variance: reverse-process variance sigma_t^2: ``"fixed_large"`` = beta_t (the paper's CIFAR-10 choice) or
            ``"fixed_small"`` = beta~_t, the posterior variance (Eq. 7).
        objective: what the network predicts: ``"eps"`` (the paper), ``"x0"``, or ``"v"`` (Salimans & Ho 2022).
    """

    def __init__(self, betas: torch.Tensor, variance: Variance = "fixed_large", objective: Objective = "eps"):
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1)")
        self.variance = variance
        self.objective = objective
        self.num_timesteps = betas.numel()

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # beta~_0 = 0: clip the log at t = 0 with beta~_1, as in Ho et al.'s code
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            # Eq. 7: mu~_t = coef1 * x_0 + coef2 * x_t
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            # not persistent: the schedule is rebuilt from the hyper-parameters, checkpoints stay small
            self.register_buffer(name, value, persistent=False)
        # float32 copies of Eq. 4's coefficients, rounded once from float64: the training step runs no float64 kernel
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            self.register_buffer(f"{name}_f32", buffers[name].float(), persistent=False)

    # ----------------------------------------------------------------------------------------------- forward
    def _eq4_coefficients(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) for a batch, from the float64 tables only when x is float64."""
        if x.dtype == torch.float64:
            return extract(self.sqrt_alphas_cumprod, t, x), extract(self.sqrt_one_minus_alphas_cumprod, t, x)
        return extract(self.sqrt_alphas_cumprod_f32, t, x), extract(self.sqrt_one_minus_alphas_cumprod_f32, t, x)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        sqrt_abar, sqrt_one_minus_abar = self._eq4_coefficients(t, x0)
        return sqrt_abar * x0 + sqrt_one_minus_abar * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eqs. 6-7: mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------- parameterisations
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4 for eps: eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses for the configured objective; v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x0
        sqrt_abar, sqrt_one_minus_abar = self._eq4_coefficients(t, x0)
        return sqrt_abar * noise - sqrt_one_minus_abar * x0

    def model_output_to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the network's output, whatever the objective, to an eps prediction (the samplers' input)."""
        if self.objective == "eps":
            return output
        if self.objective == "x0":
            return self.predict_eps_from_x0(x_t, t, output)
        # eps = sqrt(1 - abar) x_t + sqrt(abar) v
        return (
            extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + extract(self.sqrt_alphas_cumprod, t, x_t) * output
        )

    def predict_eps(self, model: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Run the network and return its eps prediction in float32."""
        return self.model_output_to_eps(model(x_t, t).float(), x_t, t)

    # ------------------------------------------------------------------------------------------ training
    def training_loss(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor:
        """L_simple (Eq. 14): MSE between the target and the prediction at t ~ Uniform{0..T-1}, eps ~ N(0, I).

        With ``reduction="none"`` the per-example losses of shape (B,) are returned.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        prediction = model(x_t, t).float()
        loss = F.mse_loss(prediction, self.training_target(x0, t, noise).float(), reduction="none")
        loss = loss.flatten(1).mean(dim=1)  # (B,)
        return loss.mean() if reduction == "mean" else loss

    # --------------------------------------------------------------------------------------- reverse steps
    def ddpm_step(
        self,
        eps: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        noise: torch.Tensor,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} of p(x_{t-1} | x_t) (Algorithm 2), given the predicted eps.

        The mean is the posterior mean (Eq. 7) at the predicted x_0, optionally clipped to [-1, 1] as in Ho et al.'s
        code; without clipping it equals Eq. 11. The variance is beta_t (fixed_large) or beta~_t (fixed_small); no
        noise is added where t == 0.
        """
        t = _as_timesteps(t, x_t)
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, posterior_log_variance = self.q_posterior(x0, x_t, t)
        if self.variance == "fixed_large":
            # Ho et al. use log(beta~_1) at t = 0, where no noise is added anyway
            log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
            log_variance = extract(log_variance, t, x_t)
        else:
            log_variance = posterior_log_variance
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def ddim_step(
        self,
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
        t = _as_timesteps(t, x_t)
        t_prev = _as_timesteps(t_prev, x_t)
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        abar_t = extract(self.alphas_cumprod, t, x_t)
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        abar_prev = extract(padded, t_prev.clamp(min=-1) + 1, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs a noise tensor")
            x_prev = x_prev + sigma * noise
        return x_prev

    def respaced(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """The process on the sub-chain of ``timesteps`` S, indexed 0..len(S)-1 from low to high t.

        beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}} (abar_{S_{-1}} = 1) keeps abar'_i = abar_{S_i}, so the network,
        called at t = S_i, sees the x_t it was trained on (Nichol & Dhariwal 2021, Sec. 4). The variance choice and
        the objective carry over: fixed_large is beta'_i, fixed_small the respaced chain's posterior variance.
        """
        S = sorted({int(t) for t in timesteps})
        if not S or S[0] < 0 or S[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be a non-empty subset of [0, {self.num_timesteps - 1}], got {S}")
        alphas_cumprod = self.alphas_cumprod[S]  # float64
        betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        respaced = GaussianDiffusion(betas.cpu(), variance=self.variance, objective=self.objective)
        return respaced.to(self.betas.device)

    def _alpha_sigma_lambda(self, t: int) -> tuple[float, float, float]:
        """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t), in float64;
        t < 0 is the clean data: (1, 0, inf)."""
        if t < 0:
            return 1.0, 0.0, math.inf
        alpha, sigma = float(self.sqrt_alphas_cumprod[t]), float(self.sqrt_one_minus_alphas_cumprod[t])
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def dpmpp_2m_step(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: int,
        t_next: int,
        x0_prev: torch.Tensor | None = None,
        t_prev: int | None = None,
    ) -> torch.Tensor:
        """One DPM-Solver++(2M) step x_t -> x_{t_next} (Lu et al. 2022, Algorithm 2), from the data prediction x0
        at t and, for the second order, x0_prev at the previous timestep t_prev (None: first order, = DDIM eta 0).

        x_next = sigma_next / sigma_t x_t - alpha_next (exp(-h) - 1) D with h = lambda_next - lambda_t and
        D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = (lambda_t - lambda_prev) / h. ``t_next < 0`` is the clean data
        (sigma = 0, h = inf): that last step is first order and returns x0.
        """
        if t_next < 0:
            return x0
        alpha_next, sigma_next, lambda_next = self._alpha_sigma_lambda(t_next)
        _, sigma_t, lambda_t = self._alpha_sigma_lambda(t)
        h = lambda_next - lambda_t
        D = x0
        if x0_prev is not None:
            if t_prev is None:
                raise ValueError("dpmpp_2m_step with x0_prev needs its timestep t_prev")
            r = (lambda_t - self._alpha_sigma_lambda(t_prev)[2]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        return sigma_next / sigma_t * x_t - alpha_next * math.expm1(-h) * D

    # ------------------------------------------------------------------------------------------ sampling
    def sample(
        self, model: Denoiser, shape: tuple[int, ...], **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Draw samples with the reverse chain from x_T ~ N(0, I); see :func:`samplers.sample` for the options."""
        return samplers.sample(self, model, shape, **kwargs)
