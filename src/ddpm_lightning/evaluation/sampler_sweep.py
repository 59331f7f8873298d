"""Sample quality against the number of network evaluations (NFE), sampler setting by sampler setting.

For every sampler setting and step count, ``num`` samples of a checkpoint's EMA weights are drawn (sample i seeded by
``seed + i``, so every setting starts from the same x_T), timed, and scored: with the demo's digit classifier
(Frechet distance, class entropy, confident share; :class:`DigitScorer`) for a digits model, and with FID against
the real images (``fid=True``; always for other data). ``OUT/table.md``, ``table.csv`` and ``quality_vs_nfe.png``
are rewritten after every setting, each atomically, so an interrupted sweep leaves complete files with the rows done
so far.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddpm_lightning import compat
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation.digit_classifier import DigitScorer
from ddpm_lightning.evaluation.fidelity import fetch_fid_weights, fid_of_images, reference_set
from ddpm_lightning.io import atomic_write, check_output
from ddpm_lightning.io import cache_dir as io_cache_dir
from ddpm_lightning.sampling import iter_samples, load_module

if TYPE_CHECKING:
    from ddpm_lightning.lit_module import DiffusionModule

__all__ = [
    "SETTINGS",
    "STEPS",
    "SweepSpec",
    "checkpoint_data",
    "run_info",
    "sweep",
    "table_csv",
    "table_md",
    "training_digits",
]

#: The sampler settings of the table, by row name; ``steps`` is set per column.
SETTINGS: dict[str, SamplerConfig] = {
    "ddpm": SamplerConfig("ddpm"),
    "ddim": SamplerConfig("ddim"),
    "ddim_quadratic": SamplerConfig("ddim", spacing="quadratic"),
    "dpmpp_2m": SamplerConfig("dpmpp_2m"),
    "heun": SamplerConfig("heun"),
}
#: The network evaluations (NFE) of the table's columns; Heun takes (NFE + 1) // 2 steps, 2 steps - 1 evaluations.
STEPS = (1000, 250, 100, 50, 20, 10)
DATASETS = ("auto", "digits", "cifar10")
DIGIT_SHAPES = ((1, 28, 28), (1, 32, 32))  # native MNIST pixels, or padded to 32 (the classifier pads 28 to 32)
METRIC_NAMES = {
    "frechet_distance": "Frechet distance",
    "class_entropy": "class entropy",
    "confident_share": "confident > 0.9",
    "fid": "FID",
}


def checkpoint_data(ckpt: str | Path) -> tuple[str | None, dict[str, Any]]:
    """The data set a checkpoint was trained on ("digits", "cifar10" or None) and its data module's arguments."""
    hparams = dict(read_checkpoint(ckpt).get("datamodule_hyper_parameters") or {})
    class_path = compat.drop_cli_keys(hparams)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    for name, cls in (("digits", "EmbeddedDigitsDataModule"), ("cifar10", "CIFAR10DataModule")):
        if class_path.endswith(cls):
            return name, kwargs
    return None, kwargs


def training_digits(trained_on: str | None, data_kwargs: Mapping[str, Any]) -> EmbeddedDigitsDataModule:
    """The digits split as a digits checkpoint was trained on (its ``seed`` and ``val_fraction``; the default split for
    other checkpoints): the digit classifier's data and held-out reference (:meth:`DigitScorer.from_digits`)."""
    split_keys = ("seed", "val_fraction") if trained_on == "digits" else ()
    return EmbeddedDigitsDataModule(**{k: data_kwargs[k] for k in split_keys if k in data_kwargs})


