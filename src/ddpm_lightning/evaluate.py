"""``ddpm evaluate``: FID, Inception Score and KID of a checkpoint's samples (or a folder of PNGs) with torch-fidelity.

The paper's protocol (Ho et al. 2020, Table 1): 50,000 samples from the EMA weights with the full 1000-step chain,
quantised to uint8, against the statistics of the 50,000 CIFAR-10 **training** images, with TF's Inception
(2015-12-05). The reference images are read from the local data set, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ddpm_lightning.data import CIFAR10DataModule, EmbeddedDigitsDataModule, to_uint8
from ddpm_lightning.diffusion import SAMPLERS, SPACINGS
from ddpm_lightning.metrics.inception_weights import missing_weights_message, resolve_fid_weights

METRICS = ("fid", "isc", "kid")
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
        item = self.source[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = x if x.dtype == torch.uint8 else to_uint8(x)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x  # (3, H, W)


class PngFolder(Dataset):
    """The ``*.png`` files of a folder (not ``grid.png``, which ``ddpm sample`` writes beside them), sorted."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise FileNotFoundError(f"--samples {folder} is not a folder")
        self.files = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
        if len(self.files) < 2:
            raise ValueError(f"--samples {folder} holds {len(self.files)} PNG files; FID needs at least 2")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W)


