"""EMA of the weights through Lightning's own ``EMAWeightAveraging``, with public access to the averaged model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    """Exponential moving average of all weights (Ho et al.: decay 0.9999, updated after every optimizer step).

    Lightning keeps the average on the model's device, swaps it in for validation, writes it to the checkpoint's
    ``state_dict`` (the raw weights go to ``current_model_state``) and restores both on resume. So a checkpoint loaded
    with ``DiffusionModule.load_from_checkpoint`` holds the EMA weights.

    The update is one ``torch._foreach_lerp_`` over the parameters, starting from the initial weights as in Ho et
    al.'s code (TensorFlow's ``ExponentialMovingAverage``), instead of ``AveragedModel``'s loop: that loop launches a
    few kernels per parameter and reads its step counter on the host twice per step (two host-device syncs).
    Buffers (schedule tables, fixed kernels) are constants and keep the values copied at the start.
    """

    def __init__(self, decay: float = 0.9999, update_starting_at_step: int | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(decay=decay, update_starting_at_step=update_starting_at_step)
        self.decay = decay
        self._pairs: tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # keep the average where training runs: the model may still be on the CPU when setup is called
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)
        self._pairs = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self.update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """One EMA step: average = decay * average + (1 - decay) * weights, for every parameter at once.

        With ``update_starting_at_step`` the first update copies the weights: the average starts there.
        """
        if self._pairs is None:
            self._pairs = (list(self._average_model.module.parameters()), list(pl_module.parameters()))
        average, current = self._pairs
        if self.update_starting_at_step is not None and self._latest_update_step == 0:
            torch._foreach_copy_(average, current)
        else:
            torch._foreach_lerp_(average, current, 1.0 - self.decay)
        self._average_model.n_averaged += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning would copy the average into the model here, before ModelCheckpoint writes the final last.ckpt:
        # that checkpoint would then lose the raw weights and a resumed run would continue from the EMA. Keep the
        # raw weights; sampling reads the average through ``average_module()`` and checkpoints hold both.
        return

    def average_module(self) -> L.LightningModule | None:
        """The averaged copy of the LightningModule during fit, or None outside fit."""
        return None if self._average_model is None else self._average_model.module

    @property
    def state_key(self) -> str:
        # one EMA per run: a stable key lets a checkpoint resume even if the decay changes
        return "EMA"
