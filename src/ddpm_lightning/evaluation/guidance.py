"""Classifier-free guidance sweep of a class-conditional digits model: for each guidance scale s, the share of samples
that the demo's digit classifier reads as the requested class, and the Frechet distance of the demo's report.

For every s, ``num`` samples are drawn with the same seeds (sample i seeded by ``seed + i``, so every s starts from
the same x_T) and the classes cycled (sample i has class i mod num_classes). ``OUT/table.md``, ``table.json`` and
``grid_s<s>.png`` (one row per class) are written atomically after every scale, so an interrupted sweep leaves
complete files with the scales done so far.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm_lightning import io
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation.digit_classifier import DigitScorer, requested_class_accuracy
from ddpm_lightning.evaluation.sampler_sweep import checkpoint_data, run_info, training_digits
from ddpm_lightning.io import atomic_write, check_output, save_grid, write_json
from ddpm_lightning.sampling import class_rows, cycle_labels, iter_samples, load_module

__all__ = ["SCALES", "GuidanceSweepSpec", "guidance_sweep", "table_md"]

#: The default guidance scales: 1 (plain conditional sampling) and stronger guidance.
SCALES = (1.0, 2.0, 3.0, 5.0)


@dataclass(frozen=True)
class GuidanceSweepSpec:
    """What :func:`guidance_sweep` samples, scores and writes; checked at construction.

    Args:
        ckpt: a class-conditional digits checkpoint.
        out: the folder of ``table.md``, ``table.json`` and ``grid_s<s>.png``.
        scales: the guidance scales s (diffusers' convention: 1 conditional, 0 unconditional).
        num: samples per scale, the classes cycled (at least 2 for the Frechet distance); sample i seeded by
            ``seed + i``.
        sampler, steps: the sampler setting (default: the checkpoint's), its guidance scale set by each of ``scales``.
        classifier_epochs, classifier_cache_dir: the demo's digit classifier (trained once, then cached).
    """

    ckpt: Path
    out: Path = Path("results/guidance")
    scales: Sequence[float] = SCALES
    num: int = 250
    sampler: SamplerConfig | str | None = None
    steps: int | None = None
    seed: int = 0
    batch_size: int = 250
    classifier_epochs: int = 6
    classifier_cache_dir: Path | None = None
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if self.num < 2:
            raise ValueError(f"num must be >= 2 (the Frechet distance needs a covariance), got {self.num}")
        if not self.scales:
            raise ValueError("give at least one guidance scale")
        if bad := [s for s in self.scales if not 0 <= s < math.inf]:
            raise ValueError(f"guidance scales {bad}: each must be a finite number >= 0 (1: plain conditional)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        object.__setattr__(self, "ckpt", Path(self.ckpt))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.classifier_cache_dir is not None:
            object.__setattr__(self, "classifier_cache_dir", Path(self.classifier_cache_dir))


def guidance_sweep(spec: GuidanceSweepSpec, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Sample and score a class-conditional digits checkpoint at every guidance scale of ``spec``, writing the tables
    and the scale's grid after each; returns their paths. ``log`` is called with one line per scale."""
    check_output(spec.out, "out", folder=True)
    check_output(spec.classifier_cache_dir or io.cache_dir(), "classifier_cache_dir", folder=True)
    module, scorer = _load(spec.ckpt, spec.device, spec.classifier_epochs, spec.classifier_cache_dir)
    base = module.sampler_config_for(spec.sampler, steps=spec.steps)
    configs = [dataclasses.replace(base, guidance_scale=s) for s in spec.scales]  # each validated
    info = _info(spec, module, scorer, base)
    labels = torch.tensor([i % module.num_classes for i in range(spec.num)])
    paths: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for config in configs:
        images, seconds = _sample(module, config, spec.num, spec.seed, spec.batch_size)
        rows.append(_score(scorer, config, images, labels, module.diffusion.num_timesteps) | {"seconds": seconds})
        log(
            f"s={config.guidance_scale:<5g} accuracy of the requested class {rows[-1]['accuracy']:.3f}  Frechet "
            f"distance {rows[-1]['frechet_distance']:.1f}  ({seconds:.0f} s)"
        )
        paths |= _write(rows, info, images, labels, spec.out)
    return paths


def _info(spec: GuidanceSweepSpec, module: Any, scorer: DigitScorer, base: SamplerConfig) -> dict[str, Any]:
    """What the tables say of the sweep: the checkpoint, the sampler, the sampling, the classifier's accuracy and the
    real held-out digits' Frechet distance (the floor at this sample size), where it ran."""
    heldout = scorer.heldout[: spec.num]
    return {
        "checkpoint": str(spec.ckpt),
        "sampler": base.label(module.diffusion.num_timesteps),
        "num": spec.num,
        "seed": spec.seed,
        "num_classes": module.num_classes,
        "classifier_val_accuracy": scorer.accuracy,
        "heldout_frechet_distance": scorer(heldout)["frechet_distance"],
        "num_heldout": len(heldout),
        "num_reference": scorer.num_reference,
        **run_info(module.device),
    }


def _score(
    scorer: DigitScorer, config: SamplerConfig, images: torch.Tensor, labels: torch.Tensor, T: int
) -> dict[str, Any]:
    """The row of one scale: the accuracy of the requested class (``labels``), the Frechet distance, the confident
    share."""
    scores = scorer(images)
    return {
        "guidance_scale": config.guidance_scale,
        "label": config.label(T),
        "accuracy": requested_class_accuracy(scorer.classifier, images, labels),
        "frechet_distance": scores["frechet_distance"],
        "confident_share": scores["confident_share"],
    }


def _write(
    rows: Sequence[dict[str, Any]], info: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, out: Path
) -> dict[str, Path]:
    """The last scale's grid (one row per class) and the tables of the scales so far, each written atomically;
    returns their paths."""
    K = info["num_classes"]
    per_row = max(1, min(8, len(images) // K))
    grid = out / f"grid_s{rows[-1]['guidance_scale']:g}.png"
    save_grid(class_rows(images, labels.tolist(), range(K), per_row), grid, nrow=per_row)
    paths = {"table.md": out / "table.md", "table.json": out / "table.json", grid.name: grid}
    write_json({"info": info, "rows": rows}, paths["table.json"])
    text = table_md(rows, info)
    atomic_write(paths["table.md"], lambda tmp: tmp.write_text(text))
    return paths


def _sample(module: Any, config: SamplerConfig, num: int, seed: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """``num`` samples of ``config``, the classes cycled (sample i seeded by i), and the seconds they took."""
    start = time.perf_counter()
    batches = iter_samples(
        module, range(num), sampler=config, seed=seed, batch_size=batch_size, progress=True,
        desc=f"s={config.guidance_scale:g}", labels=cycle_labels(range(module.num_classes)),
    )  # fmt: skip
    images = torch.cat([batch.cpu() for _, batch in batches])
    return images, time.perf_counter() - start


def _load(
    ckpt: str | Path, device: str | torch.device | None, epochs: int, cache_dir: str | Path | None
) -> tuple[Any, DigitScorer]:
    """The class-conditional digits checkpoint and the digit scorer of its data."""
    module = load_module(ckpt, device)
    if module.num_classes is None:
        raise ValueError(f"{ckpt} is an unconditional model (num_classes=None): guidance needs a class-conditional one")
    trained_on, data_kwargs = checkpoint_data(ckpt)
    if module.image_shape[0] != 1 or trained_on not in (None, "digits"):
        raise ValueError(f"the digit classifier scores digits, but {ckpt} was trained on {trained_on or 'other data'}")
    # the split of the model's data at the classifier's 32 pixels: the demo report's classifier and reference digits
    # (native 28x28 digits padded to 32 are the very same images)
    digits = training_digits(trained_on, data_kwargs)
    return module, DigitScorer.from_digits(digits, epochs=epochs, cache_dir=cache_dir)


def table_md(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """One line per guidance scale: the requested class's accuracy, the Frechet distance, the confident share."""
    lines = [
        f"Checkpoint `{info['checkpoint']}`, {info['sampler']}, {info['num']} samples per scale (sample i seeded by "
        f"{info['seed']} + i, class i mod {info['num_classes']}), {info['device']} ({os.cpu_count()} cores, "
        f"{info['threads']} threads), torch {info['torch']}, {info['date']}.",
        "",
        "| guidance scale s | accuracy of the requested class | Frechet distance | confident > 0.9 |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['guidance_scale']:g} | {row['accuracy']:.3f} | {row['frechet_distance']:.1f} | "
            f"{row['confident_share']:.3f} |"
        )
    lines += [
        "",
        f"The digit classifier scores {info['classifier_val_accuracy']:.3f} on held-out digits; "
        f"{info['num_heldout']} real held-out digits are at Frechet distance {info['heldout_frechet_distance']:.1f} "
        f"from the same {info['num_reference']} reference digits: the floor at this sample size.",
    ]
    return "\n".join(lines) + "\n"
