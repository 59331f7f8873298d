"""Reverse-chain samplers (ancestral DDPM and DDIM) over one loop, reproducible from seeds.

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

Sampler = Literal["ddpm", "ddim"]
Spacing = Literal["uniform", "quadratic"]
SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")


def sampling_timesteps(
    num_timesteps: int, sampler: Sampler = "ddpm", num_steps: int | None = None, spacing: Spacing = "uniform"
) -> list[int]:
    """The timesteps a sampler visits, from high to low.

    DDPM visits all T steps. DDIM visits ``num_steps`` of them, spaced uniformly or quadratically (Song et al. 2021,
    Appendix D.2, which uses quadratic spacing for CIFAR-10).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    T = num_timesteps
    if sampler == "ddpm":
        if num_steps not in (None, T):
            raise ValueError(
                f"the ddpm sampler runs all {T} steps, got num_steps={num_steps}; use sampler='ddim' for fewer steps"
            )
        return list(range(T - 1, -1, -1))
    n = T if num_steps is None else num_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, {T}] for ddim, got {n}")
    if spacing == "uniform":
        steps = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().tolist()
    else:
        steps = (torch.linspace(0, (0.8 * T) ** 0.5, n, dtype=torch.float64) ** 2).floor().long().tolist()
        # the squares crowd together near t = 0: push repeats up so that every step is distinct
        for i in range(1, n):
            steps[i] = max(steps[i], steps[i - 1] + 1)
    return steps[::-1]


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
    """Run the reverse chain from x_T ~ N(0, I) to x_0 (Algorithm 2, or DDIM with ``sampler="ddim"``).

    Args:
        shape: (B, C, H, W) of the batch.
        num_steps, eta, spacing: DDIM settings (ignored by the ancestral sampler, which visits all T steps).
        seed / seeds / generator: reproducibility: one seed for the batch, one seed per sample, or a CPU generator.
        return_steps: timesteps t at which to record the current x_t (only the visited ones are recorded).
        device: where the model runs; defaults to the device of the diffusion buffers.

    Returns:
        x_0 in the model's range, float32; with ``return_steps`` also a dict {t: x_t} on the CPU.
    """
    device = torch.device(device) if device is not None else diffusion.betas.device
    timesteps = sampling_timesteps(diffusion.num_timesteps, sampler, num_steps if sampler == "ddim" else None, spacing)
    noise = NoiseSource(tuple(shape), seed=seed, seeds=seeds, generator=generator)
    record = set(return_steps or ())
    chain: dict[int, torch.Tensor] = {}

    x_t = noise.draw(device)
    batch = shape[0]
    steps = tqdm(timesteps, desc=f"sampling ({sampler})", leave=False, disable=not progress)
    for i, t_int in enumerate(steps):
        if t_int in record:
            chain[t_int] = x_t.detach().cpu()
        t = torch.full((batch,), t_int, dtype=torch.long, device=device)
        eps = diffusion.predict_eps(model, x_t, t)
        if sampler == "ddpm":
            x_t = diffusion.ddpm_step(eps, x_t, t, noise.draw(device), clip_denoised=clip_denoised)
        else:
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            step_noise = noise.draw(device) if eta > 0 else None
            x_t = diffusion.ddim_step(eps, x_t, t, t_prev, eta=eta, noise=step_noise, clip_denoised=clip_denoised)
    x0 = x_t.float()
    return (x0, chain) if return_steps is not None else x0
