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
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "samples")
        for index, image in zip(batch.tolist(), to_uint8(prediction.cpu()), strict=True):
            save_png(image, out / f"{index:06d}.png")
