"""FID, Inception Score and KID of a checkpoint's samples (or a folder of PNGs) with torch-fidelity.

The paper's protocol (Ho et al. 2020, Table 1): 50,000 samples from the EMA weights with the full 1000-step chain,
quantised to uint8, against the statistics of the 50,000 CIFAR-10 **training** images, with TF's Inception
(2015-12-05). The reference images are read from the local data set, so nothing is downloaded. A class-conditional
model is sampled with its classes in the reference data's proportions, deterministically by sample index
(:func:`~ddpm_lightning.sampling.proportional_labels`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ddpm_lightning import io
from ddpm_lightning.checkpoint import check_checkpoint_file
from ddpm_lightning.data import CIFAR10DataModule, EmbeddedDigitsDataModule, ImageFolderDataModule, images_of, to_uint8
from ddpm_lightning.diffusion import SamplerConfig, Spacing
from ddpm_lightning.evaluation.inception_weights import (
    find_cached_weights,
    missing_weights_message,
    resolve_fid_weights,
)
from ddpm_lightning.evaluation.real_stats import file_digest, real_stats_key, real_stats_name
from ddpm_lightning.lit_module import PAPER_SAMPLER
from ddpm_lightning.sampling import default_device, iter_samples, load_for_sampling, proportional_labels

__all__ = [
    "DATASETS",
    "METRICS",
    "SAMPLER_CHANGES",
    "PAPER_NUM_SAMPLES",
    "PngFolder",
    "EvaluateSpec",
    "Uint8Images",
    "class_proportions",
    "evaluate",
    "fetch_fid_weights",
    "fid_of_images",
]

Metric = Literal["fid", "isc", "kid"]
METRICS: tuple[Metric, ...] = ("fid", "isc", "kid")
DATASETS = ("cifar10", "digits")
PAPER_NUM_SAMPLES = 50_000


class Uint8Images(Dataset):
    """torch-fidelity's input: uint8 (3, H, W) tensors, from items in [-1, 1] or uint8; grey is repeated to RGB."""

    def __init__(self, source: Any, num: int | None = None):
        self.source = source
        self.num = len(source) if num is None else num
        if self.num > len(source):
            raise ValueError(f"asked for {self.num} images but there are {len(source)}")

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> torch.Tensor:
        x = images_of(self.source[i])
        x = x if x.dtype == torch.uint8 else to_uint8(x)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x  # (3, H, W)


class PngFolder(Dataset):
    """The ``*.png`` files of a folder (not ``grid.png``, which ``ddpm sample`` writes beside them), sorted."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"samples folder {folder} is not a folder")
        self.files = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
        if len(self.files) < 2:
            raise ValueError(f"samples folder {folder} holds {len(self.files)} PNG files; FID needs at least 2")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W)


def class_proportions(dataset: Dataset) -> list[float]:
    """The share of each class 0..K-1 among the labels of an (image, label) data set."""
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long).flatten())
    return (counts.double() / counts.sum()).tolist()


def generate(
    ckpt: str | Path,
    num: int,
    *,
    sampler: SamplerConfig | Mapping[str, Any] | str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    spacing: Spacing | None = None,
    guidance_scale: float | None = None,
    proportions: Sequence[float] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    guide_ckpt: str | Path | None = None,
    autoguidance_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``num`` uint8 samples (N, C, H, W) from the checkpoint's EMA weights (sample i seeded by ``seed + i``) and
    how they were drawn. ``sampler``, ``steps``, ``eta``, ``spacing`` and ``guidance_scale`` change the checkpoint's
    own setting. A class-conditional model draws its classes in ``proportions`` (one per class; default: equal).
    ``guide_ckpt`` / ``autoguidance_scale``: autoguidance by that weaker checkpoint of the same process."""
    module, config, guide = load_for_sampling(
        ckpt, device, sampler, guide_ckpt, steps=steps, eta=eta, spacing=spacing, guidance_scale=guidance_scale,
        autoguidance_scale=autoguidance_scale,
    )  # fmt: skip
    T = module.diffusion.num_timesteps
    nfe = config.nfe(T)  # checks the step count against T before any sampling
    labels, classes = None, None
    if module.num_classes is not None:
        proportions = [1.0] * module.num_classes if proportions is None else list(proportions)
        if len(proportions) != module.num_classes:
            raise ValueError(
                f"the reference data have {len(proportions)} classes but the model {ckpt} has "
                f"num_classes={module.num_classes}"
            )
        labels = proportional_labels(proportions)
        classes = {
            "num_classes": module.num_classes,
            "proportions": proportions,
            "guidance_scale": config.guidance_scale,
        }
    images = torch.empty(num, *module.image_shape, dtype=torch.uint8)
    for indices, batch in iter_samples(module, range(num), sampler=config, seed=seed, batch_size=batch_size,
                                       progress=True, labels=labels, guide=guide):  # fmt: skip
        images[indices] = to_uint8(batch.float().cpu())
    return images, {
        "sampler": config.name,
        "steps": nfe,
        "eta": config.eta if config.spec.uses_eta else None,
        "spacing": config.spacing if nfe < T else None,
        "label": config.label(T),
        "seed": seed,
        "num_timesteps": T,
        "classes": classes,
    }