def generate(
    ckpt: Path,
    num: int,
    *,
    batch_size: int,
    sampler: str | None,
    num_steps: int | None,
    eta: float | None,
    seed: int,
    device: str | None,
    spacing: str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``num`` uint8 samples (N, C, H, W) from the checkpoint's EMA weights (sample i seeded by ``seed + i``)."""
    from ddpm_lightning.sampling import load_module

    module = load_module(ckpt, device)
    hp = module.hparams
    settings = module.sampling_settings(sampler, num_steps, eta, spacing)
    images = torch.empty(num, hp.in_channels, hp.image_size, hp.image_size, dtype=torch.uint8)
    for start in tqdm(range(0, num, batch_size), desc="sampling", unit="batch"):
        seeds = list(range(seed + start, seed + min(start + batch_size, num)))
        batch = module.sample(len(seeds), seeds=seeds, **settings)
        images[start : start + len(seeds)] = to_uint8(batch.float().cpu())
    sampler = settings["sampler"]
    return images, {
        "sampler": sampler,
        "steps": settings["num_steps"],
        "eta": settings["eta"] if sampler == "ddim" else None,
        "spacing": settings["spacing"] if settings["num_steps"] < hp.num_timesteps else None,
        "seed": seed,
        "num_timesteps": hp.num_timesteps,
    }


def reference_images(dataset: str, data_dir: str, split: str) -> Dataset:
    """The un-augmented real images of ``split`` (items (image in [-1, 1], label)), read locally."""
    if dataset == "cifar10":
        datamodule = CIFAR10DataModule(data_dir=data_dir)
        datamodule.prepare_data()  # extracts the archive if that is all there is; never downloads
        return datamodule.real_images_dataset(split)
    if dataset == "digits":
        return EmbeddedDigitsDataModule().real_images_dataset(split)
    raise ValueError(f"--data {dataset!r}; expected one of {DATASETS}")


def has_classifier(weights: str | None) -> bool:
    """Whether the Inception weights can give Inception Score (a file converted from fid-helper has NaN logits)."""
    if weights is None:
        return True  # torch-fidelity's own download
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return bool(torch.isfinite(state["fc.weight"]).all())


def write_json_atomically(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _finite_or_none(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _calculate_metrics(
    generated: Dataset, reference: Dataset | None, *, weights: str | None, device: str | None, **options: Any
) -> dict[str, Any]:
    """torch-fidelity's ``calculate_metrics`` on the device, with a clear error when the weights cannot be had."""
    import torch_fidelity

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return torch_fidelity.calculate_metrics(
            input1=generated,
            input2=reference,
            cuda=device.type == "cuda",
            feature_extractor_weights_path=weights,
            cache=False,
            verbose=True,
            **options,
        )
    except OSError as err:  # torch-fidelity could not download the weights
        if weights is not None:
            raise
        raise FileNotFoundError(missing_weights_message()) from err


def fid_of_images(
    images: torch.Tensor,
    *,
    data: str,
    data_dir: str = "data",
    split: str = "train",
    num_real: int | None = None,
    weights: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> float:
    """FID (torch-fidelity) of uint8 images (N, C, H, W) against the local real images of ``data`` / ``split``."""
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(images)}")
    reference = Uint8Images(reference_images(data, data_dir, split), num_real)
    result = _calculate_metrics(
        Uint8Images(images),
        reference,
        weights=resolve_fid_weights(weights),
        device=device,
        batch_size=batch_size,
        fid=True,
    )
    return float(result["frechet_inception_distance"])


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Compute the metrics for parsed ``ddpm evaluate`` arguments and return the report."""
    metrics = set(args.metrics)
    weights = resolve_fid_weights(args.weights)
    notes = []
    if "isc" in metrics and not has_classifier(weights):
        metrics.discard("isc")
        notes.append(
            f"Inception Score skipped: {weights} was converted from fid-helper and has no classifier layer (its "
            "logits are NaN). IS needs torch-fidelity's own weights file (see `ddpm fid-weights --source cache`)."
        )
        print(f"warning: {notes[-1]}")
    if not metrics:
        raise ValueError(f"nothing to compute: --metrics {' '.join(args.metrics)} with these weights")

    if args.ckpt is not None:
        images, sampling = generate(
            args.ckpt,
            args.num,
            batch_size=args.batch_size,
            sampler=args.sampler,
            num_steps=args.steps,
            eta=args.eta,
            seed=args.seed,
            device=args.device,
            spacing=args.spacing,
        )
        generated = Uint8Images(images)
        source = {"checkpoint": str(args.ckpt), "num": len(generated), **sampling}
    else:
        generated = Uint8Images(PngFolder(args.samples))
        source = {"samples": str(args.samples), "num": len(generated)}

    need_reference = bool(metrics & {"fid", "kid"})
    reference = Uint8Images(reference_images(args.data, args.data_dir, args.split), args.num_real)
    kid_subset_size = min(args.kid_subset_size, len(generated), len(reference))
    result = _calculate_metrics(
        generated,
        reference if need_reference else None,
        weights=weights,
        device=args.device,
        batch_size=args.batch_size,
        fid="fid" in metrics,
        isc="isc" in metrics,
        kid="kid" in metrics,
        kid_subset_size=kid_subset_size,
    )

    paper = (
        args.ckpt is not None
        and source["sampler"] == "ddpm"
        and source["steps"] == source["num_timesteps"]
        and len(generated) >= PAPER_NUM_SAMPLES
        and (args.data, args.split, args.num_real) == ("cifar10", "train", None)
    )
    if not paper:
        notes.append(
            "Not the paper's protocol (50k EMA samples of the full DDPM chain vs the CIFAR-10 train set): "
            "do not compare these numbers with FID 3.17 / IS 9.46."
        )
    return {
        "fid": _finite_or_none(result.get("frechet_inception_distance")),
        "isc_mean": _finite_or_none(result.get("inception_score_mean")),
        "isc_std": _finite_or_none(result.get("inception_score_std")),
        "kid_mean": _finite_or_none(result.get("kernel_inception_distance_mean")),
        "kid_std": _finite_or_none(result.get("kernel_inception_distance_std")),
        "kid_subset_size": kid_subset_size if "kid" in metrics else None,
        "generated": source,
        "reference": {"dataset": args.data, "split": args.split, "num": len(reference)},
        "feature_extractor": {"name": "inception-v3-compat", "weights": weights or "torch-fidelity download"},
        "paper_protocol": paper,
        "notes": notes,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm evaluate",
        description="FID, Inception Score and KID (torch-fidelity) of a checkpoint's EMA samples or a PNG folder, "
        "against the local real images (default: the CIFAR-10 training set, as in the paper).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="checkpoint written by `ddpm fit` (its EMA weights are sampled)")
    source.add_argument("--samples", type=Path, help="folder of PNG samples, e.g. written by `ddpm sample`")
    parser.add_argument("--num", type=int, default=PAPER_NUM_SAMPLES, help="samples from --ckpt (default 50000)")
    parser.add_argument("--data", choices=DATASETS, default="cifar10", help="reference data set (default cifar10)")
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default data)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="reference split (default train)")
    parser.add_argument("--num-real", type=int, default=None, help="first N reference images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="sampling and Inception batch (default 256)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help="network evaluations (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the checkpoint's)")
    parser.add_argument("--spacing", choices=SPACINGS, default=None, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument("--weights", default=None, help="Inception weights file (feature_extractor_weights_path)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="default: all")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="capped by the numbers of images")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report (default report.json)")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    """``ddpm evaluate (--ckpt PATH --num N | --samples DIR) [--weights PATH] [--out report.json]``."""
    args = build_parser().parse_args(argv)
    for name in ("num", "batch_size", "kid_subset_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_real is not None and args.num_real < 2:
        raise ValueError(f"--num-real must be >= 2, got {args.num_real}")
    report = evaluate(args)
    write_json_atomically(report, args.out)
    shown = {k: report[k] for k in ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std") if report[k] is not None}
    print(json.dumps(shown))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}")
    return 0
