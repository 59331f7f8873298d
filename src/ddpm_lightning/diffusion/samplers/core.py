"""The registry of samplers, the setting that names one (:class:`SamplerConfig`) and the types a sampler's steps see.

A sampler is one file of this package that calls :func:`register` with its step factory, its spacings, how many
network evaluations its steps make and its own options class (a frozen dataclass of :class:`SamplerOptions`). A
step ``step(i, x_t, evaluate)`` goes from the i-th visited level to the next and may call ``evaluate(x, t)`` (the
network, guided if asked, at integer timestep t) any number of times; ``steps`` of a setting is the number of steps,
and :meth:`SamplerConfig.nfe` the number of network evaluations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from ddpm_lightning import choices
from ddpm_lightning.diffusion.gaussian import GaussianDiffusion, Prediction
from ddpm_lightning.diffusion.samplers.noise import NoiseSource

#: the built-in samplers, as the command lines offer them (:mod:`ddpm_lightning.choices`); a registered sampler of
#: another name is a valid setting too
Sampler = Literal[choices.SAMPLERS]  # type: ignore[valid-type]
Spacing = Literal[choices.SPACINGS]  # type: ignore[valid-type]
SAMPLERS: tuple[str, ...] = choices.SAMPLERS
SPACINGS: tuple[str, ...] = choices.SPACINGS
GRID_SPACINGS = ("uniform", "quadratic")


@dataclass(frozen=True)
class SamplerOptions:
    """The settings of one sampler beyond the shared ones (none here): a sampler with its own subclasses this as a
    frozen dataclass with defaults, checks them in ``__post_init__`` and may add to the label."""

    def label(self) -> str:
        """What the options add to :meth:`SamplerConfig.label` (nothing by default)."""
        return ""

    def changed(self) -> list[str]:
        """The names of the options that differ from their defaults."""
        default = type(self)()
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)]


#: ``evaluate(x_t, t) -> Prediction``: the network (guided when asked) at the integer timestep t, counted.
Evaluate = Callable[[torch.Tensor, int], Prediction]
#: ``step(i, x_t, evaluate) -> x at the next visited level``, from the i-th visited timestep; may evaluate any number
#: of times (its spec's ``evaluations`` says how many per run).
Step = Callable[[int, torch.Tensor, Evaluate], torch.Tensor]


def _one_each(steps: int) -> int:
    return steps


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler. ``spacings``: the first is the default. ``visited(diffusion, config)``: the timesteps of
    the levels it visits, high to low (None: the integer grid of ``spacing``). ``to_clean_data``: the last step goes
    to the clean data, so t = 0 needs no evaluation. ``uses_eta``: it reads the setting's ``eta``."""

    name: str
    make_step: Callable[[Chain], Step]
    spacings: tuple[str, ...] = GRID_SPACINGS
    options: type[SamplerOptions] = SamplerOptions
    evaluations: Callable[[int], int] = _one_each
    visited: Callable[[GaussianDiffusion, SamplerConfig], list[int]] | None = None
    to_clean_data: bool = False
    uses_eta: bool = False


_REGISTRY: dict[str, SamplerSpec] = {}


def register(name: str, make_step: Callable[[Chain], Step], **spec: Any) -> SamplerSpec:
    """Register the sampler ``name`` (the fields of :class:`SamplerSpec`); a sampler file calls this once."""
    if name in _REGISTRY and _REGISTRY[name].make_step is not make_step:
        raise ValueError(f"a sampler named {name!r} is registered already")
    _REGISTRY[name] = SamplerSpec(name, make_step, **spec)
    return _REGISTRY[name]


def registered() -> tuple[str, ...]:
    """The names of the registered samplers: the built-in ones in the order of :data:`SAMPLERS`, then the others in
    the order they were registered."""
    return tuple(sorted(_REGISTRY, key=lambda name: SAMPLERS.index(name) if name in SAMPLERS else len(SAMPLERS)))


def spec_of(name: str) -> SamplerSpec:
    """The registered sampler ``name``; an unknown name is a ValueError naming the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(registered())}")
    return _REGISTRY[name]


def check_steps(n: object, T: int, sampler: str) -> int:
    """``n`` steps checked to lie in [1, T]."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}] for {sampler}, got {n!r}")
    return n


