"""``ddpm sampler-sweep``: sample quality against the number of network evaluations (NFE), sampler by sampler.

For every sampler setting and NFE, ``--num`` samples of a checkpoint's EMA weights are drawn (sample i seeded by
``seed + i``, so every setting starts from the same x_T), timed, and scored: with the demo's digit classifier
(Frechet distance, class entropy, confident share; :class:`DigitScorer`) for a digits model, and with FID against
the real images (``--fid``; always for other data). ``OUT/table.md``, ``table.csv`` and ``quality_vs_nfe.png`` are
rewritten after every setting, each through a temporary file and a rename, so an interrupted sweep leaves complete
files with the rows done so far.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ddpm_lightning.callbacks.demo_report import atomic_write
from ddpm_lightning.diffusion import Sampler, Spacing, sampling_timesteps

if TYPE_CHECKING:
    from ddpm_lightning.lit_module import DiffusionModule

__all__ = ["NFES", "SETTINGS", "Setting", "sampler_sweep_main", "sweep", "table_csv", "table_md"]


@dataclass(frozen=True)
class Setting:
    """One row group of the table: a sampler with its options."""

    sampler: Sampler
    spacing: Spacing = "uniform"
    eta: float = 0.0


SETTINGS = {
    "ddpm": Setting("ddpm"),
    "ddim": Setting("ddim"),
    "ddim_quadratic": Setting("ddim", "quadratic"),
    "dpmpp_2m": Setting("dpmpp_2m"),
}
NFES = (1000, 250, 100, 50, 20, 10)
DATASETS = ("auto", "digits", "cifar10")
METRIC_NAMES = {
    "frechet_distance": "Frechet distance",
    "class_entropy": "class entropy",
    "confident_share": "confident > 0.9",
    "fid": "FID",
}


def checkpoint_data(ckpt: str | Path) -> tuple[str | None, dict[str, Any]]:
    """The data set a checkpoint was trained on ("digits", "cifar10" or None) and its data module's arguments."""
    from ddpm_lightning.training import read_checkpoint

    hparams = dict(read_checkpoint(ckpt).get("datamodule_hyper_parameters") or {})
    class_path = str(hparams.pop("_class_path", ""))
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    for name, cls in (("digits", "EmbeddedDigitsDataModule"), ("cifar10", "CIFAR10DataModule")):
        if class_path.endswith(cls):
            return name, kwargs
    return None, kwargs


def generate(
    module: DiffusionModule, num: int, *, setting: Setting, nfe: int, seed: int, batch_size: int, desc: str
) -> tuple[torch.Tensor, float]:
    """``num`` samples in [-1, 1] on the CPU (sample i seeded by ``seed + i``) and the seconds they took."""
    batches = []
    start = time.perf_counter()
    for first in tqdm(range(0, num, batch_size), desc=desc, unit="batch", leave=False):
        seeds = list(range(seed + first, seed + min(first + batch_size, num)))
        images = module.sample(
            len(seeds),
            seeds=seeds,
            sampler=setting.sampler,
            num_steps=nfe,
            eta=setting.eta,
            spacing=setting.spacing,
            progress=True,
        )
        batches.append(images.cpu())
    return torch.cat(batches), time.perf_counter() - start


