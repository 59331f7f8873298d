"""``ddpm evaluate (--ckpt PATH --num N | --samples DIR)``: FID, Inception Score and KID into a JSON report."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_lightning.choices import EVAL_DATASETS as DATASETS
from ddpm_lightning.choices import (
    METRICS,
    PAPER_NUM_SAMPLES,
    SAMPLERS,
    SPACINGS,
    STEPS_HELP,
    add_autoguidance_arguments,
    check_positive,
)

if TYPE_CHECKING:
    from ddpm_lightning.evaluation.fidelity import EvaluateSpec


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
    parser.add_argument(
        "--data",
        default="cifar10",
        help=f"reference data set: {', '.join(DATASETS)} or a folder of PNG/JPEG/WebP images (default cifar10)",
    )
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default data)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="reference split (default train)")
    parser.add_argument("--num-real", type=int, default=None, help="first N reference images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="sampling and Inception batch (default 256)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the checkpoint's)")
    parser.add_argument("--spacing", choices=SPACINGS, default=None, help="default: the checkpoint's")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale of a class-conditional model (default: the checkpoint's); its classes "
        "are drawn in the reference data's proportions",
    )
    add_autoguidance_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument(
        "--weights",
        default=None,
        help="Inception weights file (`ddpm fid-weights --out PATH`; default: torch hub's cache, else a download)",
    )
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="default: all")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="capped by the numbers of images")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report (default report.json)")
    return parser


def spec_of(args: argparse.Namespace) -> EvaluateSpec:
    """The evaluation the parsed command line asks for: the sampler options it gives change the checkpoint's own."""
    from ddpm_lightning.evaluation.fidelity import SAMPLER_CHANGES, EvaluateSpec

    fields = vars(args).copy()
    changes = {name: fields.pop(name) for name in SAMPLER_CHANGES}
    return EvaluateSpec(**fields, sampler_changes={k: v for k, v in changes.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm evaluate (--ckpt PATH --num N | --samples DIR) [--weights PATH] [--out report.json]``."""
    parsed = build_parser().parse_args(argv)
    check_positive(parsed, "num", "steps", "batch_size", "kid_subset_size")
    from ddpm_lightning.checkpoint import check_checkpoint_file
    from ddpm_lightning.evaluation.fidelity import evaluate
    from ddpm_lightning.io import check_output

    spec = spec_of(parsed)
    # the files first; evaluate() checks the weights and the reference data before it samples
    check_output(spec.out, "--out")
    for option, path in (("--ckpt", spec.ckpt), ("--guide-ckpt", spec.guide_ckpt)):
        if path is not None:
            check_checkpoint_file(path, option)
    report = evaluate(spec)
    shown = {k: report[k] for k in ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std") if report[k] is not None}
    print(json.dumps(shown))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {spec.out}")
    return 0