def run_info(device: torch.device) -> dict[str, Any]:
    """Where and when a table was made: the device, torch's threads and version, and the date."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }


def generate(
    module: DiffusionModule,
    num: int,
    *,
    sampler: SamplerConfig,
    seed: int,
    batch_size: int,
    desc: str = "sampling",
    guide: DiffusionModule | None = None,
) -> tuple[torch.Tensor, float]:
    """``num`` samples in [-1, 1] on the CPU (sample i seeded by ``seed + i``) and the seconds they took."""
    start = time.perf_counter()
    samples = iter_samples(module, range(num), sampler=sampler, seed=seed, batch_size=batch_size, progress=True,
                           desc=desc, guide=guide)  # fmt: skip
    images = torch.cat([batch.cpu() for _, batch in samples])
    return images, time.perf_counter() - start


def _settings(
    settings: Sequence[str] | Mapping[str, SamplerConfig | Mapping[str, Any] | str],
) -> dict[str, SamplerConfig]:
    if isinstance(settings, Mapping):
        chosen = {name: SamplerConfig.parse(value) for name, value in settings.items()}
    else:
        unknown = [name for name in settings if name not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown sampler settings {unknown}; allowed: {', '.join(SETTINGS)}")
        chosen = {name: SETTINGS[name] for name in settings}
    if not chosen:
        raise ValueError(f"no sampler settings to sweep; allowed: {', '.join(SETTINGS)}")
    return chosen


def at_evaluations(base: SamplerConfig, nfe: int) -> SamplerConfig:
    """``base`` with the steps that make ``nfe`` network evaluations of the main model, or the nearest below: NFE
    steps, or (NFE + 1) // 2 Heun steps (2 steps - 1 evaluations): :meth:`SamplerConfig.steps_for_evaluations`."""
    return dataclasses.replace(base, steps=base.steps_for_evaluations(nfe))


@dataclass(frozen=True)
class SweepSpec:
    """What :func:`sweep` samples, scores and writes; checked at construction.

    Args:
        ckpt: a checkpoint, or several of the same image shape (e.g. the runs of an ablation), whose rows are then
            named ``"<label> <setting>"``.
        out: the folder of ``table.md``, ``table.csv`` and ``quality_vs_nfe.png``.
        labels: one name per checkpoint; default: each checkpoint's folder name (none for a single checkpoint).
        settings: names of :data:`SETTINGS`, or rows of your own: a mapping name -> :class:`SamplerConfig` (its
            ``steps`` is replaced by each of ``steps``).
        steps: the network evaluations (NFE) of the columns, each in [1, T] (checked against the models' T when
            they are loaded); a Heun row takes (NFE + 1) // 2 steps and shows its 2 steps - 1 evaluations.
        num, seed, batch_size: samples per (setting, NFE), sample i seeded by ``seed + i``.
        data: ``"digits"`` (the digit classifier's figures), ``"cifar10"`` (FID) or ``"auto"`` (the checkpoint's).
        fid: also FID for a digits model.
        data_dir, num_real, weights: FID's real images and Inception weights (:func:`fid_of_images`).
        classifier_epochs, classifier_cache_dir: the digit classifier (trained once, then cached).
        guide_ckpt, autoguidance_scale: autoguidance of every row by this weaker checkpoint of the same process
            (:class:`~ddpm_lightning.diffusion.samplers.Guide`); the NFE column counts the main model's evaluations.
    """

    ckpt: Path | Sequence[Path]
    out: Path = Path("results/samplers")
    labels: Sequence[str] | None = None
    settings: Sequence[str] | Mapping[str, SamplerConfig] = tuple(SETTINGS)
    steps: Sequence[int] = STEPS
    num: int = 250
    seed: int = 0
    batch_size: int = 250
    data: str = "auto"
    fid: bool = False
    data_dir: Path = Path("data")
    num_real: int | None = None
    weights: str | Path | None = None
    classifier_epochs: int = 6
    classifier_cache_dir: Path | None = None
    device: str | torch.device | None = None
    guide_ckpt: Path | None = None
    autoguidance_scale: float = 1.0

    def __post_init__(self) -> None:
        ckpts = (Path(self.ckpt),) if isinstance(self.ckpt, str | Path) else tuple(Path(c) for c in self.ckpt)
        if not ckpts:
            raise ValueError("sweep needs at least one checkpoint")
        labels = tuple(self.labels) if self.labels is not None else None
        if labels is None:
            labels = tuple(c.parent.name for c in ckpts) if len(ckpts) > 1 else ("",)
        if len(labels) != len(ckpts) or len(set(labels)) != len(labels):
            raise ValueError(f"need one distinct label per checkpoint: {len(ckpts)} checkpoints, labels {list(labels)}")
        if self.num < 2:
            raise ValueError(f"num must be >= 2 (the Frechet distance needs a covariance), got {self.num}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r}; allowed: {', '.join(DATASETS)}")
        if self.guide_ckpt is None and self.autoguidance_scale != 1:
            raise ValueError(f"autoguidance_scale={self.autoguidance_scale:g} needs a guide checkpoint (guide_ckpt)")
        paths = {"out": self.out, "data_dir": self.data_dir, "classifier_cache_dir": self.classifier_cache_dir,
                 "guide_ckpt": self.guide_ckpt}  # fmt: skip
        fields = {"ckpt": ckpts, "labels": labels, "settings": _settings(self.settings), "steps": tuple(self.steps)}
        fields |= {name: None if value is None else Path(value) for name, value in paths.items()}
        for name, value in fields.items():
            object.__setattr__(self, name, value)


