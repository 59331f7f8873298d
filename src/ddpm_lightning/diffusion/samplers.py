"""Reverse-chain samplers behind one setting, :class:`SamplerConfig`, reproducible from seeds.

``ddpm``: the ancestral sampler of Ho et al. 2020 (Algorithm 2), on the full chain or on a strided sub-chain with
respaced betas (Nichol & Dhariwal 2021, Sec. 4). ``ddim``: Song et al. 2021 (Eq. 12), eta >= 0.
``dpmpp_2m``: DPM-Solver++(2M) of Lu et al. 2022 (Algorithm 2), deterministic. With a learned variance
(improved DDPM) the ancestral sampler uses it; DDIM and DPM-Solver++ use the network's mean only. Each makes one
network evaluation per visited timestep, so ``steps`` is the number of network evaluations (NFE).

A sampler is one entry of :data:`_SAMPLERS` (how it steps, and whether its last step lands on the clean data): adding
one means adding its step function there and its name to :data:`Sampler`, in this file alone.

Classifier-free guidance (Ho & Salimans 2021) works with every sampler: with class labels y and a guidance scale s
the network is evaluated on the conditional and the null ("unconditional") labels in one batched forward, and the
samplers step with eps~ = eps(x_t, null) + s (eps(x_t, y) - eps(x_t, null)) (diffusers' convention: s = 1 is plain
conditional sampling, s = 0 unconditional); see :func:`guided`.

All noise is drawn on the CPU from explicit generators and then moved to the model's device, so a seed gives the
same samples on any device, and sample i of an evaluation can be seeded by i whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ddpm_lightning.diffusion.gaussian import Denoiser, GaussianDiffusion

Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
Spacing = Literal["uniform", "quadratic"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
SPACINGS: tuple[str, ...] = get_args(Spacing)


@dataclass(frozen=True)
class SamplerConfig:
    """How samples are drawn: one value used by the module, the callbacks, the commands and the configs.

    Args:
        name: ``"ddpm"`` (ancestral), ``"ddim"`` or ``"dpmpp_2m"`` (DPM-Solver++(2M)).
        steps: network evaluations (NFE) = visited timesteps; None: all T (the full chain).
        eta: DDIM's noise scale (0: deterministic; 1 on the full chain: the DDPM posterior variance).
        spacing: how fewer than T timesteps are spread: ``"uniform"`` over [0, T-1] or ``"quadratic"`` over
            [0, 0.8 T] (Song et al. 2021's CIFAR-10 choice).
        guidance_scale: classifier-free guidance scale s >= 0 of a class-conditional model (:func:`guided`); 1:
            plain conditional sampling (one network evaluation per step, the only value for an unconditional model).

    Names, eta and the spacing are checked at construction; ``steps`` against a model's T by :meth:`timesteps`.
    In YAML: ``sampler: {name: ddim, steps: 50}``.
    """

    name: Sampler = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    spacing: Spacing = "uniform"
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; allowed: {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; allowed: {', '.join(SPACINGS)}")
        if isinstance(self.steps, bool) or not (
            self.steps is None or (isinstance(self.steps, int) and self.steps >= 1)
        ):
            raise ValueError(
                f"sampler steps must be a positive number of network evaluations or None, got {self.steps!r}"
            )
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {scale!r}")

    @classmethod
    def parse(
        cls,
        value: SamplerConfig | Mapping[str, Any] | str | None = None,
        base: SamplerConfig | None = None,
        **changes: Any,
    ) -> SamplerConfig:
        """A config from a config, a mapping (YAML), a sampler name or None (``base``), then ``changes`` that are
        not None applied on top: ``parse("ddim", base, steps=20)``. Fields not given keep ``base``'s values."""
        base = base if base is not None else cls()
        if isinstance(value, SamplerConfig):
            config = value
        elif isinstance(value, Mapping):
            config = cls(**value)
        elif isinstance(value, str):
            config = dataclasses.replace(base, name=value)
        elif value is None:
            config = base
        else:
            raise ValueError(f"a sampler setting must be a SamplerConfig, a mapping or a name, got {value!r}")
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(config, **changes) if changes else config

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The timesteps visited for a process of ``num_timesteps`` steps, high to low (:func:`sampling_timesteps`);
        a step count above T is refused here."""
        return sampling_timesteps(num_timesteps, self.name, self.steps, self.spacing)

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations per sample for a process of ``num_timesteps`` steps."""
        return len(self.timesteps(num_timesteps))

    def label(self, num_timesteps: int) -> str:
        """A short name for tags and file names: ``ddim50``, ``ddim50_eta1``, ``dpmpp_2m20``, ``ddpm1000`` (the full
        chain of T = 1000), ``ddim50_quad`` (quadratic spacing), ``ddim50-s3`` (guidance scale 3)."""
        nfe = self.nfe(num_timesteps)
        label = f"{self.name}{nfe}" + (f"_eta{self.eta:g}" if self.name == "ddim" and self.eta > 0 else "")
        label += "_quad" if self.spacing == "quadratic" and nfe < num_timesteps else ""
        return label + (f"-s{self.guidance_scale:g}" if self.guidance_scale != 1 else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for hyper-parameters and reports; ``guidance_scale`` only when it is not 1, so that the
        settings of unconditional models read as they always have."""
        fields = dataclasses.asdict(self)
        if self.guidance_scale == 1:
            del fields["guidance_scale"]
        return fields


def sampling_timesteps(
    num_timesteps: int, sampler: Sampler = "ddpm", num_steps: int | None = None, spacing: Spacing = "uniform"
) -> list[int]:
    """The timesteps a sampler visits, one network evaluation each, from high to low.

    ``num_steps`` None or T: all T timesteps. Fewer are spaced uniformly over [0, T-1] (the ends included, as
    improved-diffusion's respacing) or quadratically over [0, 0.8 T] (Song et al. 2021, Appendix D.2, their
    CIFAR-10 choice). A sampler whose last step lands on the clean data (``dpmpp_2m``) spaces ``num_steps + 1``
    points the same way and leaves out t = 0: its last step goes from about T / num_steps straight to the clean data
    (first order), as diffusers' DPMSolverMultistepScheduler does, rather than spending an evaluation on t = 0 and a
    second-order step with a large extrapolation there.
    """
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    T = num_timesteps
    n = T if num_steps is None else num_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}] (network evaluations) for {sampler}, got {n!r}")
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


# ------------------------------------------------------------------------------------------------ the samplers
class Chain(NamedTuple):
    """What a sampler's steps see: the process, the visited timesteps (high to low), the setting and the noise."""

    diffusion: GaussianDiffusion
    timesteps: list[int]
    config: SamplerConfig
    noise: NoiseSource
    clip_denoised: bool
    device: torch.device


#: ``step(i, x_t, eps, var_values) -> x at the next visited timestep`` for the i-th visited timestep; var_values:
#: the network's variance channels (None when the variance is fixed).
Step = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _ancestral(chain: Chain) -> Step:
    """Algorithm 2; on a sub-chain it steps through the respaced process, indexed 0..n-1 from low to high t.

    A learned variance is used as learned: on a sub-chain its Eq. 15 interpolates between the respaced beta'_t and
    beta~'_t (Nichol & Dhariwal 2021, Sec. 4)."""
    diffusion, timesteps = chain.diffusion, chain.timesteps
    respaced = len(timesteps) < diffusion.num_timesteps
    process = diffusion.respaced(timesteps) if respaced else diffusion

    def step(i: int, x_t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor | None) -> torch.Tensor:
        t = len(timesteps) - 1 - i if respaced else timesteps[i]
        noise = chain.noise.draw(chain.device)
        return process.ddpm_step(eps, x_t, t, noise, clip_denoised=chain.clip_denoised, var_values=var_values)

    return step


def _ddim(chain: Chain) -> Step:
    """Song et al. 2021, Eq. 12: uses the network's mean (eps) only; a learned variance is ignored (sigma from eta)."""
    timesteps, eta = chain.timesteps, chain.config.eta

    def step(i: int, x_t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor | None) -> torch.Tensor:
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        noise = chain.noise.draw(chain.device) if eta > 0 else None
        return chain.diffusion.ddim_step(
            eps, x_t, timesteps[i], t_next, eta=eta, noise=noise, clip_denoised=chain.clip_denoised
        )

    return step


def _dpmpp_2m(chain: Chain) -> Step:
    """Lu et al. 2022, Algorithm 2: deterministic, uses the network's mean (x0) only; a learned variance is
    ignored."""
    diffusion, timesteps = chain.diffusion, chain.timesteps
    previous: list[torch.Tensor] = []  # the data prediction at the previous timestep

    def step(i: int, x_t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor | None) -> torch.Tensor:
        x0 = diffusion.predict_x0_from_eps(x_t, torch.full((x_t.shape[0],), timesteps[i], device=x_t.device), eps)
        if chain.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x0_prev, t_prev = (previous[-1], timesteps[i - 1]) if previous else (None, None)
        previous[:] = [x0]
        return diffusion.dpmpp_2m_step(x0, x_t, timesteps[i], t_next, x0_prev=x0_prev, t_prev=t_prev)

    return step


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


class _Entry(NamedTuple):
    make_step: Callable[[Chain], Step]
    to_clean_data: bool  # the last step goes to the clean data, so t = 0 needs no evaluation


_SAMPLERS: dict[str, _Entry] = {
    "ddpm": _Entry(_ancestral, to_clean_data=False),
    "ddim": _Entry(_ddim, to_clean_data=False),
    "dpmpp_2m": _Entry(_dpmpp_2m, to_clean_data=True),
}
assert tuple(_SAMPLERS) == SAMPLERS, "every name of Sampler needs an entry in _SAMPLERS"


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
    progress: bool = False,
    y: torch.Tensor | None = None,
    null_label: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the reverse chain from x_T ~ N(0, I) to x_0 with the ``sampler`` setting (default: the full ancestral
    chain; a name means that sampler on all T steps).

    Args:
        model: ``model(x_t, t)``, or ``model(x_t, t, y=...)`` when labels ``y`` are given.
        shape: (B, C, H, W) of the batch.
        seed / seeds / generator: reproducibility: one seed for the batch, one seed per sample, or a CPU generator.
        return_steps: timesteps t at which to record the current x_t (only the visited ones are recorded).
        clip_denoised: clip every x_0 prediction to [-1, 1].
        device: where the model runs; defaults to the device of the diffusion buffers.
        y, null_label: class labels (B,) of a class-conditional model and its null class, guided with the setting's
            ``guidance_scale`` (:func:`guided`); x_T and the noise do not depend on them.

    Returns:
        x_0 in the model's range, float32; with ``return_steps`` also a dict {t: x_t} on the CPU.
    """
    config = SamplerConfig.parse(sampler)
    device = torch.device(device) if device is not None else diffusion.betas.device
    timesteps = config.timesteps(diffusion.num_timesteps)
    if y is not None:
        if null_label is None or tuple(y.shape) != (shape[0],):
            raise ValueError(f"labels y need a null_label and the shape ({shape[0]},), got {tuple(y.shape)}")
        model = guided(diffusion, model, y.to(device), null_label, config.guidance_scale)
    elif config.guidance_scale != 1:
        raise ValueError(
            f"guidance_scale={config.guidance_scale:g} needs class labels y (a class-conditional model); "
            "an unconditional model samples with guidance_scale=1"
        )
    noise = NoiseSource(tuple(shape), seed=seed, seeds=seeds, generator=generator)
    record = set(return_steps or ())
    chain: dict[int, torch.Tensor] = {}

    x_t = noise.draw(device)
    step = _SAMPLERS[config.name].make_step(Chain(diffusion, timesteps, config, noise, clip_denoised, device))
    label = config.label(diffusion.num_timesteps)
    for i, t_int in enumerate(tqdm(timesteps, desc=f"sampling ({label})", leave=False, disable=not progress)):
        if t_int in record:
            chain[t_int] = x_t.detach().cpu()
        t = torch.full((shape[0],), t_int, dtype=torch.long, device=device)
        x_t = step(i, x_t, *diffusion.predict(model, x_t, t))
    x0 = x_t.float()
    return (x0, chain) if return_steps is not None else x0