def reference_set(dataset: str, data_dir: str | Path, split: str, image_size: int) -> tuple[Dataset, str]:
    """The real images of ``dataset`` and the name their cached statistics are kept under: ``split`` of a data set in
    :data:`DATASETS`, or every image of a folder but ``grid.png`` (resized and center-cropped to ``image_size``; the
    name holds a digest of its files)."""
    if dataset not in DATASETS and Path(dataset).is_dir():
        # not the grid of a folder `ddpm sample` wrote: its images are there already
        folder = ImageFolderDataModule(dataset, image_size=image_size, channels=3, exclude=("grid.png",))
        return folder.real_images_dataset("all"), f"{folder.name}-all"
    return reference_images(dataset, data_dir, split), dataset


def reference_images(dataset: str, data_dir: str | Path, split: str) -> Dataset:
    """The un-augmented real images of ``split`` (items (image in [-1, 1], label)), read locally."""
    if dataset == "cifar10":
        datamodule = CIFAR10DataModule(data_dir=str(data_dir))
        datamodule.prepare_data()  # extracts the archive if that is all there is; never downloads
        return datamodule.real_images_dataset(split)
    if dataset == "digits":
        return EmbeddedDigitsDataModule().real_images_dataset(split)
    raise ValueError(f"unknown data set {dataset!r}; allowed: {', '.join(DATASETS)} or a folder of images")


def has_classifier(weights: str | None) -> bool:
    """Whether the Inception weights can give Inception Score (a file converted from fid-helper has NaN logits)."""
    if weights is None:
        return True  # torch-fidelity's own download
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return bool(torch.isfinite(state["fc.weight"]).all())


def _fidelity_version() -> str:
    import torch_fidelity

    return str(torch_fidelity.__version__)


