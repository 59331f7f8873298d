"""Experiment tracking during fit: images per second, a progress bar free of host-device syncs, the loggers' runs.

A resumed ``ddpm fit --ckpt_path`` continues the same W&B run and the same TensorBoard/CSV ``version_N`` folder:
:class:`WandbRunId` writes the run id and the versions into every checkpoint and the CLI
(:mod:`ddpm_lightning.cli.fit`) hands them back to the loggers, through :func:`read_wandb_run_id` and
:func:`read_logger_versions`, before the loggers are created.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from ddpm_lightning.checkpoint import CheckpointError, read_checkpoint
from ddpm_lightning.data import images_of
from ddpm_lightning.guard import is_check_step

__all__ = [
    "LOGGER_VERSIONS_KEY",
    "WANDB_RUN_ID_KEY",
    "ImagesPerSecond",
    "ProgressBar",
    "WandbRunId",
    "logger_versions",
    "read_logger_versions",
    "read_wandb_run_id",
    "wandb_run_id",
]

WANDB_RUN_ID_KEY = "wandb_run_id"
LOGGER_VERSIONS_KEY = "logger_versions"


# ------------------------------------------------------------------------------------------------ throughput
class ImagesPerSecond(Callback):
    """Logs ``train/img_per_sec``: training images per second over all processes, data loading included.

    The rate is averaged over the last ``window`` batches (default: the trainer's ``log_every_n_steps``, so each
    logged value covers the interval since the previous one); validation time is left out.
    """

    def __init__(self, window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of batches or None, got {window}")
        self.window = window
        self._marks: deque[tuple[float, int]] = deque()  # (time, images seen so far)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks = deque(maxlen=(self.window or trainer.log_every_n_steps) + 1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if not self._marks:
            self._marks.append((time.perf_counter(), 0))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = images_of(batch)
        seen = self._marks[-1][1] + len(images) * trainer.world_size
        self._marks.append((time.perf_counter(), seen))
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        # only on the logging steps: logging a number copies it to the device, a sync on a GPU
        if t1 > t0 and is_check_step(trainer):
            pl_module.log("train/img_per_sec", (n1 - n0) / (t1 - t0), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks.clear()


# ------------------------------------------------------------------------------------------------ progress bar
class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar showing the module's ``last_loss``, a number it reads on the logging steps only.

    A metric logged with ``prog_bar=True`` is read back on every step, a host-device sync that stalls a GPU's launch
    queue; this bar shows ``pl_module.last_loss`` (when the module has one) instead. It takes TQDMProgressBar's
    settings.
    """

    @staticmethod
    def counts_steps(trainer: L.Trainer) -> bool:
        """Whether the run ends at ``max_steps`` with no epoch limit: then the bar counts the run's optimizer steps
        (``global_step`` of ``max_steps``), so its ETA is the whole run's, not the current epoch's."""
        return trainer.max_steps > 0 and (trainer.max_epochs is None or trainer.max_epochs < 0)

    def init_train_tqdm(self) -> Tqdm:
        """The training bar; one that counts steps is made with its total, so that no empty ``Training: 0/?`` bar is
        drawn (and left behind) before it."""
        trainer = self.trainer
        if not self.counts_steps(trainer):
            return super().init_train_tqdm()
        return Tqdm(
            desc="Training steps",
            total=trainer.max_steps,
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.counts_steps(trainer):
            return super().on_train_epoch_start(trainer, pl_module)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch: one bar (and one rate estimate) for the whole run
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("Training steps")
        bar.set_postfix({**self.get_metrics(trainer, pl_module), "epoch": trainer.current_epoch})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix({**self.get_metrics(trainer, pl_module), "epoch": trainer.current_epoch})

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None:
            metrics["loss"] = f"{loss:.4g}"
        return metrics


# ------------------------------------------------------------------------------------------------ W&B run id
def wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of the trainer's W&B run, or None without a WandbLogger."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def logger_versions(trainer: L.Trainer) -> list[dict[str, Any]]:
    """The class name, ``name`` and ``version`` of each TensorBoard and CSV logger of the trainer."""
    return [
        {"class": type(logger).__name__, "name": logger.name, "version": logger.version}
        for logger in trainer.loggers
        if isinstance(logger, (TensorBoardLogger, CSVLogger))
    ]


class WandbRunId(Callback):
    """Keeps the loggers' runs in every checkpoint, so a resumed fit continues them: the W&B run id
    (``checkpoint["wandb_run_id"]``) and the TensorBoard/CSV versions (``checkpoint["logger_versions"]``, a list of
    :func:`logger_versions`), so that a resume does not open a new ``version_N`` folder."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            checkpoint[WANDB_RUN_ID_KEY] = run_id
        versions = logger_versions(trainer)
        if versions:
            checkpoint[LOGGER_VERSIONS_KEY] = versions


def read_wandb_run_id(ckpt_path: str | Path) -> str | None:
    """The W&B run id stored in a checkpoint, or None when there is none or the file cannot be read."""
    try:
        # mmap: only the small top-level entries are read, not the weights
        run_id = read_checkpoint(ckpt_path, mmap=True).get(WANDB_RUN_ID_KEY)
    except CheckpointError:
        return None  # Lightning reports a missing or broken checkpoint itself, with the path
    return str(run_id) if run_id else None


def read_logger_versions(ckpt_path: str | Path) -> list[dict[str, Any]]:
    """The TensorBoard/CSV logger versions stored in a checkpoint (:func:`logger_versions`); empty when there are none
    or the file cannot be read."""
    try:
        versions = read_checkpoint(ckpt_path, mmap=True).get(LOGGER_VERSIONS_KEY)
    except CheckpointError:
        return []
    return [v for v in versions or [] if isinstance(v, dict) and {"class", "name", "version"} <= v.keys()]
