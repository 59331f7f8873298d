"""Classifier-free guidance sweep of a class-conditional digits model: for each guidance scale s, the share of samples
that the demo's digit classifier reads as the requested class, and the Frechet distance of the demo's report.

For every s, ``num`` samples are drawn with the same seeds (sample i seeded by ``seed + i``, so every s starts from
the same x_T) and the classes cycled (sample i has class i mod num_classes). ``OUT/table.md``, ``table.json`` and
``grid_s<s>.png`` (one row per class) are written atomically after every scale, so an interrupted sweep leaves
complete files with the scales done so far.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ddpm_lightning import io
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation.digit_classifier import DigitScorer, requested_class_accuracy
from ddpm_lightning.evaluation.sampler_sweep import checkpoint_data, run_info, training_digits
from ddpm_lightning.io import atomic_write, check_output, save_grid, write_json
from ddpm_lightning.sampling import class_rows, cycle_labels, iter_samples, load_module

__all__ = ["SCALES", "guidance_sweep", "table_md"]

#: The default guidance scales: 1 (plain conditional sampling) and stronger guidance.
SCALES = (1.0, 2.0, 3.0, 5.0)


def guidance_sweep(
    ckpt: str | Path,
    out: str | Path = "results/guidance",
    *,
    scales: Sequence[float] = SCALES,
    num: int = 250,
    sampler: SamplerConfig | str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 250,
    classifier_epochs: int = 6,
    classifier_cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Sample and score a class-conditional digits checkpoint at every guidance scale; returns the tables' paths.

    Args:
        scales: the guidance scales s (diffusers' convention: 1 conditional, 0 unconditional).
        num: samples per scale, the classes cycled (at least 2 for the Frechet distance).
        sampler, steps: the sampler setting (default: the checkpoint's).
        classifier_epochs, classifier_cache_dir: the demo's digit classifier (trained once, then cached).
        log: called with one line per scale.
    """
    if num < 2:
        raise ValueError(f"num must be >= 2 (the Frechet distance needs a covariance), got {num}")
    if not scales:
        raise ValueError("give at least one guidance scale")
    check_output(out, "out", folder=True)
    check_output(classifier_cache_dir or io.cache_dir(), "classifier_cache_dir", folder=True)
    module, scorer = _load(ckpt, device, classifier_epochs, classifier_cache_dir)
    K = module.num_classes
    base = module.sampler_config_for(sampler, steps=steps)
    configs = [dataclasses.replace(base, guidance_scale=float(s)) for s in scales]  # each validated
    T = module.diffusion.num_timesteps
    labels = torch.tensor([i % K for i in range(num)])
    heldout = scorer.heldout[:num]
    info = {
        "checkpoint": str(ckpt),
        "sampler": base.label(T),
        "num": num,
        "seed": seed,
        "num_classes": K,
        "classifier_val_accuracy": scorer.accuracy,
        "heldout_frechet_distance": scorer(heldout)["frechet_distance"],
        "num_heldout": len(heldout),
        "num_reference": scorer.num_reference,
        **run_info(module.device),
    }
    out = Path(out)
    paths = {"table.md": out / "table.md", "table.json": out / "table.json"}
    rows: list[dict[str, Any]] = []
    per_row = max(1, min(8, num // K))
    for config in configs:
        images, seconds = _sample(module, config, num, seed, batch_size)
        scores = scorer(images)
        grid = out / f"grid_s{config.guidance_scale:g}.png"
        save_grid(class_rows(images, labels.tolist(), range(K), per_row), grid, nrow=per_row)
        paths[grid.name] = grid
        row = {
            "guidance_scale": config.guidance_scale,
            "label": config.label(T),
            "accuracy": requested_class_accuracy(scorer.classifier, images, labels),
            "frechet_distance": scores["frechet_distance"],
            "confident_share": scores["confident_share"],
            "seconds": seconds,
        }
        rows.append(row)
        log(
            f"s={row['guidance_scale']:<5g} accuracy of the requested class {row['accuracy']:.3f}  Frechet distance "
            f"{row['frechet_distance']:.1f}  ({seconds:.0f} s)"
        )
        write_json({"info": info, "rows": rows}, paths["table.json"])
        text = table_md(rows, info)
        atomic_write(paths["table.md"], lambda tmp, text=text: tmp.write_text(text))
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
