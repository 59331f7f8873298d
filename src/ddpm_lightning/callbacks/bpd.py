"""``val/bpd``: the variational bound in bits/dim on a fixed subset of real images during training, the same number on
1 or N processes.

Image ``i`` of the subset is seeded by ``seed + i`` (its noise and timesteps) and the indices are dealt out to the
ranks, so each image's figure does not depend on the number of processes; the per-image figures are gathered and
averaged on every rank.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch

from ddpm_lightning.callbacks.periodic import EveryNSteps, gather_by_index, rank_indices
from ddpm_lightning.data import stack_items
from ddpm_lightning.evaluation.nll import bpd_of_images, off_grid_distance, quantize_to_grid

__all__ = ["BPDCallback"]


class BPDCallback(EveryNSteps):
    """Log ``val/bpd`` (the NLL bound of Ho et al. 2020, Eq. 5, EMA weights) every ``every_n_steps`` steps and at the
    end of fit.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this; None: only at the end of fit.
        num_images: the first images of ``datamodule.real_images_dataset(split)`` (quantized to the 8-bit grid when
            they are off it).
        t_samples: KL terms per image, an unbiased estimate of their sum; None: all T (T network evaluations per
            image).
        seed: image ``i`` is seeded by ``seed + i``.
        batch_size: images evaluated at once on each rank.
        clip_denoised: clip the predicted x_0 to [-1, 1] inside the bound.
        on_fit_end: evaluate when fit ends, unless the last step was just evaluated.
    """

    def __init__(
        self,
        every_n_steps: int | None = 10_000,
        num_images: int = 64,
        t_samples: int | None = 10,
        split: Literal["train", "val", "test"] = "val",
        seed: int = 0,
        batch_size: int = 64,
        clip_denoised: bool = True,
        on_fit_end: bool = True,
    ):
        super().__init__(every_n_steps, on_fit_end)
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.num_images = num_images
        self.t_samples = t_samples
        self.split = split
        self.seed = seed
        self.batch_size = batch_size
        self.clip_denoised = clip_denoised
        self.per_image: torch.Tensor | None = None  # the last evaluation's figures, in image order

    def _images(self, trainer: L.Trainer, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "real_images_dataset"):
            raise ValueError("BPDCallback needs a datamodule with real_images_dataset(split), e.g. the digits")
        dataset = datamodule.real_images_dataset(self.split)
        if len(dataset) < self.num_images:
            raise ValueError(f"BPDCallback: num_images={self.num_images} but the {self.split} split has {len(dataset)}")
        images, labels = stack_items([dataset[i] for i in indices])
        return quantize_to_grid(images) if len(images) and off_grid_distance(images) > 1e-3 else images, labels

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """``val/bpd``: this rank's share of the images, then the mean over all ranks' images (the same on all)."""
        indices = rank_indices(trainer, self.num_images)
        images, labels = self._images(trainer, indices)
        if len(images):
            local = bpd_of_images(
                pl_module,
                images,
                t_samples=self.t_samples,
                clip_denoised=self.clip_denoised,
                seeds=[self.seed + i for i in indices],
                batch_size=self.batch_size,
                labels=labels if pl_module.num_classes is not None else None,  # a conditional model: log p(x | y)
            )["total"]
        else:
            local = torch.zeros(0, dtype=torch.float64)
        self.per_image = gather_by_index(trainer, local.to(pl_module.device), self.num_images)
        return {"val/bpd": float(self.per_image.mean())}
