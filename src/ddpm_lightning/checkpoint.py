"""Checkpoints: atomic writes, reads with clear errors, and the network's weights of a checkpoint.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target folder and renames it, so a crash
  mid-write leaves the previous ``last.ckpt`` intact; it reads with ``weights_only=True`` and clear errors.
- Checkpoints of earlier versions are upgraded where they are read, by :mod:`ddpm_lightning.legacy`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddpm_lightning.io import atomic_write
from ddpm_lightning.legacy import upgrade_state_dict

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "check_checkpoint_file",
    "check_state_dict_shapes",
    "read_checkpoint",
    "read_net_weights",
    "use_atomic_checkpoints",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _load(path: Path, map_location: Any, weights_only: bool, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be read: {err}") from err


def check_checkpoint_file(path: str | Path, option: str = "checkpoint") -> Path:
    """Refuse, with the reason, a ``path`` that is no checkpoint file: missing, a folder (a run folder's checkpoint is
    named), or not the zip archive ``torch.save`` writes (a text file, a truncated download). ``option`` is how the user
    gave it (``--ckpt``). Reads 2 KB at most; returns ``path``."""
    path = Path(path).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        found = [last] if last.is_file() else sorted(path.glob("*.ckpt")) or sorted(path.glob("checkpoints/*.ckpt"))
        hint = f": did you mean {option} {found[-1]}?" if found else "; give a .ckpt file written by `ddpm fit`"
        raise CheckpointError(f"{option} {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{option} {path} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2048)
        if head and all(32 <= b < 127 or b in b"\t\n\r" for b in head):
            first = head.decode().splitlines()[0][:60] if head.strip() else ""
            raise CheckpointError(f"{option} {path} is a text file, not a checkpoint (it begins {first!r})")
        raise CheckpointError(
            f"{option} {path} is corrupt or truncated, or not a checkpoint: it is not the zip archive torch.save writes"
        )
    return path


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load`` a checkpoint (tensors and plain types only by default; ``mmap``: tensors read on demand);
    CheckpointError if it is unreadable."""
    path = check_checkpoint_file(path)
    checkpoint = _load(path, map_location, weights_only, mmap)
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


def read_net_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The network's weights in a checkpoint, for a weights-only start (``ddpm fit --init_from``): (the trained
    weights, their EMA or None).

    A checkpoint written with a weight average (``EMA``, ``PostHocEMA``: the rule of :mod:`ddpm_lightning.averaging`)
    keeps the average in ``state_dict`` and the trained weights in ``current_model_state``; one without (or converted
    from diffusers, or reconstructed by ``ddpm posthoc-ema``) has one set, returned as the trained weights.
    """
    checkpoint = read_checkpoint(path)
    states = [checkpoint.get("current_model_state"), checkpoint["state_dict"]]
    weights = []
    for state in states:
        if state is None:
            continue
        state = dict(state)
        upgrade_state_dict(state)
        weights.append({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    if not weights[0]:
        raise CheckpointError(f"checkpoint {path} holds no network weights (net.*)")
    return weights[0], weights[1] if len(weights) > 1 else None


def _save_synced(checkpoint: dict[str, Any], tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written to a temporary file beside the target, fsync'ed, then renamed over it.

    Lightning's own save goes through fsspec, whose local transaction writes to the system temp folder and then
    moves the file: on a cluster that is usually another file system, where a move is a copy that a kill can cut
    short. A rename within one folder is atomic, so a reader sees either the old or the new checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: _save_synced(checkpoint, tmp))

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        check_checkpoint_file(path)
        # also Lightning's own files, such as the weights ddp_spawn hands back to the main process
        return _load(Path(path), map_location, weights_only=True if weights_only is None else weights_only)


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Swap the strategy's default checkpoint writer for :class:`AtomicCheckpointIO` (a custom one is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