def sampling_timesteps(
    num_timesteps: int, sampler: str = "ddpm", num_steps: int | None = None, spacing: str = "uniform"
) -> list[int]:
    """The timesteps a sampler on the integer grid visits, one network evaluation each, from high to low.

    ``num_steps`` None or T: all T timesteps. Fewer are spaced uniformly over [0, T-1] (the ends included, as
    improved-diffusion's respacing) or quadratically over [0, 0.8 T] (Song et al. 2021, Appendix D.2, their
    CIFAR-10 choice). A sampler whose last step lands on the clean data (``dpmpp_2m``) spaces ``num_steps + 1``
    points the same way and leaves out t = 0: its last step goes from about T / num_steps straight to the clean data
    (first order), as diffusers' DPMSolverMultistepScheduler does, rather than spending an evaluation on t = 0 and a
    second-order step with a large extrapolation there.
    """
    spec = spec_of(sampler)
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r} of the integer timesteps; allowed: {', '.join(GRID_SPACINGS)}")
    T = num_timesteps
    n = check_steps(T if num_steps is None else num_steps, T, sampler)
    skip_zero = spec.to_clean_data and n < T
    points = n + 1 if skip_zero else n
    if spacing == "uniform":
        steps = torch.linspace(0, T - 1, points, dtype=torch.float64).round().long().tolist()
    else:
        steps = (torch.linspace(0, (0.8 * T) ** 0.5, points, dtype=torch.float64) ** 2).floor().long().tolist()
        # the squares crowd together near t = 0: push repeats up so that every step is distinct
        for i in range(1, points):
            steps[i] = max(steps[i], steps[i - 1] + 1)
    return steps[:0:-1] if skip_zero else steps[::-1]


def _options_for(
    name: str, options: SamplerOptions | Mapping[str, Any] | None, given: Mapping[str, Any]
) -> SamplerOptions:
    """The options of sampler ``name`` from ``options`` and flat ``given`` names (``S_churn=40``). Another sampler's
    options at their defaults are dropped (a rename keeps what applies); set ones are an error naming that sampler."""
    own = spec_of(name).options
    if isinstance(options, Mapping):  # a config file's nested form
        options, given = None, {**options, **given}
    if options is not None and type(options) is not own:
        if options.changed():
            raise ValueError(f"{', '.join(options.changed())} apply to another sampler, not to {name}")
        options = None
    known = {f.name for f in dataclasses.fields(own)}
    foreign = {k: v for k, v in given.items() if k not in known}
    for key, value in foreign.items():
        owners = [s for s in _REGISTRY.values() if key in {f.name for f in dataclasses.fields(s.options)}]
        if not owners:
            allowed = ", ".join(sorted({*known, *(f.name for f in dataclasses.fields(SamplerConfig))} - {"options"}))
            raise ValueError(f"unknown sampler setting {key!r}; allowed for {name}: {allowed}")
        if value != getattr(owners[0].options(), key):
            changed = [k for k in foreign if any(k == f.name for f in dataclasses.fields(owners[0].options))]
            raise ValueError(f"{', '.join(changed)} apply to the {owners[0].name} sampler only, not to {name}")
    mine = {k: v for k, v in given.items() if k in known}
    if options is None:
        return own(**mine)
    return dataclasses.replace(options, **mine) if mine else options


