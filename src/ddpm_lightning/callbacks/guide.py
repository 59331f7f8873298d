"""An early checkpoint of a run, kept as the weaker model of autoguidance (Karras et al. 2024, "Guiding a diffusion
model with a bad version of itself"): the guide costs no training of its own."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ddpm_lightning.callbacks.resilience import last_checkpoint_path

__all__ = ["GuideCheckpoint"]


class GuideCheckpoint(Callback):
    """Write one checkpoint once ``at_fraction`` of ``trainer.max_steps`` optimizer steps are done (the paper's guides
    were trained for a fraction of the main model's run), or ``at_step`` steps, next to ``last.ckpt`` as ``filename``.
    With both, ``at_fraction`` applies to a run with ``max_steps`` and ``at_step`` to one bounded by time only.

    Use it with ``ddpm sample --guide-ckpt runs/NAME/checkpoints/guide.ckpt --autoguidance-scale 2``. Like every
    checkpoint it holds the EMA weights in its ``state_dict``, which sampling uses."""

    def __init__(self, at_step: int | None = None, at_fraction: float | None = None, filename: str = "guide.ckpt"):
        if at_step is None and at_fraction is None:
            raise ValueError("give at_step, at_fraction or both (at_step then serves runs without max_steps)")
        if at_step is not None and not (isinstance(at_step, int) and at_step >= 1):
            raise ValueError(f"at_step must be a positive number of optimizer steps, got {at_step!r}")
        if at_fraction is not None and not 0 < at_fraction < 1:
            raise ValueError(f"at_fraction must lie in (0, 1) (a share of trainer.max_steps), got {at_fraction}")
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"filename must be a file name ending in .ckpt, got {filename!r}")
        self.at_step = at_step
        self.at_fraction = at_fraction
        self.filename = filename

    def step(self, trainer: L.Trainer) -> int:
        """The optimizer step after which the guide is written."""
        has_length = trainer.max_steps is not None and trainer.max_steps >= 1
        if self.at_fraction is not None and has_length:
            return max(1, round(self.at_fraction * trainer.max_steps))
        if self.at_step is not None:
            return self.at_step
        raise ValueError(
            f"GuideCheckpoint(at_fraction={self.at_fraction}) needs trainer.max_steps; give at_step for a run "
            "bounded by max_time or epochs"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step(trainer)  # a bad setting fails before the first step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step(trainer):
            # the weights and the EMA, as a ModelCheckpoint of the run would keep them (a loadable, resumable file)
            trainer.save_checkpoint(last_checkpoint_path(trainer).with_name(self.filename), weights_only=False)
