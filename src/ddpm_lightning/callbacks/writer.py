"""Writes the samples of ``ddpm predict`` as PNG files named by their global sample index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.io import save_png

__all__ = ["SampleWriter"]


class SampleWriter(BasePredictionWriter):
    """Save each predicted image as ``out_dir/{index:06d}.png``; every process writes its own share.

    Args:
        out_dir: target folder; default ``<trainer.default_root_dir>/samples``.
    """

    def __init__(self, out_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self._written = 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        out = self.folder(trainer)
        for index, image in zip(batch.tolist(), to_uint8(prediction.cpu()), strict=True):
            save_png(image, out / f"{index:06d}.png")
        self._written += len(batch)

    def folder(self, trainer: L.Trainer) -> Path:
        """Where the images go: ``out_dir``, or ``<trainer.default_root_dir>/samples``."""
        return Path(self.out_dir or Path(trainer.default_root_dir) / "samples")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = 0

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say where the images went (the first process, for all of them)."""
        written = int(trainer.strategy.reduce(torch.tensor(self._written, device=pl_module.device), reduce_op="sum"))
        if trainer.is_global_zero:
            print(f"wrote {written} samples to {self.folder(trainer)}/ (000000.png ...)", flush=True)
