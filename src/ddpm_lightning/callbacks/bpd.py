"""``val/bpd``: the variational bound in bits/dim on a fixed subset of real images during training, the same number on
1 or N processes.

Image ``i`` of the subset is seeded by ``seed + i`` (its noise and timesteps) and the indices are dealt out to the
ranks, so each image's figure does not depend on the number of processes; the per-image figures are gathered and
averaged on every rank.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.utilities.distributed import gather_all_tensors

from ddpm_lightning.data import images_of
from ddpm_lightning.evaluation.nll import bpd_of_images, off_grid_distance, quantize_to_grid

__all__ = ["BPDCallback"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class BPDCallback(Callback):
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
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps or None, got {every_n_steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.t_samples = t_samples
        self.split = split
        self.seed = seed
        self.batch_size = batch_size
        self.clip_denoised = clip_denoised
        self.on_fit_end = on_fit_end
        self._last_step = -1
        self.per_image: torch.Tensor | None = None  # the last evaluation's figures, in image order

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        value = self.evaluate(trainer, pl_module)
        pl_module.log("val/bpd", value, on_step=True, on_epoch=False, sync_dist=False)  # already the same on all

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_fit_end or trainer.global_step == self._last_step:
            return
        value = self.evaluate(trainer, pl_module)
        trainer.callback_metrics["val/bpd"] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics({"val/bpd": value}, step=trainer.global_step)

    def _images(self, trainer: L.Trainer, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "real_images_dataset"):
            raise ValueError("BPDCallback needs a datamodule with real_images_dataset(split), e.g. the digits")
        dataset = datamodule.real_images_dataset(self.split)
        if len(dataset) < self.num_images:
            raise ValueError(f"BPDCallback: num_images={self.num_images} but the {self.split} split has {len(dataset)}")
        items = [dataset[i] for i in indices]
        images = torch.stack([images_of(item) for item in items])
        labels = (
            torch.tensor([int(item[1]) for item in items]) if items and isinstance(items[0], (list, tuple)) else None
        )
        return quantize_to_grid(images) if len(images) and off_grid_distance(images) > 1e-3 else images, labels

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """This rank's share of the images, then the mean over all ranks' images (every rank returns it)."""
        self._last_step = trainer.global_step
        rank, world = trainer.global_rank, trainer.world_size
        indices = list(range(rank, self.num_images, world))
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
        local = local.to(pl_module.device)
        shards = gather_all_tensors(local) if _distributed() else [local]
        ordered = torch.zeros(self.num_images, dtype=torch.float64)
        for r, shard in enumerate(shards):
            ordered[r::world] = shard.cpu()  # rank r evaluated images r, r + world, ...
        self.per_image = ordered
        return float(ordered.mean())
