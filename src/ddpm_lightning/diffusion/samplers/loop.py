"""The reverse chain: one loop for every registered sampler, from x_T ~ N(0, I) to x_0, reproducible from seeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ddpm_lightning.diffusion.gaussian import Denoiser, GaussianDiffusion, Prediction
from ddpm_lightning.diffusion.samplers.core import Chain, SamplerConfig
from ddpm_lightning.diffusion.samplers.guidance import Guide, check_guide, evaluator, guided
from ddpm_lightning.diffusion.samplers.noise import NoiseSource


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
    model = _conditioned(diffusion, model, config, shape[0], device, y, null_label, guide)
    noise = NoiseSource(tuple(shape), seed=seed, seeds=seeds, generator=generator)
    record = nearest_visited(return_steps, visited) if return_steps else {}
    chain: dict[int, torch.Tensor] = {}

    x_t = noise.draw(device)
    step = config.spec.make_step(Chain(diffusion, visited, config, noise, clip_denoised, device))
    evaluate = evaluator(diffusion, model, guide, config.autoguidance_scale, shape[0], device)
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


def _conditioned(
    diffusion: GaussianDiffusion,
    model: Denoiser,
    config: SamplerConfig,
    batch: int,
    device: torch.device,
    y: torch.Tensor | None,
    null_label: int | None,
    guide: Guide | None,
) -> Denoiser:
    """The model for the labels ``y`` (guided with the setting's scale), with the guidance settings checked against
    what is given."""
    if y is not None:
        if null_label is None or tuple(y.shape) != (batch,):
            raise ValueError(f"labels y need a null_label and the shape ({batch},), got {tuple(y.shape)}")
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
    return model
