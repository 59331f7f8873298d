"""Reverse-chain samplers over one loop, reproducible from seeds.

``ddpm``: the ancestral sampler of Ho et al. 2020 (Algorithm 2), on the full chain or on a strided sub-chain with
respaced betas (Nichol & Dhariwal 2021, Sec. 4). ``ddim``: Song et al. 2021 (Eq. 12), eta >= 0.
``dpmpp_2m``: DPM-Solver++(2M) of Lu et al. 2022 (Algorithm 2), deterministic. Each makes one network evaluation per
visited timestep, so ``num_steps`` is the number of network evaluations (NFE).

All noise is drawn on the CPU from explicit generators and then moved to the model's device, so a seed gives the
same samples on any device, and sample i of an evaluation can be seeded by i whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ddpm_lightning.diffusion.gaussian import Denoiser, GaussianDiffusion

Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
Spacing = Literal["uniform", "quadratic"]
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
SPACINGS = ("uniform", "quadratic")


def check_sampler(sampler: str, spacing: str = "uniform") -> None:
    """Raise ValueError for an unknown sampler or spacing name, listing the allowed ones."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")


def sampling_timesteps(
    num_timesteps: int, sampler: Sampler = "ddpm", num_steps: int | None = None, spacing: Spacing = "uniform"
) -> list[int]:
    """The timesteps a sampler visits, one network evaluation each, from high to low.

    ``num_steps`` None or T: all T timesteps. Fewer are spaced uniformly over [0, T-1] (the ends included, as
    improved-diffusion's respacing) or quadratically over [0, 0.8 T] (Song et al. 2021, Appendix D.2, their
    CIFAR-10 choice). ``dpmpp_2m`` spaces ``num_steps + 1`` points the same way and leaves out t = 0: its last step
    goes from about T / num_steps straight to the clean data (first order), as diffusers' DPMSolverMultistepScheduler
    does, rather than spending an evaluation on t = 0 and a second-order step with a large extrapolation there.
    """
    check_sampler(sampler, spacing)
    T = num_timesteps
    n = T if num_steps is None else num_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, {T}] (network evaluations) for {sampler}, got {n!r}")
    skip_zero = sampler == "dpmpp_2m" and n < T
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


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Denoiser,
    shape: tuple[int, ...],
    *,
    sampler: Sampler = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    spacing: Spacing = "uniform",
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    return_steps: Sequence[int] | None = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the reverse chain from x_T ~ N(0, I) to x_0 with ``sampler`` (see the module docstring).

    Args:
        shape: (B, C, H, W) of the batch.
        num_steps: network evaluations = visited timesteps (:func:`sampling_timesteps`); None: all T.
        eta: DDIM's noise scale (0: deterministic; 1 on the full chain: the DDPM posterior variance).
        spacing: how fewer than T timesteps are spread (:func:`sampling_timesteps`).
        seed / seeds / generator: reproducibility: one seed for the batch, one seed per sample, or a CPU generator.
        return_steps: timesteps t at which to record the current x_t (only the visited ones are recorded).
        clip_denoised: clip every x_0 prediction to [-1, 1].
        device: where the model runs; defaults to the device of the diffusion buffers.

    Returns:
        x_0 in the model's range, float32; with ``return_steps`` also a dict {t: x_t} on the CPU.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = torch.device(device) if device is not None else diffusion.betas.device
    timesteps = sampling_timesteps(diffusion.num_timesteps, sampler, num_steps, spacing)
    noise = NoiseSource(tuple(shape), seed=seed, seeds=seeds, generator=generator)
    record = set(return_steps or ())
    chain: dict[int, torch.Tensor] = {}
    # the ancestral sampler on a sub-chain steps through the respaced process, indexed 0..n-1 from low to high t
    respaced = sampler == "ddpm" and len(timesteps) < diffusion.num_timesteps
    chain_diffusion = diffusion.respaced(timesteps) if respaced else diffusion

    x_t = noise.draw(device)
    batch = shape[0]
    x0_prev: torch.Tensor | None = None  # DPM-Solver++'s data prediction at the previous timestep
    steps = tqdm(timesteps, desc=f"sampling ({sampler}, {len(timesteps)} steps)", leave=False, disable=not progress)
    for i, t_int in enumerate(steps):
        if t_int in record:
            chain[t_int] = x_t.detach().cpu()
        t = torch.full((batch,), t_int, dtype=torch.long, device=device)
        eps = diffusion.predict_eps(model, x_t, t)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if sampler == "ddpm":
            step_t = torch.full_like(t, len(timesteps) - 1 - i) if respaced else t
            x_t = chain_diffusion.ddpm_step(eps, x_t, step_t, noise.draw(device), clip_denoised=clip_denoised)
        elif sampler == "ddim":
            step_noise = noise.draw(device) if eta > 0 else None
            x_t = diffusion.ddim_step(eps, x_t, t, t_next, eta=eta, noise=step_noise, clip_denoised=clip_denoised)
        else:
            x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            t_prev = timesteps[i - 1] if i > 0 else None
            x_t = diffusion.dpmpp_2m_step(x0, x_t, t_int, t_next, x0_prev=x0_prev, t_prev=t_prev)
            x0_prev = x0
    x0 = x_t.float()
    return (x0, chain) if return_steps is not None else x0