@dataclass
class _Sweep:
    """A sweep being made: its spec, the loaded models, what they are scored with, and the rows sampled so far."""

    spec: SweepSpec
    modules: list[DiffusionModule]
    guide: DiffusionModule | None
    data: str
    weights: str | Path | None
    scorer: DigitScorer | None
    done: dict[tuple, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def use_fid(self) -> bool:
        return self.spec.fid or self.data != "digits"


def sweep(spec: SweepSpec, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Score every (sampler setting, NFE) of ``spec`` and write ``spec.out/{table.md, table.csv,
    quality_vs_nfe.png}`` after each row; returns the paths. ``log`` is called with one line per row."""
    job = _load(spec)
    info = _info(job)
    paths = {name: spec.out / name for name in ("table.md", "table.csv", "quality_vs_nfe.png")}
    rows: list[dict[str, Any]] = []
    for label, module in zip(spec.labels, job.modules, strict=True):
        for name, base in spec.settings.items():
            for n in spec.steps:
                rows.append(_row(job, module, label, name, base, n))
                log(_progress_line(rows[-1]))
                write_tables(rows, paths, info)
                write_plot(rows, paths["quality_vs_nfe.png"], info["floors"])
    return paths


def _load(spec: SweepSpec) -> _Sweep:
    """The models, checked against the spec, and what scores them: every input is checked before the classifier is
    trained and the first sample drawn (the output folder, FID's Inception weights, offline an error now, and its
    real images)."""
    modules = [load_module(c, spec.device) for c in spec.ckpt]
    guide = load_module(spec.guide_ckpt, spec.device) if spec.guide_ckpt is not None else None
    T = min(m.diffusion.num_timesteps for m in modules)  # every step count must suit every checkpoint
    for n in spec.steps:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"steps {n}: the number of network evaluations must be in [1, {T}] for this model")
    trained_on, data_kwargs = checkpoint_data(spec.ckpt[0])
    shape = _one_shape(spec.ckpt, modules)
    data = spec.data if spec.data != "auto" else trained_on or ("digits" if shape in DIGIT_SHAPES else "cifar10")
    if data == "digits" and shape not in DIGIT_SHAPES:
        raise ValueError(
            f"the digit classifier scores 1x28x28 or 1x32x32 images, the model makes "
            f"{'x'.join(map(str, shape))}: use data='cifar10' (FID)"
        )
    job = _Sweep(spec, modules, guide, data, spec.weights, scorer=None)
    check_output(spec.out, "out", folder=True)
    if data == "digits":
        check_output(spec.classifier_cache_dir or io_cache_dir(), "classifier_cache_dir", folder=True)
    if job.use_fid:
        job.weights = fetch_fid_weights(spec.weights)
        reference_set(data, spec.data_dir, "train", shape[-1])
    if data == "digits":
        digits = training_digits(trained_on, data_kwargs)
        job.scorer = DigitScorer.from_digits(digits, epochs=spec.classifier_epochs, cache_dir=spec.classifier_cache_dir)
    return job


def _one_shape(ckpts: Sequence[Path], modules: Sequence[DiffusionModule]) -> tuple[int, ...]:
    """The image shape every model makes; ValueError naming the checkpoint of another."""
    shape = tuple(modules[0].image_shape)
    for other, path in zip(modules[1:], ckpts[1:], strict=True):
        if tuple(other.image_shape) != shape:
            raise ValueError(
                f"{path} makes {tuple(other.image_shape)} images, {ckpts[0]} makes {shape}: sweep one shape"
            )
    return shape


def _info(job: _Sweep) -> dict[str, Any]:
    """What the tables say of the sweep: the checkpoints, their processes, the data, the sampling, where it ran, and
    the real held-out digits' scores (the floor at this sample size)."""
    spec = job.spec
    # each different process once: checkpoints of one run share theirs
    processes = dict.fromkeys(
        f"{m.schedule.name} schedule, {m.hparams.objective} objective, {m.hparams.variance} variance, "
        f"T = {m.diffusion.num_timesteps}"
        for m in job.modules
    )
    info = {"checkpoint": ", ".join(str(c) for c in spec.ckpt), "model": "; ".join(processes), "data": job.data,
            "num": spec.num, "seed": spec.seed, **run_info(job.modules[0].device), "floors": {}}  # fmt: skip
    if job.scorer is not None:
        # as many real held-out digits as samples: the Frechet distance is biased upwards at small sample sizes
        heldout = job.scorer.heldout[: spec.num]
        info["floors"]["frechet_distance"] = job.scorer(heldout)["frechet_distance"]
        info["num_reference"], info["num_heldout"] = job.scorer.num_reference, len(heldout)
    return info


def _row(job: _Sweep, module: DiffusionModule, label: str, name: str, base: SamplerConfig, n: int) -> dict[str, Any]:
    """The row of setting ``name`` (``base``) at ``n`` network evaluations of the checkpoint ``label``: sampled and
    scored, or, when the same sampler visits the same timesteps of that checkpoint in an earlier row, its figures."""
    spec = job.spec
    config = dataclasses.replace(at_evaluations(base, n), autoguidance_scale=spec.autoguidance_scale)
    nfe = SamplerConfig.parse(config, autoguidance_scale=1.0).nfe(module.diffusion.num_timesteps)
    setting = f"{label} {name}" if label else name
    key = (label, config.name, config.eta, config.options, tuple(config.visited(module.diffusion)))
    row = {"setting": setting, "sampler": config.name, "spacing": config.spacing, "eta": config.eta, "nfe": nfe}
    row["column"] = n  # the pivot's column: Heun's 2 steps - 1 evaluations sit in the column of NFE n
    if key in job.done:
        return row | {k: v for k, v in job.done[key].items() if k not in row} | {"same_as": job.done[key]["setting"]}
    images, seconds = generate(module, spec.num, sampler=config, seed=spec.seed, batch_size=spec.batch_size,
                               desc=f"{setting} {nfe}", guide=job.guide)  # fmt: skip
    row.update(_scores(job, images), seconds=seconds, images_per_s=spec.num / seconds, same_as="")
    job.done[key] = row
    return row


def _scores(job: _Sweep, images: torch.Tensor) -> dict[str, float]:
    """The digit classifier's figures (a digits sweep) and FID (``fid``, or other data) of samples in [-1, 1]."""
    spec = job.spec
    scores = job.scorer(images) if job.scorer is not None else {}
    if job.use_fid:
        scores["fid"] = fid_of_images(
            to_uint8(images), data=job.data, data_dir=spec.data_dir, num_real=spec.num_real, weights=job.weights,
            batch_size=spec.batch_size, device=spec.device,
        )  # fmt: skip
    return scores


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
    nfes = sorted({row["column"] for row in rows}, reverse=True)
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
            cells = {row["column"]: row[metric] for row in rows if row["setting"] == setting}
            lines.append(f"| {setting} | " + " | ".join(f"{cells[n]:.1f}" if n in cells else "" for n in nfes) + " |")
        if any(row["nfe"] != row["column"] for row in rows):
            lines.append("\nHeun makes 2 N - 1 evaluations with N = (NFE + 1) // 2 steps: one less in even columns.")
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


def write_tables(rows: Sequence[dict[str, Any]], paths: Mapping[str, Path], info: dict[str, Any]) -> None:
    for name, text in (("table.csv", table_csv(rows)), ("table.md", table_md(rows, info))):
        atomic_write(paths[name], lambda tmp, text=text: tmp.write_text(text))


def write_plot(rows: Sequence[dict[str, Any]], path: Path, floors: Mapping[str, float]) -> None:
    from ddpm_lightning.plots import quality_vs_nfe_figure, save_figure  # matplotlib only once a figure is drawn

    save_figure(quality_vs_nfe_figure(rows, floors), path)
