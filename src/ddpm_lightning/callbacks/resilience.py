"""Training that survives preemption: saved RNG states, a clean stop on signals, a final ``last.ckpt``.

- :class:`RNGStates` stores every process's torch, CUDA, NumPy and Python RNG states, so that N steps, a stop and N
  more steps give the weights of 2N steps straight (Lightning saves no RNG states).
- :class:`GracefulStop` turns SIGTERM / SIGUSR1 into "finish this step, write ``last.ckpt``, stop with status 0"
  (and ``scontrol requeue`` under SLURM with ``SLURMEnvironment(auto_requeue=True)``).
- :class:`FinalCheckpoint` writes ``last.ckpt`` at the end of fit when ModelCheckpoint would not, so that
  ``last.ckpt`` is always the newest state of the run and ``--ckpt_path last`` never goes back in time.

Checkpoints are written atomically by :class:`~ddpm_lightning.checkpoint.AtomicCheckpointIO`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ddpm_lightning import compat
from ddpm_lightning.guard import is_check_step

__all__ = ["FinalCheckpoint", "GracefulStop", "RNGStates", "last_checkpoint_path"]


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the folder of the first ModelCheckpoint with ``save_last``, else the run's."""
    checkpointers = _last_checkpointers(trainer)
    if not checkpointers:
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    first = checkpointers[0]
    return Path(first.dirpath) / f"{first.CHECKPOINT_NAME_LAST}{first.FILE_EXTENSION}"


def _last_checkpointers(trainer: L.Trainer) -> list[ModelCheckpoint]:
    """The trainer's ModelCheckpoints that keep a ``last.ckpt`` in a known folder."""
    return [
        callback
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None
    ]


# ------------------------------------------------------------------------------------------------ RNG states
def _rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RNGStates(Callback):
    """Save the RNG states of every process in the checkpoint and restore them when training resumes.

    They drive dropout, the t and eps of L_simple and augmentations in the main process. They are restored at
    ``on_train_start``, after the sanity check, where the uninterrupted run stood when it wrote the checkpoint.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = [_rng_states()]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, _rng_states())
        checkpoint["rng_states"] = states  # one entry per global rank

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            rank_zero_warn("the checkpoint holds no RNG states: the resumed run draws different random numbers")
        elif len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states of {len(states)} processes, this run has {trainer.world_size}: "
                "the resumed run draws different random numbers"
            )
        else:
            self._pending = states[trainer.global_rank]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class FinalCheckpoint(Callback):
    """Write ``last.ckpt`` when fit ends, unless it already holds the final step.

    ModelCheckpoint writes ``last.ckpt`` at the end of fit only when it has saved nothing else during the run, so the
    steps after its last periodic save would otherwise be lost (e.g. ``max_steps`` not a multiple of the interval).
    A trainer that checkpoints without a ModelCheckpoint keeping a ``last.ckpt`` (no ``save_last``: Lightning's
    default one) gets it in ``<run dir>/checkpoints``, where :class:`GracefulStop` writes it too, so that a resumed
    run never leaves an older ``last.ckpt`` behind.

    A run resumed from a ``last.ckpt`` in its own checkpoint folder that another run wrote (a copied file: its stored
    folder differs) keeps writing that ``last.ckpt``: ModelCheckpoint would otherwise take it for a stranger's file and
    write ``last-v1.ckpt`` beside it, leaving ``last.ckpt`` at the old step.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed = trainer.ckpt_path
        if resumed is None or "://" in str(resumed):
            return
        resumed = Path(resumed).resolve()
        for callback in _last_checkpointers(trainer):
            own_last = Path(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION).resolve()
            if resumed == own_last and callback.last_model_path != str(own_last):
                callback.last_model_path = str(own_last)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        if any(isinstance(c, GracefulStop) and c.saved_step == trainer.global_step for c in trainer.callbacks):
            return  # a signal stopped the run and last.ckpt holds this step
        checkpointers = _last_checkpointers(trainer)
        if not checkpointers and trainer.checkpoint_callback is not None:
            trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)
        for callback in checkpointers:
            if compat.checkpoint_saved_step(callback) != trainer.global_step:
                compat.save_last_checkpoint(callback, trainer)


# ------------------------------------------------------------------------------------------------ signals
class GracefulStop(Callback):
    """On one of ``signals`` finish the current step, write ``last.ckpt`` and stop: exit status 0.

    Any process receiving the signal stops all of them at the same step: under DDP the next logging step
    (``trainer.log_every_n_steps``), where the processes agree without a sync on every step. Under SLURM with
    ``SLURMEnvironment(auto_requeue=True)`` its requeue signal (SIGUSR1, ``#SBATCH --signal=SIGUSR1@90``) also
    requeues the job; the next run continues with ``--ckpt_path last``. This replaces Lightning's own handlers
    during training, which save in the middle of a step (SLURM) or exit with status 1 (SIGTERM).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"unknown signals {unknown}; use names such as 'SIGTERM', 'SIGUSR1'")
        self.signals = tuple(signal.Signals[name] for name in signals)
        self.received: signal.Signals | None = None
        self.saved_step: int | None = None  # the step of the last.ckpt written on a signal
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = self.saved_step = None
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        if signal.SIGTERM in self.signals and trainer.world_size > 1:
            # Lightning broadcasts its SIGTERM flag before every step under DDP, a host-device sync each step. Its
            # handler is replaced here, so the flag stays 0: skip that.
            compat.disable_sigterm_broadcast(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            # agreeing is a collective and a host-device sync: only on the logging steps, so that all processes
            # stop at the same step without a sync on every step
            if not is_check_step(trainer):
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        checkpointers = _last_checkpointers(trainer)
        if checkpointers:
            # through the ModelCheckpoint, which then knows its last.ckpt holds this step: written behind its back,
            # the file would make its own save at the end of fit a last-v1.ckpt and leave last.ckpt behind on resume
            compat.save_last_checkpoint(checkpointers[0], trainer)
            path = Path(checkpointers[0].last_model_path)
        else:
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path, weights_only=False)  # the full state: the run continues from it
        self.saved_step = trainer.global_step
        rank_zero_info(
            f"{self.received.name if self.received else 'signal'}: saved {path} at step {trainer.global_step}"
        )
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if (
            isinstance(environment, SLURMEnvironment)
            and environment.auto_requeue
            and self.received == environment.requeue_signal
            and trainer.is_global_zero
        ):
            _slurm_requeue()
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        compat.restore_sigterm_broadcast(trainer)


def _slurm_requeue() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    rank_zero_info(f"scontrol requeue {job}: exit status {result.returncode}")
