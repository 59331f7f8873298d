"""Loading a trained model from a checkpoint, the seeded batch-sampling loop, and samples written to disk."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_lightning.checkpoint import CheckpointError, read_checkpoint
from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.io import atomic_folder, save_grid, save_png
from ddpm_lightning.lit_module import DiffusionModule

__all__ = ["CheckpointError", "default_device", "iter_samples", "load_module", "sample_to_folder"]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_module(
    ckpt: str | Path, device: str | torch.device | None = None, *, net: nn.Module | None = None
) -> DiffusionModule:
    """A :class:`DiffusionModule` from a checkpoint of ``ddpm fit`` (EMA weights when the run had an EMA), in eval
    mode on ``device``, with clear errors. ``net``: the network, for a checkpoint whose network was built in Python.

    Checkpoints of earlier versions (flat U-Net settings, ``unet.*`` weights) load through the module's aliases.
    """
    path = Path(ckpt)
    hparams = read_checkpoint(path, mmap=True).get("hyper_parameters")
    if not hparams:
        raise CheckpointError(f"{path} is not a checkpoint written by `ddpm fit` (no hyper_parameters)")
    overrides: dict[str, Any] = {}
    if net is not None:
        overrides["net"] = net
    try:
        module = DiffusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    except (CheckpointError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from its hyper-parameters: {err}"
        ) from err
    return module.to(default_device(device)).eval()


def iter_samples(
    module: DiffusionModule,
    indices: Sequence[int],
    *,
    sampler: SamplerConfig | Mapping | str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "sampling",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The one seeded batch-sampling loop: yields (batch of ``indices``, their images in [-1, 1]) with sample i seeded
    by ``seed + i``, so a set of samples does not depend on the batch size or the number of processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config = module.sampler_config_for(sampler)
    indices = [int(i) for i in indices]
    for first in tqdm(range(0, len(indices), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = indices[first : first + batch_size]
        yield batch, module.sample(len(batch), config, seeds=[seed + i for i in batch])


def sample_to_folder(
    ckpt: str | Path,
    out: str | Path,
    *,
    num: int = 64,
    seed: int = 0,
    sampler: SamplerConfig | Mapping | str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    spacing: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> Path:
    """Write ``num`` samples as ``out/000000.png ...`` plus ``out/grid.png`` (up to 64 images); returns the grid.

    Unset sampler options come from the checkpoint's setting (:meth:`DiffusionModule.sampler_config_for`). The files
    are written into a temporary folder and put in ``out`` at the end (:func:`~ddpm_lightning.io.atomic_folder`), so
    an interrupted run leaves no half-filled folder. FileExistsError when ``out`` is an existing file.
    """
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file: give a folder (new or existing) for the samples")
    module = load_module(ckpt, device)
    config = module.sampler_config_for(sampler, steps=steps, eta=eta, spacing=spacing)
    first: list[torch.Tensor] = []
    with atomic_folder(out) as tmp:
        for batch, images in iter_samples(
            module, range(num), sampler=config, seed=seed, batch_size=batch_size, progress=True
        ):
            images = images.cpu()
            for i, image in zip(batch, images, strict=True):
                save_png(to_uint8(image), tmp / f"{i:06d}.png")
            if sum(len(x) for x in first) < 64:
                first.append(images)
        save_grid(torch.cat(first)[:64], tmp / "grid.png")
    return out / "grid.png"
