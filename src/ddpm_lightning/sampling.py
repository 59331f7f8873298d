"""Loading a trained model from a checkpoint and writing its samples to disk."""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.training import CheckpointError, read_checkpoint

__all__ = ["CheckpointError", "load_module", "sample_to_folder", "save_grid", "save_png", "to_uint8"]


def default_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_module(ckpt: str | Path, device: str | torch.device | None = None) -> DiffusionModule:
    """Load a :class:`DiffusionModule` (EMA weights when the run had an EMA) in eval mode, with clear errors."""
    path = Path(ckpt)
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by `ddpm fit` (no hyper_parameters)")
    device = default_device(str(device) if device is not None else None)
    accepted = inspect.signature(DiffusionModule.__init__).parameters
    module = DiffusionModule(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from its hyper-parameters: {err}"
        ) from err
    return module.to(device).eval()


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (C, H, W) tensor as PNG, atomically."""
    array = image.permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] of shape (B, C, H, W) as one grid PNG."""
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2, pad_value=255)
    save_png(grid, path)
    return path


def sample_to_folder(
    ckpt: str | Path,
    out: str | Path,
    *,
    num: int = 64,
    seed: int = 0,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    batch_size: int = 256,
    device: str | None = None,
    spacing: str | None = None,
) -> Path:
    """Write ``num`` samples as ``out/000000.png ...`` plus ``out/grid.png`` (up to 64 images); returns the grid.

    Unset sampler options come from the checkpoint (:meth:`DiffusionModule.sampling_settings`).
    """
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    module = load_module(ckpt, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first: list[torch.Tensor] = []
    for start in tqdm(range(0, num, batch_size), desc="sampling", unit="batch"):
        seeds = list(range(seed + start, seed + min(start + batch_size, num)))
        images = module.sample(len(seeds), seeds=seeds, sampler=sampler, num_steps=num_steps, eta=eta, spacing=spacing)
        for i, image in zip(seeds, to_uint8(images.cpu()), strict=True):
            save_png(image, out / f"{i - seed:06d}.png")
        if sum(len(x) for x in first) < 64:
            first.append(images.cpu())
    return save_grid(torch.cat(first)[:64], out / "grid.png")
