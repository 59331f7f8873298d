"""Negative log-likelihood in bits per dimension: the variational bound of Ho et al. 2020 (Eq. 5, Table 1's NLL
column) over real images, with its standard error and the per-term breakdown.

The bound holds for data on the 256-level grid of 8-bit images (its decoder L_0 is discrete): images off the grid are
quantized to it (``off_grid="quantize"``, reported) or refused (``"refuse"``). A class-conditional model is scored
with the images' true labels: the bound of the conditional likelihood log p(x | y).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.data import EmbeddedDigitsDataModule, ImageFolderDataModule, stack_items
from ddpm_lightning.evaluation.fidelity import DATASETS, reference_images
from ddpm_lightning.io import write_json
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.sampling import load_module

__all__ = ["NLLSpec", "bpd_of_images", "nll", "off_grid_distance", "quantize_to_grid", "real_images", "summarize"]

TERMS = ("total", "prior", "decoder", "rest")


def off_grid_distance(images: torch.Tensor) -> float:
    """The largest distance, in units of one 8-bit level, between an image value in [-1, 1] and the grid 2k/255 - 1."""
    levels = (images.double().clamp(-1, 1) + 1) * 127.5
    outside = float((images.double().abs() - 1).clamp(min=0).max()) * 127.5 if images.numel() else 0.0
    return max(float((levels - levels.round()).abs().max()) if images.numel() else 0.0, outside)


def quantize_to_grid(images: torch.Tensor) -> torch.Tensor:
    """The nearest values of the 256-level grid of [-1, 1] (as saving to an 8-bit PNG would do)."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def bpd_of_images(
    module: DiffusionModule,
    images: torch.Tensor,
    *,
    t_samples: int | None = None,
    clip_denoised: bool = True,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    progress: bool = False,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image bits/dim of ``images`` (N, C, H, W) on the 8-bit grid: float64 tensors (N,) ``total``, ``prior``
    (L_T), ``decoder`` (L_0) and ``rest`` (L_1..L_{T-1}); image i is seeded by ``seeds[i]`` (default i), so the
    figures do not depend on the batching or the number of processes. See ``GaussianDiffusion.calc_bpd_loop``.
    ``labels`` (N,): the classes a class-conditional model is conditioned on (the bound of log p(x | y))."""
    seeds = list(range(len(images))) if seeds is None else list(seeds)
    if (labels is None) != (module.num_classes is None):
        raise ValueError(
            "a class-conditional model needs the images' labels, an unconditional one takes none: "
            f"num_classes={module.num_classes}, labels {'given' if labels is not None else 'not given'}"
        )
    source = module.sampling_module() if use_ema else module
    net, diffusion = source.net, module.diffusion
    was_training = net.training
    net.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in TERMS}
    starts = range(0, len(images), batch_size)
    # the bar counts network evaluations (each on a batch): T per batch, or K + 1 with t_samples = K
    per_batch = diffusion.num_timesteps if t_samples is None else t_samples + 1
    bar = tqdm(total=per_batch * len(starts), desc=f"bits/dim of {len(images)} images", unit="eval", leave=False,
               disable=not progress)  # fmt: skip
    try:
        for start in starts:
            x0 = images[start : start + batch_size].to(module.device)
            y = None if labels is None else labels[start : start + batch_size].to(module.device)
            result = diffusion.calc_bpd_loop(
                _counted(module.denoiser(net, y), bar.update),
                x0,
                clip_denoised=clip_denoised,
                t_samples=t_samples,
                seeds=seeds[start : start + batch_size],
            )
            for name in TERMS:
                out[name].append(result[f"{name}_bpd"].cpu())
    finally:
        bar.close()
        net.train(was_training)
    return {name: torch.cat(values) if values else torch.zeros(0, dtype=torch.float64) for name, values in out.items()}


def _counted(denoiser: Callable[..., torch.Tensor], update: Callable[[int], Any]) -> Callable[..., torch.Tensor]:
    """``denoiser`` that calls ``update(1)`` after each evaluation (a progress bar's)."""

    def evaluate(*args: Any, **kwargs: Any) -> torch.Tensor:
        output = denoiser(*args, **kwargs)
        update(1)
        return output

    return evaluate


def summarize(per_image: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean and standard error of the mean (std / sqrt(N)) of each term over the images."""
    summary = {}
    for name, values in per_image.items():
        n = len(values)
        stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
        summary[name] = {"bpd": float(values.mean()), "stderr": stderr}
    return summary


OFF_GRID = ("quantize", "refuse")
#: how far off the 8-bit grid (in levels) an image value may be without being quantized: float rounding
OFF_GRID_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NLLSpec:
    """What :func:`nll` measures: the bound of a checkpoint's EMA model on the first ``num`` images of ``split``
    (None: all); checked at construction.

    Args:
        data: ``"digits"``, ``"cifar10"`` or a folder of images (:func:`real_images`).
        t_samples: None: the full sum over the T terms (T network evaluations per image); K: an unbiased estimate
            from K timesteps per image (plus L_0 exactly).
        off_grid: images off the 8-bit grid are quantized to it (``"quantize"``, reported) or refused.
        seed: image i is seeded by ``seed + i``.
        progress: a progress bar of the network evaluations.
        out: the JSON report's file (None: not written).
    """

    ckpt: Path
    data: str = "digits"
    data_dir: Path = Path("data")
    split: Literal["train", "test", "all"] = "test"
    num: int | None = 256
    t_samples: int | None = None
    clip_denoised: bool = True
    off_grid: Literal["quantize", "refuse"] = "quantize"
    batch_size: int = 64
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = False
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.off_grid not in OFF_GRID:
            raise ValueError(f"unknown off_grid {self.off_grid!r}; allowed: {', '.join(OFF_GRID)}")
        if self.num is not None and self.num < 1:
            raise ValueError(f"num must be a positive number of images, got {self.num}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.data not in DATASETS and not Path(self.data).expanduser().is_dir():
            raise ValueError(f"data {self.data!r} is neither {' nor '.join(DATASETS)} nor a folder of images")
        if self.split == "all" and self.data in DATASETS:
            raise ValueError(f"split 'all' is for a folder of images; {self.data} has: train, test")
        object.__setattr__(self, "ckpt", Path(self.ckpt))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "out", None if self.out is None else Path(self.out).expanduser())


def nll(spec: NLLSpec) -> dict[str, Any]:
    """The bound in bits/dim of ``spec``'s checkpoint on its images, written to ``spec.out`` when given. Returns the
    report: the total and each term with its standard error, the protocol, and whether the data were quantized."""
    module = load_module(spec.ckpt, spec.device)
    images, labels = _images(spec, module)
    distance = off_grid_distance(images)
    quantized = distance > OFF_GRID_TOLERANCE
    if quantized and spec.off_grid == "refuse":
        raise ValueError(
            f"the {spec.data} {spec.split} images are not on the 8-bit grid (a value {distance:.3f} levels off): the "
            "bound's discrete decoder needs 8-bit data; use off_grid='quantize' (--off-grid quantize) to round them "
            "to it"
        )
    per_image = bpd_of_images(
        module, quantize_to_grid(images) if quantized else images, t_samples=spec.t_samples,
        clip_denoised=spec.clip_denoised, seeds=[spec.seed + i for i in range(len(images))],
        batch_size=spec.batch_size, progress=spec.progress, labels=labels,
    )  # fmt: skip
    report = _report(spec, module, summarize(per_image), len(images), distance, conditional=labels is not None)
    if spec.out is not None:
        write_json(report, spec.out)
    return report


def _images(spec: NLLSpec, module: DiffusionModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``num`` real images of the spec at the model's shape, and their labels for a class-conditional
    model (None for an unconditional one)."""
    dataset = real_images(
        spec.data, spec.data_dir, spec.split, module.image_shape[-1], module.image_shape[0], spec.ckpt
    )
    count = len(dataset) if spec.num is None else min(spec.num, len(dataset))  # type: ignore[arg-type]
    images, labels = stack_items([dataset[i] for i in range(count)])
    if module.num_classes is None:
        labels = None
    elif labels is None:
        raise ValueError(
            f"{spec.ckpt} is class-conditional: its NLL needs labels, and the {spec.data} images have none"
        )
    if tuple(images.shape[1:]) != tuple(module.image_shape):
        raise ValueError(
            f"the {spec.data} images are {tuple(images.shape[1:])} but the model {spec.ckpt} expects "
            f"{tuple(module.image_shape)}"
        )
    return images, labels


def _report(
    spec: NLLSpec,
    module: DiffusionModule,
    summary: dict[str, dict[str, float]],
    count: int,
    distance: float,
    conditional: bool,
) -> dict[str, Any]:
    """The report of the bound: the total and each term with its standard error, and how it was computed."""
    T = module.diffusion.num_timesteps
    estimate = (
        "full sum over t" if spec.t_samples is None else f"unbiased, {spec.t_samples} of {T - 1} KL terms per image"
    )
    return {
        "ckpt": str(spec.ckpt),
        "data": spec.data,
        "split": spec.split,
        "num_images": count,
        "bpd": summary["total"]["bpd"],
        "stderr": summary["total"]["stderr"],
        "terms": {name: summary[name] for name in ("prior", "decoder", "rest")},
        "estimate": estimate,
        "t_samples": spec.t_samples,
        "num_timesteps": T,
        "clip_denoised": spec.clip_denoised,
        "quantized": distance > OFF_GRID_TOLERANCE,
        "off_grid_levels": distance,
        "seed": spec.seed,
        "variance": module.diffusion.variance,
        "objective": module.diffusion.objective,
        "num_classes": module.num_classes,
        "likelihood": "conditional on the true labels, log p(x | y)" if conditional else "unconditional, log p(x)",
    }


def real_images(
    data: str,
    data_dir: str | Path,
    split: str,
    image_size: int,
    channels: int = 3,
    ckpt: str | Path | None = None,
) -> Dataset:
    """The un-augmented real images of ``split``; the digits at the model's size (28: the native MNIST pixels); a
    folder of images at the model's size and channels, split as the checkpoint's training split it when it was
    trained on that folder (its ``seed`` and ``val_fraction``), else with the defaults ("all": every image)."""
    if data == "digits":
        return EmbeddedDigitsDataModule(image_size=image_size).real_images_dataset(split)  # type: ignore[arg-type]
    if data not in DATASETS and Path(data).expanduser().is_dir():
        folder = Path(data).expanduser().resolve()
        trained = dict(read_checkpoint(ckpt, mmap=True).get("datamodule_hyper_parameters") or {}) if ckpt else {}
        same = Path(str(trained.get("root", ""))).expanduser().resolve() == folder
        split_args = {k: trained[k] for k in ("seed", "val_fraction") if same and k in trained}
        module = ImageFolderDataModule(str(folder), image_size=image_size, channels=channels, **split_args)
        return module.real_images_dataset(split)  # type: ignore[arg-type]
    return reference_images(data, data_dir, split)