def sweep(
    ckpt: str | Path,
    out: str | Path,
    *,
    settings: Sequence[str] = tuple(SETTINGS),
    nfes: Sequence[int] = NFES,
    num: int = 250,
    seed: int = 0,
    batch_size: int = 250,
    data: str = "auto",
    fid: bool = False,
    data_dir: str = "data",
    num_real: int | None = None,
    weights: str | None = None,
    classifier_epochs: int = 6,
    classifier_cache_dir: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Score every (setting, NFE) and write ``out/{table.md, table.csv, quality_vs_nfe.png}``; returns the paths."""
    from ddpm_lightning.data import EmbeddedDigitsDataModule
    from ddpm_lightning.data.transforms import to_uint8
    from ddpm_lightning.evaluate import fid_of_images
    from ddpm_lightning.metrics.digit_classifier import DigitScorer
    from ddpm_lightning.sampling import load_module

    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or not settings:
        raise ValueError(f"unknown sampler settings {unknown}; allowed: {', '.join(SETTINGS)}")
    if num < 2:
        raise ValueError(f"--num must be >= 2 (the Frechet distance needs a covariance), got {num}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if data not in DATASETS:
        raise ValueError(f"unknown data {data!r}; allowed: {', '.join(DATASETS)}")
    module = load_module(ckpt, device)
    hp = module.hparams
    T = hp.num_timesteps
    for nfe in nfes:
        if not 1 <= nfe <= T:
            raise ValueError(f"--nfe {nfe}: the number of network evaluations must be in [1, {T}] for this model")
    trained_on, data_kwargs = checkpoint_data(ckpt)
    if data == "auto":
        data = trained_on or ("digits" if (hp.in_channels, hp.image_size) == (1, 32) else "cifar10")
    scorer = None
    if data == "digits":
        if (hp.in_channels, hp.image_size) != (1, 32):
            raise ValueError(
                f"the digit classifier scores 1x32x32 images, the model makes {hp.in_channels}x{hp.image_size}x"
                f"{hp.image_size}: use --data cifar10 (FID)"
            )
        digits = EmbeddedDigitsDataModule(**data_kwargs if trained_on == "digits" else {})
        train, val = digits.split_arrays("train"), digits.split_arrays("val")
        scorer = DigitScorer.from_splits(train, val, epochs=classifier_epochs, cache_dir=classifier_cache_dir)
    use_fid = fid or scorer is None

    info = {
        "checkpoint": str(ckpt),
        "model": f"{hp.schedule} schedule, {hp.objective} objective, {hp.variance} variance, T = {T}",
        "data": data,
        "num": num,
        "seed": seed,
        "device": torch.cuda.get_device_name(module.device) if module.device.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "floors": {},
    }
    if scorer is not None:
        # as many real held-out digits as samples: the Frechet distance is biased upwards at small sample sizes
        heldout = scorer.heldout[:num]
        info["floors"]["frechet_distance"] = scorer(heldout)["frechet_distance"]
        info["num_reference"], info["num_heldout"] = scorer.num_reference, len(heldout)
    out = Path(out)
    paths = {name: out / name for name in ("table.md", "table.csv", "quality_vs_nfe.png")}
    rows: list[dict[str, Any]] = []
    done: dict[tuple, dict[str, Any]] = {}  # the same sampler on the same timesteps is sampled once
    for name in settings:
        setting = SETTINGS[name]
        for nfe in nfes:
            visited = tuple(sampling_timesteps(T, setting.sampler, nfe, setting.spacing))
            key = (setting.sampler, setting.eta, visited)
            row = {"setting": name, "sampler": setting.sampler, "spacing": setting.spacing, "eta": setting.eta}
            row["nfe"] = nfe
            if key in done:
                row.update({k: v for k, v in done[key].items() if k not in row} | {"same_as": done[key]["setting"]})
            else:
                images, seconds = generate(
                    module, num, setting=setting, nfe=nfe, seed=seed, batch_size=batch_size, desc=f"{name} {nfe}"
                )
                scores = scorer(images) if scorer is not None else {}
                if use_fid:
                    scores["fid"] = fid_of_images(
                        to_uint8(images), data=data, data_dir=data_dir, num_real=num_real, weights=weights,
                        batch_size=batch_size, device=device,
                    )  # fmt: skip
                row.update(scores, seconds=seconds, images_per_s=num / seconds, same_as="")
                done[key] = row
            rows.append(row)
            log(_progress_line(row))
            write_tables(rows, paths, info)
            write_plot(rows, paths["quality_vs_nfe.png"], info["floors"])
    return paths


def _progress_line(row: dict[str, Any]) -> str:
    scores = "  ".join(f"{METRIC_NAMES[m]} {row[m]:.4g}" for m in METRIC_NAMES if m in row)
    same = f" (same timesteps as {row['same_as']})" if row["same_as"] else ""
    return f"{row['setting']:<15}{row['nfe']:>5} NFE  {scores}  {row['images_per_s']:.2f} images/s{same}"


def _metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in METRIC_NAMES if any(m in row for row in rows)]


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (setting, NFE): the options, each quality figure, seconds and images/s."""
    header = ["setting", "sampler", "spacing", "eta", "nfe", *_metrics(rows), "seconds", "images_per_s", "same_as"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def table_md(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """A pivot (setting x NFE) of each distance, then every figure per (setting, NFE)."""
    nfes = sorted({row["nfe"] for row in rows}, reverse=True)
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    metrics = _metrics(rows)
    lines = [
        f"Checkpoint `{info['checkpoint']}` ({info['model']}), {info['num']} samples per cell (sample i seeded by "
        f"{info['seed']} + i), {info['device']} ({os.cpu_count()} cores, {info['threads']} threads), torch "
        f"{info['torch']}, {info['date']}.",
        "",
    ]
    for metric in [m for m in ("frechet_distance", "fid") if m in metrics]:
        lines += [f"**{METRIC_NAMES[metric]}** (lower is better) by network evaluations (NFE):", ""]
        lines += ["| sampler | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
        for setting in settings:
            cells = {row["nfe"]: row[metric] for row in rows if row["setting"] == setting}
            lines.append(f"| {setting} | " + " | ".join(f"{cells[n]:.1f}" if n in cells else "" for n in nfes) + " |")
        if metric in info["floors"]:
            lines.append(
                f"\n{info['num_heldout']} real held-out digits score {info['floors'][metric]:.1f} against the same "
                f"{info['num_reference']} reference digits: the floor at this sample size."
            )
        lines.append("")
    header = ["sampler", "spacing", "NFE", *(METRIC_NAMES[m] for m in metrics), "images/s"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        scores = [f"{row[m]:.3f}" if m in ("class_entropy", "confident_share") else f"{row[m]:.1f}" for m in metrics]
        rate = f"{row['images_per_s']:.2f}" + (f" (= {row['same_as']})" if row["same_as"] else "")
        lines.append("| " + " | ".join([row["setting"], row["spacing"], str(row["nfe"]), *scores, rate]) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict[str, Any]], paths: dict[str, Path], info: dict[str, Any]) -> None:
    for name, text in (("table.csv", table_csv(rows)), ("table.md", table_md(rows, info))):
        atomic_write(paths[name], lambda tmp, text=text: Path(tmp).write_text(text), f".{name}.tmp")


def write_plot(rows: Sequence[dict[str, Any]], path: Path, floors: dict[str, float]) -> None:
    import matplotlib.pyplot as plt

    from ddpm_lightning.plots import quality_vs_nfe_figure

    fig = quality_vs_nfe_figure(rows, floors)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), ".png.tmp")
    plt.close(fig)


def sampler_sweep_main(argv: Sequence[str] | None = None) -> int:
    """``ddpm sampler-sweep --ckpt PATH [--num 250] [--nfe 1000 250 ...] [--samplers ...] [--fid]``."""
    parser = argparse.ArgumentParser(
        prog="ddpm sampler-sweep",
        description="Sample quality and images/s of each sampler at each number of network evaluations (NFE): the "
        "demo's digit-classifier figures for a digits model, FID for other data or with --fid. Writes "
        "OUT/table.md, table.csv and quality_vs_nfe.png.",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--out", type=Path, default=Path("results/samplers"), help="default: results/samplers")
    parser.add_argument("--samplers", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS), help="default: all")
    parser.add_argument("--nfe", nargs="+", type=int, default=list(NFES), help="default: 1000 250 100 50 20 10")
    parser.add_argument("--num", type=int, default=250, help="samples per (sampler, NFE) (default 250)")
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=250, help="default 250")
    parser.add_argument("--data", choices=DATASETS, default="auto", help="default: the checkpoint's data set")
    parser.add_argument("--fid", action="store_true", help="also FID (always for data other than the digits)")
    parser.add_argument("--data-dir", default="data", help="folder of the CIFAR-10 data for FID (default data)")
    parser.add_argument("--num-real", type=int, default=None, help="first N real images for FID (default: all)")
    parser.add_argument("--weights", default=None, help="FID Inception weights file (see `ddpm fid-weights`)")
    parser.add_argument("--classifier-epochs", type=int, default=6, help="the demo's digit classifier (default 6)")
    parser.add_argument("--classifier-cache-dir", default=None, help="default: ~/.cache/ddpm-lightning")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = sweep(
        args.ckpt,
        args.out,
        settings=args.samplers,
        nfes=args.nfe,
        num=args.num,
        seed=args.seed,
        batch_size=args.batch_size,
        data=args.data,
        fid=args.fid,
        data_dir=args.data_dir,
        num_real=args.num_real,
        weights=args.weights,
        classifier_epochs=args.classifier_epochs,
        classifier_cache_dir=args.classifier_cache_dir,
        device=args.device,
    )
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {minutes:.1f} min")
    return 0
