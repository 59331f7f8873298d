"""The Gaussian diffusion process of Ho et al. 2020: forward noising, posterior, losses, the bound, and its view as
noise levels sigma; the reverse steps are in :mod:`ddpm_lightning.diffusion.samplers`.

Buffers are named after the paper's symbols (and Ho et al.'s ``diffusion_utils_2.py``), computed once in float64
and gathered per batch by :func:`extract`. Equation numbers refer to Ho et al. 2020 unless stated otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lightning import choices
from ddpm_lightning.diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Variance = Literal[choices.VARIANCES]  # type: ignore[valid-type]
Objective = Literal[choices.OBJECTIVES]  # type: ignore[valid-type]
LossWeighting = Literal[choices.LOSS_WEIGHTINGS]  # type: ignore[valid-type]
LossType = Literal[choices.LOSS_TYPES]  # type: ignore[valid-type]
VARIANCES, OBJECTIVES = choices.VARIANCES, choices.OBJECTIVES
LOSS_WEIGHTINGS, LOSS_TYPES = choices.LOSS_WEIGHTINGS, choices.LOSS_TYPES
#: lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Sec. 3.1)
HYBRID_LAMBDA = 1e-3

#: ``model(x_t, t) -> prediction`` with x_t of shape (B, C, H, W) and t of shape (B,) (int64).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(buffer: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather ``buffer[t]`` for a batch of timesteps and shape it to broadcast against ``x`` (in x's dtype)."""
    out = buffer.to(t.device)[t].to(x.dtype)  # (B,)
    return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def as_timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    """Integer timesteps of shape (B,) for ``x``: a bare int broadcast to the batch."""
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return t.to(device=x.device, dtype=torch.long)


def _loss_weights(alphas_cumprod: torch.Tensor, objective: str, loss_weighting: str, gamma: float) -> torch.Tensor:
    """Per-timestep weights of L_simple in float64: ones (also for ``"learned"``, whose weight the caller applies),
    or min-SNR-gamma (Hang et al. 2023, Sec. 3.4)."""
    if loss_weighting in ("none", "learned"):
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)  # SNR_t = alpha_t^2 / sigma_t^2
    clipped = snr.clamp(max=gamma)
    if objective == "eps":
        return clipped / snr
    if objective == "v":
        return clipped / (snr + 1.0)
    return clipped


class Prediction(NamedTuple):
    """The network's output read for the reverse step: the eps it implies and the variance channels (None when the
    variance is fixed)."""

    eps: torch.Tensor
    var_values: torch.Tensor | None


