"""Training that survives preemption and bad input: atomic checkpoints, saved RNG states, a clean stop on signals.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target folder and renames it, so a crash
  mid-write leaves the previous ``last.ckpt`` intact; it reads with ``weights_only=True`` and clear errors.
- :class:`RNGStates` stores every process's torch, CUDA, NumPy and Python RNG states, so that N steps, a stop and N
  more steps give the weights of 2N steps straight (Lightning saves no RNG states).
- :class:`GracefulStop` turns SIGTERM / SIGUSR1 into "finish this step, write ``last.ckpt``, stop with status 0"
  (and ``scontrol requeue`` under SLURM with ``SLURMEnvironment(auto_requeue=True)``).
- :class:`NonFiniteSteps` skips the optimizer step on the device when the gradients are not finite, and counts it.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import tempfile
import zipfile
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "FinalCheckpoint",
    "GracefulStop",
    "NonFiniteLossError",
    "NonFiniteSteps",
    "RNGStates",
    "check_state_dict_shapes",
    "checkpoints_in_run_dir",
    "is_check_step",
    "last_checkpoint_path",
    "read_checkpoint",
    "resolve_ckpt_path",
    "use_atomic_checkpoints",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class NonFiniteLossError(ValueError):
    """The training loss (and so its gradients) became NaN or infinite."""


# ------------------------------------------------------------------------------------------------ checkpoints
def _load(path: Path, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be read: {err}") from err


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """``torch.load`` a checkpoint (tensors and plain types only by default); CheckpointError if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    checkpoint = _load(path, map_location, weights_only)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by `ddpm fit` (it has no state_dict)")
    return checkpoint


def check_state_dict_shapes(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first parameter whose shape (or presence) differs from ``module``'s."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} is from another model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"checkpoint {source} is from another model shape: {name} has shape {tuple(tensor.shape)} there "
                f"but {tuple(own[name].shape)} in the model; use the model settings the checkpoint was trained with"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written to a temporary file beside the target, fsync'ed, then renamed over it.

    Lightning's own save goes through fsspec, whose local transaction writes to the system temp folder and then
    moves the file: on a cluster that is usually another file system, where a move is a copy that a kill can cut
    short. A rename within one folder is atomic, so a reader sees either the old or the new checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        # also Lightning's own files, such as the weights ddp_spawn hands back to the main process
        return _load(Path(path), map_location, weights_only=True if weights_only is None else weights_only)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the folder of the first ModelCheckpoint with ``save_last``, else the run's."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def checkpoints_in_run_dir(trainer_config: Any) -> None:
    """Give every configured ModelCheckpoint without a ``dirpath`` the fixed folder ``<run dir>/checkpoints``.

    By default Lightning puts checkpoints under the logger's ``version_N`` folder, a new one per run, where
    ``--ckpt_path last`` of the next run would not look.
    """
    run_dir = Path(getattr(trainer_config, "default_root_dir", None) or os.getcwd())
    callbacks = getattr(trainer_config, "callbacks", None) or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        init_args = getattr(entry, "init_args", None)
        if getattr(entry, "class_path", "").endswith("ModelCheckpoint") and init_args is not None:
            if getattr(init_args, "dirpath", None) is None:
                init_args.dirpath = str(run_dir / "checkpoints")


def resolve_ckpt_path(trainer_config: Any, ckpt_path: str | Path | None) -> str | Path | None:
    """``"last"`` -> the newest ``last*.ckpt`` of the configured checkpoint folders (unchanged when there is none,
    so that Lightning warns and the run starts fresh: the same command starts and continues a run)."""
    if ckpt_path != "last":
        return ckpt_path
    run_dir = Path(getattr(trainer_config, "default_root_dir", None) or os.getcwd())
    folders = {run_dir / "checkpoints"}
    callbacks = getattr(trainer_config, "callbacks", None) or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        dirpath = getattr(getattr(entry, "init_args", None), "dirpath", None)
        if getattr(entry, "class_path", "").endswith("ModelCheckpoint") and dirpath is not None:
            folders.add(Path(dirpath))
    candidates = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else ckpt_path


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Swap the strategy's default checkpoint writer for :class:`AtomicCheckpointIO` (a custom one is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


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
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None:
                if callback._last_global_step_saved != trainer.global_step:
                    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


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
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        loop = trainer.fit_loop.epoch_loop
        if signal.SIGTERM in self.signals and trainer.world_size > 1 and hasattr(loop, "_broadcast_sigterm_tensor"):
            # Lightning broadcasts its SIGTERM flag before every step under DDP, a host-device sync each step
            # (Lightning-AI/pytorch-lightning#21487). Its handler is replaced here, so the flag stays 0: skip that.
            loop._broadcast_sigterm_tensor = _no_broadcast

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
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
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
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while :class:`GracefulStop` handles SIGTERM."""


def _slurm_requeue() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    rank_zero_info(f"scontrol requeue {job}: exit status {result.returncode}")


# ------------------------------------------------------------------------------------------------ loss guard
def is_check_step(trainer: L.Trainer, step: int | None = None) -> bool:
    """Whether host-side checks may read device values (a host-device sync) once ``step`` optimizer steps are done.

    These are the logging steps (every ``trainer.log_every_n_steps``, or 50 when logging is off), where the logger
    reads its metrics anyway, so that the steps in between run without a synchronisation. ``step`` defaults to
    ``trainer.global_step``, the steps done so far.
    """
    every = trainer.log_every_n_steps or 50
    return (trainer.global_step if step is None else step) % every == 0


class NonFiniteSteps:
    """Optimizer steps whose gradients hold a NaN or an infinity, counted on the device.

    :meth:`update` gives the flag that fused Adam reads as ``found_inf``: when it is 1 the update is skipped on the
    device (weights and moments untouched), so no step has to wait for the host to look at the loss. Under DDP the
    check runs on the all-reduced gradients, which are the same on every process, so all of them agree without a
    collective of their own. :meth:`read` is the only host-device synchronisation.
    """

    def __init__(self, count: int = 0, device: torch.device | str = "cpu") -> None:
        self.count = torch.tensor(count, dtype=torch.long, device=device)
        self.first_step = torch.tensor(-1, dtype=torch.long, device=device)
        self.first_loss = torch.tensor(float("nan"), device=device)

    def update(self, grads: list[torch.Tensor], loss: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the step; return the gradients' total 2-norm and the float ``found_inf`` flag (1.0: skip)."""
        grad_norm = torch.nn.utils.get_total_norm(grads)
        found = ~torch.isfinite(grad_norm)
        first = found & (self.first_step < 0)
        self.first_step.masked_fill_(first, step)
        self.first_loss = torch.where(first, loss.detach().float(), self.first_loss)
        self.count += found
        return grad_norm, found.float()

    def read(self) -> tuple[int, int, float]:
        """(count, step of the first, that step's loss on this process): synchronises with the device."""
        return int(self.count), int(self.first_step), float(self.first_loss)
