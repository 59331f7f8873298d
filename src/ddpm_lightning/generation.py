"""Guided and labelled sampling: :class:`Sampling`, the sampling methods of
:class:`~ddpm_lightning.lit_module.DiffusionModule` (``sample``, ``sampler_config_for``, ``sampling_module``,
``use_average``, ``predict_step``): the sampler setting and the labels checked, the autoguidance guide's network, the
weights sampled with (the registered average's), the eval mode and the progress bar around the reverse chain
(:func:`ddpm_lightning.diffusion.samplers.sample`).

``DiffusionModule`` inherits them, so that ``lit_module`` imports this module and not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_lightning import compat
from ddpm_lightning.averaging import WeightAverage
from ddpm_lightning.conditioning import label_kwargs
from ddpm_lightning.data.base import images_of
from ddpm_lightning.diffusion import SamplerConfig, samplers
from ddpm_lightning.diffusion.samplers import Guide

__all__ = ["Sampling", "guide_denoiser", "sample_labels"]


class Sampling:
    """The sampling methods of a ``LightningModule`` with ``diffusion`` (a
    :class:`~ddpm_lightning.diffusion.GaussianDiffusion`), ``net``, ``image_shape`` (C, H, W), ``num_classes``,
    ``sampler_config`` and ``denoiser(net, y)``: a base of ``DiffusionModule``."""

    def use_average(self, average: WeightAverage | None) -> None:
        """Sample and validate with ``average``'s weights (a weight-averaging callback registers itself in its
        ``setup``); None: with this module's own. The rule is in :mod:`ddpm_lightning.averaging`."""
        self._weight_average = average

    def sampling_module(self) -> Any:
        """The module whose weights sampling uses: the registered average's (:meth:`use_average`) when it has one,
        else this one. A checkpoint written with an average already holds the averaged weights in its ``state_dict``.
        """
        average = getattr(self, "_weight_average", None)
        module = average.average_module() if average is not None else None
        return self if module is None else module

    def sampler_config_for(self, sampler: SamplerConfig | Mapping | str | None = None, **changes: Any) -> SamplerConfig:
        """The module's sampler setting with ``sampler`` (a setting or a name) and non-None ``changes`` applied,
        checked against T and, for guidance, against the model being conditional."""
        config = SamplerConfig.parse(sampler, self.sampler_config, **changes)
        config.num_steps(self.diffusion.num_timesteps)
        if config.guidance_scale != 1 and self.num_classes is None:
            raise ValueError(
                f"guidance_scale={config.guidance_scale:g} needs a class-conditional model, but this one is "
                "unconditional (num_classes=None): use guidance_scale=1"
            )
        return config

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Samples for a batch of global sample indices; sample i is seeded by i (and, for a conditional model, has
        the class i mod num_classes)."""
        indices = [int(i) for i in images_of(batch)]
        y = None if self.num_classes is None else [i % self.num_classes for i in indices]
        trainer = compat.attached_trainer(self)
        # a bar of the batch's network evaluations beside Lightning's bar of the batches (first process only)
        progress = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
        return self.sample(len(indices), seeds=indices, y=y, progress=progress)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        sampler: SamplerConfig | Mapping | str | None = None,
        *,
        seed: int | None = 0,
        seeds: Sequence[int] | None = None,
        return_steps: Sequence[int] | None = None,
        progress: bool | Callable[[int], Any] = False,
        use_ema: bool = True,
        y: torch.Tensor | Sequence[int] | None = None,
        guide: Sampling | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Generate ``num`` images in [-1, 1] with the EMA weights (fixed seed by default; ``seeds`` per sample).

        ``sampler``: a :class:`SamplerConfig`, a sampler name (the module's setting with that name) or None (the
        module's setting). ``y``: the class of each image (``num`` labels in 0..num_classes-1, or num_classes for the
        null class), needed by a class-conditional model and guided with the setting's ``guidance_scale``; the noise
        does not depend on it. ``guide``: the weaker model of autoguidance (an earlier checkpoint or a smaller
        network of the same process and image shape) used with the setting's ``autoguidance_scale``
        (:class:`~ddpm_lightning.diffusion.samplers.Guide`); it gets the labels when it is conditional too.
        ``return_steps``: record x_t at the visited timestep nearest to each of these (the keys of the dict).
        ``progress``: a bar of the network evaluations (True), or a function called with the evaluations of each
        step (a caller's bar over several batches).
        """
        config = self.sampler_config_for(sampler)
        labels = sample_labels(num, y, self.num_classes)
        modules = [self.sampling_module() if use_ema else self]
        guide_spec = None
        if guide is not None:
            modules.append(guide.sampling_module() if use_ema else guide)
            guide_spec = Guide(guide.diffusion, guide_denoiser(self, guide, modules[1].net, labels))
        modes = [m.training for m in modules]
        T = self.diffusion.num_timesteps
        bar = tqdm(total=config.nfe(T), desc=f"sampling ({config.label(T)})", unit="eval", leave=False,
                   disable=progress is not True)  # fmt: skip
        for m in modules:
            m.eval()
        try:
            return samplers.sample(
                self.diffusion,
                modules[0].net,
                (num, *self.image_shape),
                sampler=config,
                seed=None if seeds is not None else seed,
                seeds=seeds,
                return_steps=return_steps,
                device=self.device,
                progress=progress if callable(progress) else bar.update,
                y=labels,
                null_label=self.num_classes,
                guide=guide_spec,
            )
        finally:
            bar.close()
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)


def guide_denoiser(
    module: Sampling, guide: Sampling, net: nn.Module, labels: torch.Tensor | None
) -> Callable[..., torch.Tensor]:
    """The guide's network ``net`` as ``model(x_t, t)``: checked to draw images of ``module``'s shape, and given the
    labels when both models are conditional on the same classes."""
    if tuple(guide.image_shape) != tuple(module.image_shape):
        raise ValueError(
            f"the autoguidance guide draws images of shape {tuple(guide.image_shape)}, this model "
            f"{tuple(module.image_shape)}: the guide needs the same shape"
        )
    if guide.num_classes is None:
        return net
    if guide.num_classes != module.num_classes:
        raise ValueError(
            f"the autoguidance guide is conditional on {guide.num_classes} classes and this model on "
            f"{module.num_classes}: an unconditional guide, or one of the same classes"
        )
    return guide.denoiser(net, labels.to(module.device))


def sample_labels(num: int, y: torch.Tensor | Sequence[int] | None, num_classes: int | None) -> torch.Tensor | None:
    """``y`` as a (num,) long tensor checked against 0..num_classes (the null class); None for an unconditional
    model (which refuses labels, as a conditional one requires them)."""
    if y is None or num_classes is None:
        label_kwargs(num_classes, None if y is None else torch.zeros(num, dtype=torch.long))  # errors when y is wrong
        return None
    labels = torch.as_tensor(y, dtype=torch.long).flatten().cpu()
    if len(labels) != num:
        raise ValueError(f"got {len(labels)} labels y for {num} samples")
    bad = sorted({v for v in labels.tolist() if not 0 <= v <= num_classes})
    if bad:
        raise ValueError(
            f"class labels {bad} are not classes of this model: allowed 0..{num_classes - 1}, or "
            f"{num_classes} for the null class (unconditional)"
        )
    return labels