class GaussianDiffusion(nn.Module):
    """Forward process q(x_t | x_0), its posterior, L_simple, the variational bound and the sigma view of the process.

    Args:
        betas: float64 noise schedule of shape (T,), e.g. from :func:`make_betas`.
        variance: reverse-process variance sigma_t^2: ``"fixed_large"`` = beta_t (the paper's CIFAR-10 choice),
            ``"fixed_small"`` = beta~_t, the posterior variance (Eq. 7), or learned (Nichol & Dhariwal 2021): the
            network outputs twice the image channels, the second half v giving ``"learned_range"``
            log sigma_t^2 = (v+1)/2 log beta_t + (1 - (v+1)/2) log beta~_t (their Eq. 15, v in about [-1, 1]) or
            ``"learned"`` log sigma_t^2 = v. Learned variances train with L_hybrid (:meth:`training_loss`).
        objective: what the network predicts: ``"eps"`` (the paper), ``"x0"``, or ``"v"`` (Salimans & Ho 2022).
        loss_weighting: per-example weight of L_simple: ``"none"`` (the paper) or ``"min_snr"`` (Hang et al. 2023,
            min-SNR-gamma): min(SNR_t, gamma) / SNR_t for eps, min(SNR_t, gamma) / (SNR_t + 1) for v and
            min(SNR_t, gamma) for x0, with SNR_t = abar_t / (1 - abar_t), which weights every objective as an x0
            loss clipped at gamma. ``"learned"``: weights 1 here; the caller weighs the per-example losses by a learned
            u(t) (:class:`~ddpm_lightning.diffusion.weighting.LearnedLossWeight`, EDM2's uncertainty weighting).
        min_snr_gamma: gamma of ``"min_snr"`` (Hang et al. use 5).
        loss_type: ``"simple"``: L_simple (Eq. 14), plus lambda L_vlb for a learned variance (L_hybrid); ``"vlb"``:
            the true bound L_vlb alone (Eq. 5; Ho et al.'s Table 2 "L, learned/fixed", improved DDPM's L_vlb),
            which trains the mean and any learned variance.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        variance: Variance = "fixed_large",
        objective: Objective = "eps",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        loss_type: LossType = "simple",
    ):
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        if loss_type == "vlb" and loss_weighting != "none":
            raise ValueError(
                f"loss_weighting={loss_weighting!r} weights L_simple, and loss_type='vlb' trains the bound alone: "
                "use loss_weighting='none' with it"
            )
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1)")
        self.variance = variance
        self.objective = objective
        self.loss_weighting = loss_weighting
        self.loss_type = loss_type
        self.min_snr_gamma = float(min_snr_gamma)
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
            # fixed_large's log sigma_t^2 = log beta_t, with log beta~_1 at t = 0 as in Ho et al.'s code (the decoder
            # L_0 then has the variance of the step that follows it)
            "log_betas_clipped": torch.log(torch.cat([posterior_variance[1:2], betas[1:]])),
            "log_betas": torch.log(betas),
            "loss_weights": _loss_weights(alphas_cumprod, objective, loss_weighting, float(min_snr_gamma)),
        }
        for name, value in buffers.items():
            # not persistent: the schedule is rebuilt from the hyper-parameters, checkpoints stay small
            self.register_buffer(name, value, persistent=False)
        # float32 copies of Eq. 4's coefficients, rounded once from float64: the training step runs no float64 kernel
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "loss_weights"):
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
    @property
    def learned_variance(self) -> bool:
        return self.variance in ("learned", "learned_range")

    @property
    def output_channels_factor(self) -> int:
        """The network outputs this many times the image channels: 2 with a learned variance."""
        return 2 if self.learned_variance else 1

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance part) of the network's output: the one place the 2C channels of a learned variance
        are split (first C: the objective's prediction, last C: the variance values v); (output, None) when fixed."""
        if not self.learned_variance:
            return output, None
        if output.shape[1] % 2:
            raise ValueError(
                f"variance={self.variance!r} needs a network with twice the image channels, got {output.shape[1]}"
            )
        mean_output, var_values = output.chunk(2, dim=1)
        return mean_output, var_values

    def log_variance(self, var_values: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t): fixed (beta_t or beta~_t, clipped at t = 0 as in Ho et al.'s code) or
        from the variance channels v (improved DDPM Eq. 15 for ``"learned_range"``); shaped like x_t."""
        if self.variance == "fixed_large":
            return extract(self.log_betas_clipped, t, x_t).expand_as(x_t)
        if self.variance == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        if var_values is None:
            raise ValueError(f"variance={self.variance!r} needs the network's variance channels")
        if self.variance == "learned":
            return var_values
        # Eq. 15 (Nichol & Dhariwal 2021): Sigma = exp(v log beta_t + (1 - v) log beta~_t), v = (output + 1) / 2
        frac = (var_values + 1.0) / 2.0
        max_log = extract(self.log_betas, t, x_t)
        min_log = extract(self.posterior_log_variance_clipped, t, x_t)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, log-variance and x_0 prediction of p(x_{t-1} | x_t) from the network's (full) output.

        The mean is the posterior mean (Eq. 7) at the predicted x_0 (clipped to [-1, 1] when asked), which without
        clipping equals Eq. 11 for eps prediction.
        """
        mean_output, var_values = self.split_output(model_output)
        log_variance = self.log_variance(var_values, x_t, t)
        if self.objective == "x0":
            x0 = mean_output
        else:
            x0 = self.predict_x0_from_eps(x_t, t, self.model_output_to_eps(mean_output, x_t, t))
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return mean, log_variance, x0

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

    def predict(self, model: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        """Run the network: its eps prediction and its variance channels (None when fixed), in float32."""
        mean_output, var_values = self.split_output(model(x_t, t).float())
        return Prediction(self.model_output_to_eps(mean_output, x_t, t), var_values)

    # ------------------------------------------------------------------------------------------ training
    def training_loss(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor:
        """L_simple (Eq. 14): MSE between the target and the prediction at t ~ Uniform{0..T-1}, eps ~ N(0, I),
        weighted per example by ``loss_weighting``; with a learned variance L_hybrid = L_simple + lambda L_vlb.

        L_hybrid (Nichol & Dhariwal 2021, Sec. 3.1): lambda = 0.001 and L_vlb estimated as T L_t in bits/dim (as
        improved-diffusion does) with the mean's channels detached, so that L_vlb trains the variance only and
        L_simple the mean only; the min-SNR weighting applies to L_simple alone. ``loss_type="vlb"``: T L_t in
        bits/dim alone, whose mean over t ~ Uniform estimates the bound's terms L_0 + ... + L_{T-1} (Eq. 5). With
        ``reduction="none"`` the per-example losses of shape (B,) are returned.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t).float()
        if self.loss_type == "vlb":
            loss = self.num_timesteps * self.vb_terms_bpd(output, x0.float(), x_t.float(), t, clip_denoised=False)
            return loss.mean() if reduction == "mean" else loss
        prediction, var_values = self.split_output(output)
        loss = F.mse_loss(prediction, self.training_target(x0, t, noise).float(), reduction="none")
        loss = loss.flatten(1).mean(dim=1)  # (B,)
        if self.loss_weighting == "min_snr":
            loss = loss * self.loss_weights_f32.to(t.device)[t]
        if var_values is not None:
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            vb = self.vb_terms_bpd(frozen, x0.float(), x_t.float(), t, clip_denoised=False)
            loss = loss + HYBRID_LAMBDA * self.num_timesteps * vb
        return loss.mean() if reduction == "mean" else loss

    # ------------------------------------------------------------------------------------ the bound (Eq. 5)
    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """The bound's term at t per example, in bits per dimension, shape (B,).

        t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (Eq. 5); t = 0: the decoder
        L_0 = -log p(x_0 | x_1), discretized on the 256-level grid (Eq. 13). The 0-based t here is the paper's
        t - 1. ``clip_denoised`` clips the predicted x_0 to [-1, 1] inside the mean (improved-diffusion's
        evaluation clips, its training does not).
        """
        t = as_timesteps(t, x_t)
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits per dimension, shape (B,)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        log_variance = torch.log1p(-extract(self.alphas_cumprod, t, x0)).expand_as(x0)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        *,
        clip_denoised: bool = True,
        t_samples: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The whole bound L_T + L_{T-1} + ... + L_0 per example, in bits per dimension (Eq. 5).

        Computed in float64 on the network's output. ``t_samples`` None: every term (T network evaluations per
        image); K: the decoder L_0 exactly and the sum of the T - 1 KL terms estimated without bias from K
        timesteps drawn uniformly without replacement per image, (T - 1) / K times their sum. ``seeds``: one seed
        per image for its noise and timesteps (default 0..B-1), so that a result does not depend on the batching.

        Returns float64 tensors of shape (B,): ``total_bpd``, ``prior_bpd`` (L_T), ``decoder_bpd`` (L_0),
        ``rest_bpd`` (the KL terms); and ``vb`` (B, K or T): the evaluated terms (column j at ``timesteps[:, j]``).
        """
        B, T = x0.shape[0], self.num_timesteps
        seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} images")
        if t_samples is not None and not 1 <= t_samples <= T - 1:
            raise ValueError(f"t_samples must be in [1, {T - 1}] (the KL terms) or None (all), got {t_samples}")
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if t_samples is None:
            timesteps = torch.arange(T).expand(B, T)
        else:
            drawn = torch.stack([torch.randperm(T - 1, generator=g)[:t_samples] + 1 for g in generators])
            timesteps = torch.cat([torch.zeros(B, 1, dtype=torch.long), drawn], dim=1)  # L_0 always
        x0 = x0.double()
        terms = []
        for j in range(timesteps.shape[1]):
            t = timesteps[:, j].to(x0.device)
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float64) for g in generators])
            x_t = self.q_sample(x0, t, noise.to(x0.device))
            output = model(x_t.float(), t).double()
            terms.append(self.vb_terms_bpd(output, x0, x_t, t, clip_denoised=clip_denoised))
        vb = torch.stack(terms, dim=1)  # (B, K + 1 or T)
        decoder = vb[:, 0]
        rest = vb[:, 1:].sum(dim=1)
        if t_samples is not None:
            rest = rest * (T - 1) / t_samples
        prior = self.prior_bpd(x0)
        return {
            "total_bpd": prior + decoder + rest,
            "prior_bpd": prior,
            "decoder_bpd": decoder,
            "rest_bpd": rest,
            "vb": vb,
            "timesteps": timesteps,
        }

    # ----------------------------------------------------------------------------------- the noise levels
    def abar(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """abar_t for a batch, shaped to broadcast against x; t < 0 is the clean data (abar = 1)."""
        t = as_timesteps(t, x)
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return extract(padded, t.clamp(min=-1) + 1, x)

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt(1 / abar_t - 1), float64 (T,), increasing: x_t / sqrt(abar_t) = x_0 + sigma_t eps (Eq. 4
        divided by sqrt(abar_t)), the variance-exploding view of the process in which Karras et al. 2022 write their
        samplers; x_t = x / sqrt(1 + sigma_t^2) for x = x_0 + sigma_t eps."""
        return self.sqrt_recipm1_alphas_cumprod

    def timestep_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer timestep whose sigma_t is nearest to each ``sigma`` (int64, sigma's shape), for networks that
        take integer t (Karras et al. 2022's ``iDDPMPrecond.round_sigma``: the nearest by |sigma - sigma_t|)."""
        sigmas = self.sigmas.to(sigma.device)
        sigma = sigma.to(torch.float64)
        upper = torch.searchsorted(sigmas, sigma).clamp(1, self.num_timesteps - 1)  # sigmas[upper - 1] < sigma
        lower = upper - 1
        return torch.where((sigma - sigmas[lower]).abs() <= (sigmas[upper] - sigma).abs(), lower, upper)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The schedule's sigma_t nearest to each ``sigma`` (float64): the noise levels a network of integer t has
        seen."""
        return self.sigmas.to(sigma.device)[self.timestep_of_sigma(sigma)]

    def respaced(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """The process on the sub-chain of ``timesteps`` S, indexed 0..len(S)-1 from low to high t.

        beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}} (abar_{S_{-1}} = 1) keeps abar'_i = abar_{S_i}, so the network,
        called at t = S_i, sees the x_t it was trained on (Nichol & Dhariwal 2021, Sec. 4). The variance choice and
        the objective carry over: fixed_large is beta'_i, fixed_small the respaced chain's posterior variance, and
        learned_range interpolates between beta'_i and beta~'_i.
        """
        S = sorted({int(t) for t in timesteps})
        if not S or S[0] < 0 or S[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be a non-empty subset of [0, {self.num_timesteps - 1}], got {S}")
        alphas_cumprod = self.alphas_cumprod[S]  # float64
        betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        respaced = GaussianDiffusion(
            betas.cpu(),
            variance=self.variance,
            objective=self.objective,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
        )
        return respaced.to(self.betas.device)