def _finite_or_none(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def fetch_fid_weights(weights: str | Path | None, option: str = "--weights ") -> str | None:
    """The Inception weights file, checked (or downloaded into torch hub's cache) before anything is sampled.

    ``option`` is how the user passed ``weights``; offline with no cached copy this raises FileNotFoundError with
    :func:`missing_weights_message` rather than after the sampling.
    """
    resolved = resolve_fid_weights(None if weights is None else str(weights), option=option)
    if resolved is not None:
        return resolved
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # downloads into the hub cache
    except OSError as err:  # urllib's URLError and socket errors are OSErrors
        raise FileNotFoundError(missing_weights_message(f"{option}PATH")) from err
    cached = find_cached_weights()
    return None if cached is None else str(cached)


def _calculate_metrics(
    generated: Dataset,
    reference: Dataset | None,
    *,
    weights: str | None,
    device: str | torch.device | None,
    **options: Any,
) -> dict[str, Any]:
    """torch-fidelity's ``calculate_metrics`` on the device, with a clear error when the weights cannot be had."""
    import torch_fidelity

    device = default_device(device)
    try:
        with warnings.catch_warnings():
            # torch-fidelity loads with min(4, 2 x cores) workers, which torch calls excessive on 1 or 2 cores
            warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes")
            return torch_fidelity.calculate_metrics(
                input1=generated,
                input2=reference,
                cuda=device.type == "cuda",
                feature_extractor_weights_path=weights,
                cache=options.get("input2_cache_name") is not None,
                cache_root=str(io.cache_dir("fid-stats")),
                verbose=True,
                **options,
            )
    except OSError as err:  # torch-fidelity could not download the weights
        if weights is not None:
            raise
        raise FileNotFoundError(missing_weights_message("--weights PATH")) from err


def fid_of_images(
    images: torch.Tensor,
    *,
    data: str,
    data_dir: str | Path = "data",
    split: str = "train",
    num_real: int | None = None,
    weights: str | Path | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """FID (torch-fidelity) of uint8 images (N, C, H, W) against the local real images of ``data`` / ``split``."""
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(images)}")
    reference = Uint8Images(reference_set(data, data_dir, split, images.shape[-1])[0], num_real)
    result = _calculate_metrics(
        Uint8Images(images),
        reference,
        weights=resolve_fid_weights(None if weights is None else str(weights), option="--weights "),
        device=device,
        batch_size=batch_size,
        fid=True,
    )
    return float(result["frechet_inception_distance"])


#: the note of a report made otherwise than the paper
NOT_THE_PAPERS = (
    "Not the paper's protocol (50k EMA samples of the full DDPM chain vs the CIFAR-10 train set): "
    "do not compare these numbers with FID 3.17 / IS 9.46."
)
#: the fields of a :class:`SamplerConfig` an :class:`EvaluateSpec` may change in the checkpoint's own setting
SAMPLER_CHANGES = ("steps", "eta", "spacing", "guidance_scale", "autoguidance_scale")


@dataclass(frozen=True)
class EvaluateSpec:
    """What :func:`evaluate` measures: ``num`` samples of a checkpoint's EMA weights (``ckpt``) or a folder of PNG
    files (``samples``), against the local real images of ``data`` / ``split``; checked at construction.

    Args:
        sampler, sampler_changes: how the checkpoint is sampled: a :class:`SamplerConfig`, a sampler name or None
            (the checkpoint's own setting), with the fields of ``sampler_changes`` (``{"steps": 50}``; any of
            :data:`SAMPLER_CHANGES`) changed. A class-conditional checkpoint samples its classes in the proportions
            of the reference images.
        guide_ckpt: autoguidance of the checkpoint by this weaker one of the same process (its weight:
            ``sampler_changes["autoguidance_scale"]``).
        seed: sample i is seeded by ``seed + i``.
        batch_size: of the sampling and of the Inception network.
        num_real: the first ``num_real`` real images (default: all).
        weights: the Inception weights file (``ddpm fid-weights``); default: torch hub's cache, else a download.
        metrics: any of ``"fid"``, ``"isc"``, ``"kid"``.
        kid_subset_size: KID's subset size, capped by the numbers of images.
        out: the JSON report's file (None: not written).
    """

    ckpt: Path | None = None
    samples: Path | None = None
    num: int = PAPER_NUM_SAMPLES
    sampler: SamplerConfig | Mapping[str, Any] | str | None = None
    sampler_changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    guide_ckpt: Path | None = None
    seed: int = 0
    batch_size: int = 256
    data: str = "cifar10"
    data_dir: Path = Path("data")
    split: Literal["train", "test"] = "train"
    num_real: int | None = None
    weights: str | Path | None = None
    metrics: Sequence[Metric] = METRICS
    kid_subset_size: int = 1000
    device: str | torch.device | None = None
    out: Path | None = None

    def __post_init__(self) -> None:
        if (self.ckpt is None) == (self.samples is None):
            raise ValueError("give exactly one of a checkpoint (ckpt) and a folder of PNG samples (samples)")
        for name in ("num", "batch_size", "kid_subset_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_real is not None and self.num_real < 2:
            raise ValueError(f"num_real must be >= 2, got {self.num_real}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; allowed: {', '.join(METRICS)}")
        if unknown := [k for k in self.sampler_changes if k not in SAMPLER_CHANGES]:
            raise ValueError(f"unknown sampler_changes {unknown}; allowed: {', '.join(SAMPLER_CHANGES)}")
        paths = {"ckpt": self.ckpt, "samples": self.samples, "guide_ckpt": self.guide_ckpt}
        for name, value in paths.items():
            object.__setattr__(self, name, None if value is None else Path(value))
        object.__setattr__(self, "out", None if self.out is None else Path(self.out).expanduser())
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "sampler_changes", dict(self.sampler_changes))


def evaluate(spec: EvaluateSpec) -> dict[str, Any]:
    """FID, Inception Score and KID (torch-fidelity) of ``spec``'s samples against its real images; the report is
    written to ``spec.out`` when given.

    Returns:
        The report: the figures (None when not computed), the generated and reference sets, the feature extractor,
        whether this is the paper's protocol, and notes.
    """
    weights, wanted, notes = _prepare(spec)
    generated, source = _generated(spec)
    reference, reference_name = _reference(spec, generated[0].shape[-1])
    kid_subset_size = min(spec.kid_subset_size, len(generated), len(reference))
    result = _measure(spec, generated, reference, reference_name, weights, wanted, kid_subset_size)
    paper = _is_paper_protocol(spec, source)
    report = {
        "fid": _finite_or_none(result.get("frechet_inception_distance")),
        "isc_mean": _finite_or_none(result.get("inception_score_mean")),
        "isc_std": _finite_or_none(result.get("inception_score_std")),
        "kid_mean": _finite_or_none(result.get("kernel_inception_distance_mean")),
        "kid_std": _finite_or_none(result.get("kernel_inception_distance_std")),
        "kid_subset_size": kid_subset_size if "kid" in wanted else None,
        "generated": source,
        "reference": {"dataset": spec.data, "cache_name": reference_name, "split": spec.split, "num": len(reference)},
        "feature_extractor": {"name": "inception-v3-compat", "weights": weights or "torch-fidelity download"},
        "paper_protocol": paper,
        "notes": notes if paper else [*notes, NOT_THE_PAPERS],
    }
    if spec.out is not None:
        io.write_json(report, spec.out)
    return report


def _prepare(spec: EvaluateSpec) -> tuple[str | None, set[str], list[str]]:
    """Every input checked before the first sample is drawn: the Inception weights (resolved), the checkpoint; the
    metrics these weights can give, and the notes on those they cannot."""
    weights = fetch_fid_weights(spec.weights)
    if spec.ckpt is not None:
        check_checkpoint_file(spec.ckpt, "ckpt")
    wanted, notes = set(spec.metrics), []
    if "isc" in wanted and not has_classifier(weights):
        wanted.discard("isc")
        notes.append(
            f"Inception Score skipped: {weights} was converted from fid-helper and has no classifier layer (its "
            "logits are NaN). IS needs torch-fidelity's own weights file (see `ddpm fid-weights --source cache`)."
        )
        print(f"warning: {notes[-1]}")
    if not wanted:
        raise ValueError(f"nothing to compute: metrics {' '.join(spec.metrics)} with these weights")
    return weights, wanted, notes


def _generated(spec: EvaluateSpec) -> tuple[Uint8Images, dict[str, Any]]:
    """The images measured, and what they are: the checkpoint's samples or the folder's PNG files."""
    if spec.ckpt is None:
        generated = Uint8Images(PngFolder(spec.samples))
        return generated, {"samples": str(spec.samples), "num": len(generated)}
    # a conditional model samples the classes in the proportions of the reference's labels
    labelled = reference_set(spec.data, spec.data_dir, spec.split, 32)[0]
    images, sampling = generate(
        spec.ckpt, spec.num, sampler=spec.sampler, **spec.sampler_changes, proportions=class_proportions(labelled),
        seed=spec.seed, batch_size=spec.batch_size, device=spec.device, guide_ckpt=spec.guide_ckpt,
    )  # fmt: skip
    generated = Uint8Images(images)
    return generated, {"checkpoint": str(spec.ckpt), "num": len(generated), **sampling}


def _reference(spec: EvaluateSpec, image_size: int) -> tuple[Uint8Images, str]:
    """The real images (the first ``num_real``) and the name their cached statistics are kept under."""
    real, name = reference_set(spec.data, spec.data_dir, spec.split, image_size)
    return Uint8Images(real, spec.num_real), name


def _measure(
    spec: EvaluateSpec,
    generated: Uint8Images,
    reference: Uint8Images,
    reference_name: str,
    weights: str | None,
    wanted: set[str],
    kid_subset_size: int,
) -> dict[str, Any]:
    """torch-fidelity's figures of the ``wanted`` metrics. The reference's features are cached (torch-fidelity's
    cache, in io.cache_dir("fid-stats")) under the key the FID callback uses: data set, split, resolution, number
    of images and the extractor's weights."""
    need_reference = bool(wanted & {"fid", "kid"})
    key = real_stats_key(
        dataset=reference_name,
        split=spec.split,
        resolution="x".join(str(n) for n in reference[0].shape[-2:]),
        num_images=len(reference),
        extractor="inception-v3-compat-torch-fidelity",
        extractor_sha256=file_digest(weights) if weights is not None else f"default-{_fidelity_version()}",
    )
    return _calculate_metrics(
        generated,
        reference if need_reference else None,
        weights=weights,
        device=spec.device,
        batch_size=spec.batch_size,
        fid="fid" in wanted,
        isc="isc" in wanted,
        kid="kid" in wanted,
        kid_subset_size=kid_subset_size,
        input2_cache_name=real_stats_name(key) if need_reference else None,
    )


def _is_paper_protocol(spec: EvaluateSpec, source: Mapping[str, Any]) -> bool:
    """Whether this is the paper's protocol: 50k samples of the full DDPM chain against the CIFAR-10 train set."""
    return (
        spec.ckpt is not None
        and source["sampler"] == PAPER_SAMPLER.name
        and source["steps"] == source["num_timesteps"]
        and source["num"] >= PAPER_NUM_SAMPLES
        and (spec.data, spec.split, spec.num_real) == ("cifar10", "train", None)
    )