@dataclass(frozen=True, init=False)
class SamplerConfig:
    """How samples are drawn: one value used by the module, the callbacks, the commands and the configs.

    Args:
        name: a registered sampler: ``"ddpm"`` (ancestral), ``"ddim"``, ``"dpmpp_2m"`` (DPM-Solver++(2M)) or
            ``"heun"`` (EDM), or one of your own (:func:`register`).
        steps: the sampler's steps; None: all T (the full chain). One network evaluation each, except Heun's
            2 ``steps`` - 1 (:meth:`nfe`).
        eta: DDIM's noise scale (0: deterministic; 1 on the full chain: the DDPM posterior variance).
        spacing: how the steps are spread: ``"uniform"`` over [0, T-1] or ``"quadratic"`` over [0, 0.8 T] (Song et
            al. 2021's CIFAR-10 choice) for the samplers on the integer timesteps; ``"karras"`` (Karras et al. 2022,
            Eq. 5, rho) for Heun. None: the sampler's default (its first spacing).
        guidance_scale: classifier-free guidance scale s >= 0 of a class-conditional model (:func:`guided`); 1:
            plain conditional sampling (one network evaluation per step, the only value for an unconditional model).
        autoguidance_scale: w of autoguidance by a guide model (:class:`Guide`); 1: none. Two network evaluations per
            evaluation counted in :meth:`nfe`, the guide's and the main model's.
        options: the sampler's own options (its :class:`SamplerOptions` class, e.g. Heun's ``rho``, ``sigma_max``,
            ``S_churn``, ...); also given flat by name, as in YAML: ``SamplerConfig("heun", 18, S_churn=40)``.

    Names and values are checked at construction; ``steps`` against a model's T by :meth:`num_steps`.
    In YAML: ``sampler: {name: ddim, steps: 50}``, ``sampler: {name: heun, steps: 18, S_churn: 40}``.
    """

    name: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    spacing: str | None = None
    guidance_scale: float = 1.0
    autoguidance_scale: float = 1.0
    options: SamplerOptions | None = None

    def __init__(
        self,
        name: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        spacing: str | None = None,
        guidance_scale: float = 1.0,
        autoguidance_scale: float = 1.0,
        options: SamplerOptions | Mapping[str, Any] | None = None,
        **sampler_options: Any,
    ) -> None:
        spec = spec_of(name)
        fields = {"name": name, "steps": steps, "eta": eta, "spacing": spacing}
        fields |= {"guidance_scale": guidance_scale, "autoguidance_scale": autoguidance_scale}
        fields["options"] = _options_for(name, options, sampler_options)
        for key, value in fields.items():
            object.__setattr__(self, key, value)
        if spacing is None:
            object.__setattr__(self, "spacing", spec.spacings[0])
        self._check(spec)

    def _check(self, spec: SamplerSpec) -> None:
        if self.spacing not in SPACINGS and self.spacing not in spec.spacings:
            raise ValueError(f"unknown spacing {self.spacing!r}; allowed: {', '.join(SPACINGS)}")
        if self.spacing not in spec.spacings:
            raise ValueError(
                f"spacing {self.spacing!r} is not one of {self.name}'s; allowed: {', '.join(spec.spacings)}"
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

    @property
    def spec(self) -> SamplerSpec:
        """The registered sampler of this setting."""
        return spec_of(self.name)

    @classmethod
    def parse(
        cls,
        value: SamplerConfig | Mapping[str, Any] | str | None = None,
        base: SamplerConfig | None = None,
        **changes: Any,
    ) -> SamplerConfig:
        """A config from a config, a mapping (YAML), a sampler name or None (``base``), then ``changes`` that are
        not None applied on top: ``parse("ddim", base, steps=20)``. Fields not given keep ``base``'s values, except
        those that do not apply to the named sampler (another's spacing, another's options), which take its
        defaults."""
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
        spec = spec_of(name)
        fields: dict[str, Any] = {"name": name}
        if self.spacing not in spec.spacings:
            fields["spacing"] = None
        if type(self.options) is not spec.options:
            fields["options"] = spec.options()
        return dataclasses.replace(self, **fields)

    def num_steps(self, num_timesteps: int) -> int:
        """The sampler's steps for a process of ``num_timesteps`` steps, checked to lie in [1, T]."""
        return check_steps(num_timesteps if self.steps is None else self.steps, num_timesteps, self.name)

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The integer timesteps a sampler on the timestep grid visits, high to low (:func:`sampling_timesteps`);
        a sampler of its own levels (Heun: the schedule's noise levels) has :meth:`visited` only."""
        if self.spec.visited is not None:
            raise ValueError(
                f"{self.name} visits noise levels of the schedule, not a spacing of T: use visited(diffusion)"
            )
        return sampling_timesteps(num_timesteps, self.name, self.num_steps(num_timesteps), self.spacing)

    def visited(self, diffusion: GaussianDiffusion) -> list[int]:
        """The timestep of the noise level at the start of each step, high to low, one per step: where the chain
        x_t can be recorded (``return_steps``)."""
        if self.spec.visited is not None:
            return self.spec.visited(diffusion, self)
        return self.timesteps(diffusion.num_timesteps)

    def evaluations(self, num_timesteps: int) -> int:
        """Network evaluations per sample of the main model for a process of ``num_timesteps`` steps."""
        return self.spec.evaluations(self.num_steps(num_timesteps))

    def steps_for_evaluations(self, nfe: int) -> int:
        """The most steps whose network evaluations (of the main model) are at most ``nfe``, at least 1."""
        steps = nfe
        while steps > 1 and self.spec.evaluations(steps) > nfe:
            steps -= 1
        return steps

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations per sample for a process of ``num_timesteps`` steps (autoguidance's guide counted)."""
        return self.evaluations(num_timesteps) * (2 if self.autoguidance_scale != 1 else 1)

    def label(self, num_timesteps: int) -> str:
        """A short name for tags and file names, with the network evaluations of the main model: ``ddim50``,
        ``ddim50_eta1``, ``dpmpp_2m20``, ``ddpm1000`` (the full chain of T = 1000), ``ddim50_quad`` (quadratic
        spacing), ``heun19`` (10 Heun steps), ``heun19_churn40``, ``ddim50-s3`` (guidance scale 3), ``ddim50-ag2``
        (autoguidance w = 2)."""
        evaluations = self.evaluations(num_timesteps)
        label = f"{self.name}{evaluations}" + (f"_eta{self.eta:g}" if self.spec.uses_eta and self.eta > 0 else "")
        label += "_quad" if self.spacing == "quadratic" and evaluations < num_timesteps else ""
        label += self.options.label()
        label += f"-s{self.guidance_scale:g}" if self.guidance_scale != 1 else ""
        return label + (f"-ag{self.autoguidance_scale:g}" if self.autoguidance_scale != 1 else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, flat as in YAML, for hyper-parameters and reports; the guidance scales only when they are
        not 1 and the sampler's own options only for that sampler, so that settings read as they always have."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        for scale in ("guidance_scale", "autoguidance_scale"):
            if fields[scale] == 1:
                del fields[scale]
        return fields | dataclasses.asdict(self.options)


class Chain(NamedTuple):
    """What a sampler's steps see: the process, the visited timesteps (high to low), the setting and the noise."""

    diffusion: GaussianDiffusion
    timesteps: list[int]
    config: SamplerConfig
    noise: NoiseSource
    clip_denoised: bool
    device: torch.device
