"""Reverse-chain samplers behind one setting, :class:`SamplerConfig`, reproducible from seeds.

``ddpm``: the ancestral sampler of Ho et al. 2020 (Algorithm 2), on the full chain or on a strided sub-chain with
respaced betas (Nichol & Dhariwal 2021, Sec. 4). ``ddim``: Song et al. 2021 (Eq. 12), eta >= 0.
``dpmpp_2m``: DPM-Solver++(2M) of Lu et al. 2022 (Algorithm 2), deterministic. ``heun``: Karras et al. 2022
(Algorithms 1 and 2), 2nd order on the probability-flow ODE in the sigma parameterisation of the process
(:meth:`GaussianDiffusion.sigmas`), with Karras spacing and optional churn noise. With a learned variance (improved
DDPM) the ancestral sampler uses it; the others use the network's mean only.

The contract: a sampler is one entry of :data:`_SAMPLERS`: a step factory, which noise levels it visits and how many
network evaluations its steps make. A step ``step(i, x_t, evaluate)`` goes from the i-th visited level to the next and
may call ``evaluate(x, t)`` (the network, guided if asked, at integer timestep t) any number of times; ``steps`` of a
setting is the number of steps, and :meth:`SamplerConfig.nfe` the number of network evaluations (``steps`` for the
one-evaluation samplers, 2 steps - 1 for Heun). Adding a sampler means adding its step factory there and its name to
:data:`Sampler`, in this file alone.

Classifier-free guidance (Ho & Salimans 2021) works with every sampler: with class labels y and a guidance scale s
the network is evaluated on the conditional and the null ("unconditional") labels in one batched forward, and the
samplers step with eps~ = eps(x_t, null) + s (eps(x_t, y) - eps(x_t, null)) (diffusers' convention: s = 1 is plain
conditional sampling, s = 0 unconditional); see :func:`guided`. Autoguidance (Karras et al. 2024, "Guiding a
diffusion model with a bad version of itself") guides with a weaker model of the same process instead:
D_w = D_guide + w (D_main - D_guide), see :class:`Guide`.

All noise is drawn on the CPU from explicit generators and then moved to the model's device, so a seed gives the
same samples on any device, and sample i of an evaluation can be seeded by i whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch

from ddpm_lightning.diffusion.gaussian import Denoiser, GaussianDiffusion, Prediction

Sampler = Literal["ddpm", "ddim", "dpmpp_2m", "heun"]
Spacing = Literal["uniform", "quadratic", "karras"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
SPACINGS: tuple[str, ...] = get_args(Spacing)
#: Karras et al. 2022 cap sigma_max at 80 for CIFAR-10; the linear schedule's last sigma is ~157, the cosine's ~2e4
KARRAS_SIGMA_MAX = 80.0
_HEUN_DEFAULTS = {"rho": 7.0, "sigma_max": None, "S_churn": 0.0, "S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}


@dataclass(frozen=True)
class SamplerConfig:
    """How samples are drawn: one value used by the module, the callbacks, the commands and the configs.

    Args:
        name: ``"ddpm"`` (ancestral), ``"ddim"``, ``"dpmpp_2m"`` (DPM-Solver++(2M)) or ``"heun"`` (EDM).
        steps: the sampler's steps; None: all T (the full chain). One network evaluation each, except Heun's
            2 ``steps`` - 1 (:meth:`nfe`).
        eta: DDIM's noise scale (0: deterministic; 1 on the full chain: the DDPM posterior variance).
        spacing: how the steps are spread: ``"uniform"`` over [0, T-1] or ``"quadratic"`` over [0, 0.8 T] (Song et
            al. 2021's CIFAR-10 choice) for the samplers on the integer timesteps; ``"karras"`` (Karras et al. 2022,
            Eq. 5, rho) for Heun. None: the sampler's default (uniform; karras for Heun).
        guidance_scale: classifier-free guidance scale s >= 0 of a class-conditional model (:func:`guided`); 1:
            plain conditional sampling (one network evaluation per step, the only value for an unconditional model).
        autoguidance_scale: w of autoguidance by a guide model (:class:`Guide`); 1: none. Two network evaluations per
            evaluation counted in :meth:`nfe`, the guide's and the main model's.
        rho, sigma_max, S_churn, S_tmin, S_tmax, S_noise: Heun's settings (Karras et al. 2022, Algorithm 2):
            the spacing's rho, the largest sigma (None: the schedule's, capped at 80) and the churn noise.

    Names and values are checked at construction; ``steps`` against a model's T by :meth:`num_steps`.
    In YAML: ``sampler: {name: ddim, steps: 50}``, ``sampler: {name: heun, steps: 18}``.
    """

    name: Sampler = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    spacing: Spacing | None = None
    guidance_scale: float = 1.0
    autoguidance_scale: float = 1.0
    rho: float = 7.0
    sigma_max: float | None = None
    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; allowed: {', '.join(SAMPLERS)}")
        entry = _SAMPLERS[self.name]
        if self.spacing is None:
            object.__setattr__(self, "spacing", entry.spacings[0])
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; allowed: {', '.join(SPACINGS)}")
        if self.spacing not in entry.spacings:
            raise ValueError(
                f"spacing {self.spacing!r} is not one of {self.name}'s; allowed: {', '.join(entry.spacings)}"
            )
        if isinstance(self.steps, bool) or not (
            self.steps is None or (isinstance(self.steps, int) and self.steps >= 1)
        ):
            raise ValueError(f"sampler steps must be a positive number of steps or None, got {self.steps!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        for field in ("guidance_scale", "autoguidance_scale"):
            scale = getattr(self, field)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
                raise ValueError(f"{field} must be a finite number >= 0 (1: no guidance), got {scale!r}")
        if self.guidance_scale != 1 and self.autoguidance_scale != 1:
            raise ValueError(
                f"guidance_scale={self.guidance_scale:g} and autoguidance_scale={self.autoguidance_scale:g}: "
                "use one kind of guidance at a time (the other at 1)"
            )
        if self.name != "heun":
            changed = [k for k, v in _HEUN_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(f"{', '.join(changed)} apply to the heun sampler only, not to {self.name}")
            return
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if self.sigma_max is not None and not self.sigma_max > 0:
            raise ValueError(f"sigma_max must be > 0 or None (the schedule's, capped at 80), got {self.sigma_max}")
        if not (self.S_churn >= 0 and self.S_noise >= 0 and 0 <= self.S_tmin <= self.S_tmax):
            raise ValueError(
                f"Heun's churn needs S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax, got S_churn={self.S_churn}"
                f", S_noise={self.S_noise}, S_tmin={self.S_tmin}, S_tmax={self.S_tmax}"
            )

    @classmethod
    def parse(
        cls,
        value: SamplerConfig | Mapping[str, Any] | str | None = None,
        base: SamplerConfig | None = None,
        **changes: Any,
    ) -> SamplerConfig:
        """A config from a config, a mapping (YAML), a sampler name or None (``base``), then ``changes`` that are
        not None applied on top: ``parse("ddim", base, steps=20)``. Fields not given keep ``base``'s values, except
        those that do not apply to the named sampler (another's spacing, Heun's settings), which take its defaults."""
        base = base if base is not None else cls()
        if isinstance(value, SamplerConfig):
            config = value
        elif isinstance(value, Mapping):
            config = cls(**value)
        elif isinstance(value, str):
            config = base._renamed(value)
        elif value is None:
            config = base
        else:
            raise ValueError(f"a sampler setting must be a SamplerConfig, a mapping or a name, got {value!r}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if "name" in changes:
            config = config._renamed(changes.pop("name"))
        return dataclasses.replace(config, **changes) if changes else config

    def _renamed(self, name: str) -> SamplerConfig:
        if name not in _SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
        fields: dict[str, Any] = {"name": name}
        if self.spacing not in _SAMPLERS[name].spacings:
            fields["spacing"] = None
        if name != "heun":
            fields.update(_HEUN_DEFAULTS)
        return dataclasses.replace(self, **fields)

    def num_steps(self, num_timesteps: int) -> int:
        """The sampler's steps for a process of ``num_timesteps`` steps, checked to lie in [1, T]."""
        T = num_timesteps
        n = T if self.steps is None else self.steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"steps must be in [1, {T}] for {self.name}, got {n!r}")
        return n

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The integer timesteps a sampler on the timestep grid visits, high to low (:func:`sampling_timesteps`);
        Heun visits the schedule's noise levels: :meth:`visited`."""
        if self.name == "heun":
            raise ValueError("heun visits noise levels of the schedule, not a spacing of T: use visited(diffusion)")
        return sampling_timesteps(num_timesteps, self.name, self.num_steps(num_timesteps), self.spacing)

    def visited(self, diffusion: GaussianDiffusion) -> list[int]:
        """The timestep of the noise level at the start of each step, high to low, one per step: where the chain
        x_t can be recorded (``return_steps``)."""
        return _SAMPLERS[self.name].visited(diffusion, self)

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations per sample for a process of ``num_timesteps`` steps (autoguidance's guide counted)."""
        evaluations = _SAMPLERS[self.name].evaluations(self.num_steps(num_timesteps))
        return evaluations * (2 if self.autoguidance_scale != 1 else 1)

    def label(self, num_timesteps: int) -> str:
        """A short name for tags and file names, with the network evaluations of the main model: ``ddim50``,
        ``ddim50_eta1``, ``dpmpp_2m20``, ``ddpm1000`` (the full chain of T = 1000), ``ddim50_quad`` (quadratic
        spacing), ``heun19`` (10 Heun steps), ``heun19_churn40``, ``ddim50-s3`` (guidance scale 3), ``ddim50-ag2``
        (autoguidance w = 2)."""
        evaluations = _SAMPLERS[self.name].evaluations(self.num_steps(num_timesteps))
        label = f"{self.name}{evaluations}" + (f"_eta{self.eta:g}" if self.name == "ddim" and self.eta > 0 else "")
        label += "_quad" if self.spacing == "quadratic" and evaluations < num_timesteps else ""
        label += f"_churn{self.S_churn:g}" if self.S_churn > 0 else ""
        label += f"-s{self.guidance_scale:g}" if self.guidance_scale != 1 else ""
        return label + (f"-ag{self.autoguidance_scale:g}" if self.autoguidance_scale != 1 else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for hyper-parameters and reports; the guidance scales only when they are not 1 and Heun's
        settings only for Heun, so that the settings of other models read as they always have."""
        fields = dataclasses.asdict(self)
        for scale in ("guidance_scale", "autoguidance_scale"):
            if fields[scale] == 1:
                del fields[scale]
        if self.name != "heun":
            for key in _HEUN_DEFAULTS:
                del fields[key]
        return fields


def sampling_timesteps(
    num_timesteps: int, sampler: Sampler = "ddpm", num_steps: int | None = None, spacing: Spacing = "uniform"
) -> list[int]:
    """The timesteps a sampler on the integer grid visits, one network evaluation each, from high to low.

    ``num_steps`` None or T: all T timesteps. Fewer are spaced uniformly over [0, T-1] (the ends included, as
    improved-diffusion's respacing) or quadratically over [0, 0.8 T] (Song et al. 2021, Appendix D.2, their
    CIFAR-10 choice). A sampler whose last step lands on the clean data (``dpmpp_2m``) spaces ``num_steps + 1``
    points the same way and leaves out t = 0: its last step goes from about T / num_steps straight to the clean data
    (first order), as diffusers' DPMSolverMultistepScheduler does, rather than spending an evaluation on t = 0 and a
    second-order step with a large extrapolation there.
    """
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if spacing not in ("uniform", "quadratic"):
        raise ValueError(f"unknown spacing {spacing!r} of the integer timesteps; allowed: uniform, quadratic")
    T = num_timesteps
    n = T if num_steps is None else num_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}] for {sampler}, got {n!r}")
    skip_zero = _SAMPLERS[sampler].to_clean_data and n < T
    points = n + 1 if skip_zero else n
    if spacing == "uniform":
        steps = torch.linspace(0, T - 1, points, dtype=torch.float64).round().long().tolist()
    else:
        steps = (torch.linspace(0, (0.8 * T) ** 0.5, points, dtype=torch.float64) ** 2).floor().long().tolist()
        # the squares crowd together near t = 0: push repeats up so that every step is distinct
        for i in range(1, points):
            steps[i] = max(steps[i], steps[i - 1] + 1)
    return steps[:0:-1] if skip_zero else steps[::-1]


def karras_sigmas(
    diffusion: GaussianDiffusion, num_steps: int, rho: float = 7.0, sigma_max: float | None = None
) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i = 0..N-1, each rounded to the nearest sigma of the schedule (their ``iDDPMPrecond.round_sigma``), float64,
    high to low, without the final 0. sigma_min is the schedule's smallest (t = 0); sigma_max the schedule's largest
    capped at 80, or ``sigma_max`` (also capped by the schedule's largest)."""
    sigmas = diffusion.sigmas
    largest = float(sigmas[-1])
    s_max = min(largest, KARRAS_SIGMA_MAX if sigma_max is None else float(sigma_max))
    s_min = float(sigmas[0])
    if num_steps == 1:
        levels = torch.tensor([s_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        levels = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return diffusion.round_sigma(levels.to(sigmas.device))


class NoiseSource:
    """Standard normal draws of a batch from CPU generators: one shared, or one per sample (``seeds``)."""

    def __init__(
        self,
        batch_shape: tuple[int, ...],
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ):
        if sum(x is not None for x in (seed, seeds, generator)) > 1:
            raise ValueError("give at most one of seed, seeds and generator")
        self.shape = batch_shape
        if seeds is not None:
            if len(seeds) != batch_shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_shape[0]}")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        else:
            if generator is None:
                generator = torch.Generator()
                generator.manual_seed(seed if seed is not None else torch.seed())
            self.generators = [generator]

    def draw(self, device: torch.device | str) -> torch.Tensor:
        if len(self.generators) == 1:
            noise = torch.randn(self.shape, generator=self.generators[0])
        else:
            noise = torch.stack([torch.randn(self.shape[1:], generator=g) for g in self.generators])
        return noise.to(device)


# ------------------------------------------------------------------------------------------------ the steps
def _as_timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return t.to(device=x.device, dtype=torch.long)


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
    t = _as_timesteps(t, x_t)
    x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _, _ = diffusion.q_posterior(x0, x_t, t)
    log_variance = diffusion.log_variance(var_values, x_t, t)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * log_variance) * noise


def ddim_step(
    diffusion: GaussianDiffusion,
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
    x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = diffusion.predict_eps_from_x0(x_t, t, x0)
    abar_t = diffusion.abar(t, x_t)
    abar_prev = diffusion.abar(t_prev, x_t)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


def alpha_sigma_lambda(diffusion: GaussianDiffusion, t: int) -> tuple[float, float, float]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t) (half the log-SNR) of
    DPM-Solver, in float64; t < 0 is the clean data: (1, 0, inf)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    alpha, sigma = float(diffusion.sqrt_alphas_cumprod[t]), float(diffusion.sqrt_one_minus_alphas_cumprod[t])
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def dpmpp_2m_step(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_next: int,
    x0_prev: torch.Tensor | None = None,
    t_prev: int | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step x_t -> x_{t_next} (Lu et al. 2022, Algorithm 2), from the data prediction x0 at t
    and, for the second order, x0_prev at the previous timestep t_prev (None: first order, = DDIM eta 0).

    x_next = sigma_next / sigma_t x_t - alpha_next (exp(-h) - 1) D with h = lambda_next - lambda_t and
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = (lambda_t - lambda_prev) / h. ``t_next < 0`` is the clean data
    (sigma = 0, h = inf): that last step is first order and returns x0.
    """
    if t_next < 0:
        return x0
    alpha_next, sigma_next, lambda_next = alpha_sigma_lambda(diffusion, t_next)
    _, sigma_t, lambda_t = alpha_sigma_lambda(diffusion, t)
    h = lambda_next - lambda_t
    D = x0
    if x0_prev is not None:
        if t_prev is None:
            raise ValueError("dpmpp_2m_step with x0_prev needs its timestep t_prev")
        r = (lambda_t - alpha_sigma_lambda(diffusion, t_prev)[2]) / h
        D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    return sigma_next / sigma_t * x_t - alpha_next * math.expm1(-h) * D


def heun_step(
    denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    """One step of Karras et al. 2022, Algorithm 1 (lines 4-8) on dx/dsigma = (x - D(x; sigma)) / sigma, in the
    sigma parameterisation x = x_0 + sigma eps: an Euler step to ``sigma_next``, corrected with the slope there
    (the trapezoidal rule) unless ``sigma_next`` is 0. ``denoise(x, sigma)`` is D, the x_0 prediction."""
    d = (x - denoise(x, sigma)) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_next
    d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)


# ------------------------------------------------------------------------------------------------ the samplers
class Chain(NamedTuple):
    """What a sampler's steps see: the process, the visited timesteps (high to low), the setting and the noise."""

    diffusion: GaussianDiffusion
    timesteps: list[int]
    config: SamplerConfig
    noise: NoiseSource
    clip_denoised: bool
    device: torch.device


#: ``evaluate(x_t, t) -> Prediction``: the network (guided when asked) at the integer timestep t, counted.
Evaluate = Callable[[torch.Tensor, int], Prediction]
#: ``step(i, x_t, evaluate) -> x at the next visited level``, from the i-th visited timestep; may evaluate any number
#: of times (its entry's ``evaluations`` says how many per run).
Step = Callable[[int, torch.Tensor, Evaluate], torch.Tensor]


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


def _ddim(chain: Chain) -> Step:
    """Song et al. 2021, Eq. 12: uses the network's mean (eps) only; a learned variance is ignored (sigma from eta)."""
    timesteps, eta = chain.timesteps, chain.config.eta

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        eps = evaluate(x_t, timesteps[i]).eps
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        noise = chain.noise.draw(chain.device) if eta > 0 else None
        return ddim_step(
            chain.diffusion, eps, x_t, timesteps[i], t_next, eta=eta, noise=noise, clip_denoised=chain.clip_denoised
        )

    return step


def _dpmpp_2m(chain: Chain) -> Step:
    """Lu et al. 2022, Algorithm 2: deterministic, uses the network's mean (x0) only; a learned variance is
    ignored."""
    diffusion, timesteps = chain.diffusion, chain.timesteps
    previous: list[torch.Tensor] = []  # the data prediction at the previous timestep

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        eps = evaluate(x_t, timesteps[i]).eps
        x0 = diffusion.predict_x0_from_eps(x_t, torch.full((x_t.shape[0],), timesteps[i], device=x_t.device), eps)
        if chain.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x0_prev, t_prev = (previous[-1], timesteps[i - 1]) if previous else (None, None)
        previous[:] = [x0]
        return dpmpp_2m_step(diffusion, x0, x_t, timesteps[i], t_next, x0_prev=x0_prev, t_prev=t_prev)

    return step


def _heun(chain: Chain) -> Step:
    """Karras et al. 2022, Algorithm 2 (Algorithm 1 when S_churn = 0) on the VP process seen through its sigmas.

    The state between steps is the process's x_t; a step works on x = x_t sqrt(1 + sigma_t^2) = x_0 + sigma_t eps
    (the first from x = sigma_0 x_T: Algorithm 1's x_0 ~ N(0, sigma_0^2 I)). D(x; sigma) = x - sigma eps(x_t, t) is
    the x_0 prediction of the network evaluated at the timestep t of sigma (the sigmas are rounded to the
    schedule's grid, as EDM's ``iDDPMPrecond``), clipped to [-1, 1] when asked. Churn: at a level sigma in
    [S_tmin, S_tmax] noise raises it to sigma^ = round(sigma (1 + gamma)), gamma = min(S_churn / N, sqrt(2) - 1),
    before the step (Algorithm 2, lines 4-6)."""
    diffusion, config = chain.diffusion, chain.config
    sigmas = _heun_sigmas(diffusion, config)  # (N,) float64, high to low
    levels = [*sigmas.tolist(), 0.0]
    gamma = min(config.S_churn / len(sigmas), math.sqrt(2.0) - 1.0)

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = int(diffusion.timestep_of_sigma(torch.tensor(sigma, dtype=torch.float64)))
            eps = evaluate(x / math.sqrt(1.0 + sigma**2), t).eps
            x0 = x - sigma * eps
            return x0.clamp(-1.0, 1.0) if chain.clip_denoised else x0

        sigma, sigma_next = levels[i], levels[i + 1]
        x = x_t * (sigma if i == 0 else math.sqrt(1.0 + sigma**2))
        if gamma > 0 and config.S_tmin <= sigma <= config.S_tmax:
            sigma_hat = float(diffusion.round_sigma(torch.tensor(sigma * (1 + gamma), dtype=torch.float64)))
            noise = chain.noise.draw(chain.device)
            x = x + math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * config.S_noise * noise
            sigma = sigma_hat
        x_next = heun_step(denoise, x, sigma, sigma_next)
        return x_next / math.sqrt(1.0 + sigma_next**2)

    return step


def _heun_sigmas(diffusion: GaussianDiffusion, config: SamplerConfig) -> torch.Tensor:
    return karras_sigmas(diffusion, config.num_steps(diffusion.num_timesteps), config.rho, config.sigma_max)


def _grid_visited(diffusion: GaussianDiffusion, config: SamplerConfig) -> list[int]:
    return config.timesteps(diffusion.num_timesteps)


def _heun_visited(diffusion: GaussianDiffusion, config: SamplerConfig) -> list[int]:
    return diffusion.timestep_of_sigma(_heun_sigmas(diffusion, config)).tolist()


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


def _evaluator(
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


class _Entry(NamedTuple):
    make_step: Callable[[Chain], Step]
    spacings: tuple[str, ...]  # the first is the default
    visited: Callable[[GaussianDiffusion, SamplerConfig], list[int]]
    evaluations: Callable[[int], int] = lambda steps: steps  # network evaluations of ``steps`` steps
    to_clean_data: bool = False  # the last step goes to the clean data, so t = 0 needs no evaluation


_SAMPLERS: dict[str, _Entry] = {
    "ddpm": _Entry(_ancestral, ("uniform", "quadratic"), _grid_visited),
    "ddim": _Entry(_ddim, ("uniform", "quadratic"), _grid_visited),
    "dpmpp_2m": _Entry(_dpmpp_2m, ("uniform", "quadratic"), _grid_visited, to_clean_data=True),
    # N steps: two evaluations each, but one for the last (an Euler step to sigma = 0)
    "heun": _Entry(_heun, ("karras",), _heun_visited, evaluations=lambda steps: 2 * steps - 1),
}
assert tuple(_SAMPLERS) == SAMPLERS, "every name of Sampler needs an entry in _SAMPLERS"


def nearest_visited(requested: Sequence[int], visited: Sequence[int]) -> dict[int, int]:
    """For each requested timestep, the visited one nearest to it (the higher on a tie): ``{visited: requested}``,
    so a chain records x_t where the sampler was, and a caller can tell which level stands for which request."""
    out: dict[int, int] = {}
    for t in requested:
        nearest = min(visited, key=lambda v: (abs(v - t), -v))
        out.setdefault(nearest, int(t))
    return out


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Denoiser,
    shape: tuple[int, ...],
    *,
    sampler: SamplerConfig | str | None = None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    return_steps: Sequence[int] | None = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    progress: Callable[[int], Any] | None = None,
    y: torch.Tensor | None = None,
    null_label: int | None = None,
    guide: Guide | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the reverse chain from x_T ~ N(0, I) to x_0 with the ``sampler`` setting (default: the full ancestral
    chain; a name means that sampler on all T steps).

    Args:
        model: ``model(x_t, t)``, or ``model(x_t, t, y=...)`` when labels ``y`` are given.
        shape: (B, C, H, W) of the batch.
        seed / seeds / generator: reproducibility: one seed for the batch, one seed per sample, or a CPU generator.
        return_steps: timesteps t at which to record the chain's x_t: each is recorded at the visited timestep
            nearest to it (:meth:`SamplerConfig.visited`), the key of the returned dict.
        clip_denoised: clip every x_0 prediction to [-1, 1].
        device: where the model runs; defaults to the device of the diffusion buffers.
        progress: called with the number of network evaluations each step made (e.g. a progress bar's ``update``).
        y, null_label: class labels (B,) of a class-conditional model and its null class, guided with the setting's
            ``guidance_scale`` (:func:`guided`); x_T and the noise do not depend on them.
        guide: the weaker model of autoguidance with the setting's ``autoguidance_scale`` (:class:`Guide`).

    Returns:
        x_0 in the model's range, float32; with ``return_steps`` also a dict {visited t: x_t} on the CPU.
    """
    config = SamplerConfig.parse(sampler)
    device = torch.device(device) if device is not None else diffusion.betas.device
    visited = config.visited(diffusion)
    if y is not None:
        if null_label is None or tuple(y.shape) != (shape[0],):
            raise ValueError(f"labels y need a null_label and the shape ({shape[0]},), got {tuple(y.shape)}")
        model = guided(diffusion, model, y.to(device), null_label, config.guidance_scale)
    elif config.guidance_scale != 1:
        raise ValueError(
            f"guidance_scale={config.guidance_scale:g} needs class labels y (a class-conditional model); "
            "an unconditional model samples with guidance_scale=1"
        )
    if guide is not None:
        check_guide(diffusion, guide)
    elif config.autoguidance_scale != 1:
        raise ValueError(
            f"autoguidance_scale={config.autoguidance_scale:g} needs a guide model (a weaker checkpoint of the same "
            "process, e.g. ddpm sample --guide-ckpt PATH)"
        )
    noise = NoiseSource(tuple(shape), seed=seed, seeds=seeds, generator=generator)
    record = nearest_visited(return_steps, visited) if return_steps else {}
    chain: dict[int, torch.Tensor] = {}

    x_t = noise.draw(device)
    step = _SAMPLERS[config.name].make_step(Chain(diffusion, visited, config, noise, clip_denoised, device))
    evaluate = _evaluator(diffusion, model, guide, config.autoguidance_scale, shape[0], device)
    per_evaluation = 2 if guide is not None and config.autoguidance_scale != 1 else 1
    calls = [0]

    def counted(x: torch.Tensor, t: int) -> Prediction:
        calls[0] += per_evaluation
        return evaluate(x, t)

    for i, t_int in enumerate(visited):
        if t_int in record:
            chain[t_int] = x_t.detach().cpu()
        before = calls[0]
        x_t = step(i, x_t, counted)
        if progress is not None:
            progress(calls[0] - before)
    x0 = x_t.float()
    return (x0, chain) if return_steps is not None else x0
