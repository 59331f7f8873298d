"""The base of callbacks that work during training: every ``every_n_steps`` optimizer steps and when fit ends, on
every rank (an evaluation's collectives need them all), with the work dealt out to the ranks by index."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["EveryNSteps", "gather_by_index", "rank_indices"]


def rank_indices(trainer: L.Trainer, num: int) -> list[int]:
    """This rank's share of the indices ``0 .. num - 1``: ``rank, rank + world_size, ...``."""
    return list(range(trainer.global_rank, num, trainer.world_size))


def gather_by_index(trainer: L.Trainer, local: torch.Tensor, num: int) -> torch.Tensor:
    """The rows of every rank (``local``: one row per index of :func:`rank_indices`, in order), put back in index
    order on the CPU: rows ``0 .. num - 1``, the same on every rank."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    shards = gather_all_tensors(local) if distributed else [local]
    ordered = torch.empty((num, *local.shape[1:]), dtype=local.dtype)
    for rank, shard in enumerate(shards):
        ordered[rank :: trainer.world_size] = shard.cpu()
    return ordered


class EveryNSteps(Callback):
    """Call :meth:`at_step` every ``every_n_steps`` optimizer steps and at the end of fit, at most once per step, on
    every rank.

    By default :meth:`at_step` logs the values of :meth:`evaluate`, which subclasses implement: called on every rank,
    it returns the same values on all of them (so they are logged without a further reduction). A callback with
    another output (images) overrides :meth:`at_step` instead.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this; None: only at the end of fit.
        on_fit_end: evaluate when fit ends, unless the last step was just evaluated.
    """

    def __init__(self, every_n_steps: int | None, on_fit_end: bool) -> None:
        super().__init__()
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive number of steps or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.on_fit_end = on_fit_end
        self._last_step = -1

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The values to log at the current step, the same on every rank."""
        raise NotImplementedError

    def at_step(self, trainer: L.Trainer, pl_module: L.LightningModule, fit_end: bool) -> None:
        """The work of a scheduled step (``fit_end``: the one when fit ends): log :meth:`evaluate`'s values."""
        values = self.evaluate(trainer, pl_module)
        if not fit_end:
            for name, value in values.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False)  # already the same on all
            return
        # self.log is not allowed in on_train_end: write to the loggers and callback_metrics (for ModelCheckpoint)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.at_step(trainer, pl_module, fit_end=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_fit_end or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self.at_step(trainer, pl_module, fit_end=True)
