"""Experiment tracking: run metadata for every logger, images per second, a sync-free progress bar, W&B run ids.

The run folder is ``trainer.default_root_dir``: :func:`follow_run_dir` points the loggers there, so that logs and
checkpoints (ModelCheckpoint writes under the first logger's folder) land in one place. A resumed ``ddpm fit
--ckpt_path`` continues the same W&B run: :class:`WandbRunId` writes the run id into every checkpoint and
:func:`resume_wandb_run` hands it back to the WandbLogger before it is created.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from ddpm_lightning.training import is_check_step

WANDB_RUN_ID_KEY = "wandb_run_id"
# a logger's save_dir with one of these values follows trainer.default_root_dir (WandbLogger's own default is ".")
RUN_DIR_PLACEHOLDERS = (None, "", ".", "${trainer.default_root_dir}")
TRACKED_PACKAGES = ("ddpm-lightning", "torch", "torchvision", "lightning", "torchmetrics", "torch-fidelity", "wandb")
_LOGGER_CLASSES_WITH_SAVE_DIR = ("WandbLogger", "TensorBoardLogger", "CSVLogger")


# ------------------------------------------------------------------------------------------------ metadata
def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), with ``-dirty`` if it has edits."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed wheel) or no git
    return f"{commit}-dirty" if status.strip() else commit


def package_versions() -> dict[str, str]:
    """Versions of Python, CUDA and the packages a run's numbers depend on."""
    versions = {"python": platform.python_version(), "cuda": str(torch.version.cuda)}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_metadata(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every logger records about a run: the resolved config, the git commit and the package versions."""
    return {"config": config or {}, "git_commit": git_commit(), "versions": package_versions()}


class LogRunConfig(SaveConfigCallback):
    """LightningCLI's config saver (``config.yaml`` in the log dir) that also sends :func:`run_metadata` to loggers."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(run_metadata(config))


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
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
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
    queue; ``DiffusionModule`` puts this bar in place of a plain ``TQDMProgressBar`` (same settings).
    """

    @classmethod
    def replacing(cls, bar: TQDMProgressBar) -> ProgressBar:
        """A bar with the settings of ``bar``."""
        return cls(refresh_rate=bar.refresh_rate, process_position=bar.process_position, leave=bar._leave)

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


class WandbRunId(Callback):
    """Keeps the W&B run id in every checkpoint (``checkpoint["wandb_run_id"]``), so a resumed fit continues it."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            checkpoint[WANDB_RUN_ID_KEY] = run_id


def finish_wandb_run() -> None:
    """End the process's W&B run, if any, so that the next fit in the same process (``ddpm ablate``) starts its own."""
    wandb = sys.modules.get("wandb")  # not imported: no W&B run
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def read_wandb_run_id(ckpt_path: str | Path) -> str | None:
    """The W&B run id stored in a checkpoint, or None when there is none or the file cannot be read."""
    try:
        # mmap: only the small top-level entries are read, not the weights
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError):
        return None  # Lightning reports a missing or broken checkpoint itself, with the path
    run_id = checkpoint.get(WANDB_RUN_ID_KEY) if isinstance(checkpoint, dict) else None
    return str(run_id) if run_id else None


def tracking_callbacks() -> list[Callback]:
    """Callbacks every ``ddpm fit`` gets: img/s and W&B run-id keeping (learning rates: LearningRateMonitor)."""
    return [ImagesPerSecond(), WandbRunId()]


# ------------------------------------------------------------------------------------------------ CLI config
def _logger_configs(trainer_config: Any) -> list[Any]:
    """The ``class_path``/``init_args`` entries of ``trainer.logger`` in a parsed (jsonargparse) config."""
    loggers = getattr(trainer_config, "logger", None)
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [entry for entry in loggers if getattr(entry, "class_path", None) and hasattr(entry, "init_args")]


def follow_run_dir(trainer_config: Any) -> None:
    """Point every W&B/TensorBoard/CSV logger whose ``save_dir`` is unset or a placeholder at the run folder.

    The placeholders are the values in :data:`RUN_DIR_PLACEHOLDERS`; an explicit other path is kept.
    """
    run_dir = getattr(trainer_config, "default_root_dir", None) or os.getcwd()  # Lightning's own default
    for entry in _logger_configs(trainer_config):
        if entry.class_path.rsplit(".", 1)[-1] not in _LOGGER_CLASSES_WITH_SAVE_DIR:
            continue
        if getattr(entry.init_args, "save_dir", None) in RUN_DIR_PLACEHOLDERS:
            entry.init_args.save_dir = str(run_dir)


def resume_wandb_run(trainer_config: Any, ckpt_path: str | Path | None) -> str | None:
    """Give a WandbLogger without an id the run id kept in ``ckpt_path``; returns the id it set, if any."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None  # also "last"/"hpc": Lightning resolves those itself
    for entry in _logger_configs(trainer_config):
        if entry.class_path.rsplit(".", 1)[-1] != "WandbLogger":
            continue
        if getattr(entry.init_args, "id", None) or getattr(entry.init_args, "version", None):
            return None  # the user chose a run
        run_id = read_wandb_run_id(ckpt_path)
        if run_id is not None:
            entry.init_args.id = run_id  # WandbLogger passes resume="allow" to wandb.init
        return run_id
    return None
