"""Loading a trained model from a checkpoint, the seeded batch-sampling loop, and samples written to disk.

The class of sample i of a class-conditional model is a function of its global index i alone (:func:`cycle_labels`,
:func:`proportional_labels`), like its seed, so that a set of samples does not depend on the batching or the number of
processes; its noise does not depend on its class.
"""

from __future__ import annotations

import math
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_lightning.checkpoint import CheckpointError, read_checkpoint
from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.io import atomic_folder, check_output, save_grid, save_png
from ddpm_lightning.lit_module import DiffusionModule

__all__ = [
    "CheckpointError",
    "Labels",
    "class_rows",
    "cycle_labels",
    "default_device",
    "iter_samples",
    "load_guide",
    "load_module",
    "proportional_labels",
    "sample_to_folder",
]

#: The class of a sample from its global index.
Labels = Callable[[int], int]


def cycle_labels(classes: Sequence[int]) -> Labels:
    """Sample i gets ``classes[i % len(classes)]``."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("give at least one class")
    return lambda i: classes[i % len(classes)]


# the golden ratio's fractional part: i * _PHI mod 1 spreads any run of indices evenly over [0, 1) (a Weyl sequence)
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def proportional_labels(proportions: Sequence[float]) -> Labels:
    """Classes in the given proportions (e.g. the data's), deterministically by index: sample i gets the class whose
    interval of the cumulative proportions holds u_i = frac((i + 1) * phi), a low-discrepancy sequence, so that any
    N consecutive indices hold each class within a few samples of its share."""
    total = float(sum(proportions))
    if not proportions or any(p < 0 for p in proportions) or not total > 0:
        raise ValueError(f"class proportions must be >= 0 with a positive sum, got {list(proportions)}")
    edges = torch.tensor(list(proportions), dtype=torch.float64).cumsum(0) / total  # (K,), the last is 1

    def label(i: int) -> int:
        u = math.modf((i + 1) * _PHI)[0]
        return min(int(torch.searchsorted(edges, torch.tensor(u, dtype=torch.float64), right=True)), len(edges) - 1)

    return label


def class_rows(images: torch.Tensor, labels: Sequence[int], classes: Sequence[int], per_row: int) -> torch.Tensor:
    """The first ``per_row`` images of each of ``classes``, one row per class in that order (rows padded with blank
    images, -1, when a class has fewer): (len(classes) * per_row, C, H, W) for ``image_grid(..., nrow=per_row)``."""
    rows = []
    for c in classes:
        row = images[[i for i, y in enumerate(labels) if y == c][:per_row]]
        blank = torch.full((per_row - len(row), *images.shape[1:]), -1.0, dtype=images.dtype)
        rows.append(torch.cat([row, blank]))
    return torch.cat(rows)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_module(
    ckpt: str | Path, device: str | torch.device | None = None, *, net: nn.Module | None = None
) -> DiffusionModule:
    """A :class:`DiffusionModule` from a checkpoint of ``ddpm fit`` (EMA weights when the run had an EMA), in eval
    mode on ``device``, with clear errors. ``net``: the network, for a checkpoint whose network was built in Python.

    Checkpoints of earlier versions (flat U-Net settings, ``unet.*`` weights) load as the network they were trained
    with (:meth:`DiffusionModule.load_from_checkpoint`).
    """
    path = Path(ckpt)
    hparams = read_checkpoint(path, mmap=True).get("hyper_parameters")
    if not hparams:
        raise CheckpointError(f"{path} is not a checkpoint written by `ddpm fit` (no hyper_parameters)")
    overrides: dict[str, Any] = {}
    if net is not None:
        overrides["net"] = net
    try:
        with warnings.catch_warnings():
            # a checkpoint of `ddpm fit` names Lightning's CLI instantiator, which uses jsonargparse APIs deprecated
            # in jsonargparse 4.49: a warning on every load that the user can do nothing about
            warnings.filterwarnings("ignore", message=r"(?s).*deprecated in v4\.", module=r"lightning\.pytorch\.cli")
            warnings.filterwarnings("ignore", message=r"(?s)\s*By default only one", module=r"lightning\.pytorch\.cli")
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
    labels: Labels | None = None,
    guide: DiffusionModule | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The one seeded batch-sampling loop: yields (batch of ``indices``, their images in [-1, 1]) with sample i seeded
    by ``seed + i``, so a set of samples does not depend on the batch size or the number of processes.

    ``labels``: the class of sample i of a class-conditional model, ``labels(i)``; default: the classes cycled
    (:func:`cycle_labels`). An unconditional model takes none. ``guide``: autoguidance's weaker model
    (:meth:`DiffusionModule.sample`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config = module.sampler_config_for(sampler)
    num_classes = getattr(module, "num_classes", None)  # a module of another class may have no classes at all
    if num_classes is None and labels is not None:
        raise ValueError("class labels were given for an unconditional model (num_classes=None)")
    if num_classes is not None and labels is None:
        labels = cycle_labels(range(num_classes))
    indices = [int(i) for i in indices]
    # the bar counts the network evaluations (each on a batch) of all the batches, not the batches
    T, num_batches = module.diffusion.num_timesteps, math.ceil(len(indices) / batch_size)
    bar = tqdm(total=config.nfe(T) * num_batches, desc=f"{desc} {len(indices)} images ({config.label(T)})",
               unit="eval", disable=not progress)  # fmt: skip
    try:
        for first in range(0, len(indices), batch_size):
            batch = indices[first : first + batch_size]
            y = None if labels is None else [labels(i) for i in batch]
            yield (
                batch,
                module.sample(
                    len(batch), config, seeds=[seed + i for i in batch], y=y, guide=guide, progress=bar.update
                ),
            )
    finally:
        bar.close()


def load_guide(
    guide_ckpt: str | Path | None, config: SamplerConfig, device: str | torch.device | None = None
) -> DiffusionModule | None:
    """The autoguidance guide of ``guide_ckpt`` (None without one); refuses an ``autoguidance_scale`` without it."""
    if guide_ckpt is None and config.autoguidance_scale != 1:
        raise ValueError(f"--autoguidance-scale {config.autoguidance_scale:g} needs --guide-ckpt (a weaker checkpoint)")
    return load_module(guide_ckpt, device) if guide_ckpt is not None else None


def load_for_sampling(
    ckpt: str | Path,
    device: str | torch.device | None,
    sampler: SamplerConfig | Mapping | str | None,
    guide_ckpt: str | Path | None = None,
    **changes: Any,
) -> tuple[DiffusionModule, SamplerConfig, DiffusionModule | None]:
    """The module of ``ckpt``, its sampler setting with ``sampler`` and non-None ``changes`` applied, and the
    autoguidance guide of ``guide_ckpt`` (:func:`load_guide`)."""
    module = load_module(ckpt, device)
    config = module.sampler_config_for(sampler, **changes)
    return module, config, load_guide(guide_ckpt, config, device)


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
    guidance_scale: float | None = None,
    classes: Sequence[int] | None = None,
    grid_by_class: bool = False,
    batch_size: int = 256,
    device: str | None = None,
    guide_ckpt: str | Path | None = None,
    autoguidance_scale: float | None = None,
) -> Path:
    """Write ``num`` samples as ``out/000000.png ...`` plus ``out/grid.png`` (up to 64 images); returns the grid.

    Unset sampler options come from the checkpoint's setting (:meth:`DiffusionModule.sampler_config_for`). A
    class-conditional model: image i has the class ``classes[i % len(classes)]`` (default: all classes), guided with
    ``guidance_scale``; ``grid_by_class`` makes the grid one row per class (up to 8 images each). ``guide_ckpt``
    and ``autoguidance_scale``: autoguidance by that weaker checkpoint of the same process. The files
    are written into a temporary folder and put in ``out`` at the end (:func:`~ddpm_lightning.io.atomic_folder`), so
    an interrupted run leaves no half-filled folder. FileExistsError when ``out`` is an existing file.
    """
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file: give a folder (new or existing) for the samples")
    check_output(out, "out", folder=True)
    module, config, guide = load_for_sampling(
        ckpt, device, sampler, guide_ckpt, steps=steps, eta=eta, spacing=spacing, guidance_scale=guidance_scale,
        autoguidance_scale=autoguidance_scale,
    )  # fmt: skip
    if module.num_classes is None and (classes or grid_by_class):
        raise ValueError(f"--class and --grid-by-class need a class-conditional model; {ckpt} is unconditional")
    if module.num_classes is not None:
        classes = list(range(module.num_classes)) if not classes else [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < module.num_classes]
        if bad:
            raise ValueError(f"--class {bad[0]} is not a class of {ckpt}: allowed 0..{module.num_classes - 1}")
    labels = cycle_labels(classes) if classes else None
    kept: list[torch.Tensor] = []  # the grid's images
    kept_labels: list[int] = []
    rows = list(dict.fromkeys(classes)) if grid_by_class and classes else []  # one row per distinct class
    per_row = max(1, min(8, num // len(classes))) if rows else 0
    limit = per_row * len(classes) if rows else 64
    with atomic_folder(out) as tmp:
        for batch, images in iter_samples(
            module, range(num), sampler=config, seed=seed, batch_size=batch_size, progress=True, labels=labels,
            guide=guide,
        ):  # fmt: skip
            images = images.cpu()
            for i, image in zip(batch, images, strict=True):
                save_png(to_uint8(image), tmp / f"{i:06d}.png")
                if i < limit:
                    kept.append(image)
                    kept_labels.append(labels(i) if labels else 0)
        images = torch.stack(kept)
        if rows:
            save_grid(class_rows(images, kept_labels, rows, per_row), tmp / "grid.png", nrow=per_row)
        else:
            save_grid(images, tmp / "grid.png")
    return out / "grid.png"
