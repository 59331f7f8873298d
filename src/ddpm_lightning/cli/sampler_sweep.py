"""``ddpm sampler-sweep --ckpt PATH [PATH ...]``: quality and speed of each sampler against the number of network
evaluations, for one checkpoint or several side by side."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_lightning.choices import SWEEP_DATASETS as DATASETS
from ddpm_lightning.choices import SWEEP_SETTINGS as SETTINGS
from ddpm_lightning.choices import SWEEP_STEPS as STEPS
from ddpm_lightning.choices import add_autoguidance_arguments

if TYPE_CHECKING:
    from ddpm_lightning.evaluation.sampler_sweep import SweepSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm sampler-sweep",
        description="Sample quality and images/s of each sampler at each number of network evaluations (NFE): the "
        "demo's digit-classifier figures for a digits model, FID for other data or with --fid. Writes "
        "OUT/table.md, table.csv and quality_vs_nfe.png.",
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        nargs="+",
        type=Path,
        help="checkpoint written by `ddpm fit`; several (e.g. an ablation's runs) are compared in one table and plot",
    )
    parser.add_argument("--labels", nargs="+", help="one name per checkpoint (default: each one's folder name)")
    parser.add_argument("--out", type=Path, default=Path("results/samplers"), help="default: results/samplers")
    parser.add_argument(
        "--samplers", dest="settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS), help="default: all"
    )
    parser.add_argument(
        "--steps",
        dest="steps",
        nargs="+",
        type=int,
        default=list(STEPS),
        help="network evaluations (NFE), default: 1000 250 100 50 20 10",
    )
    add_autoguidance_arguments(parser, default=1.0)
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
    return parser


def spec_of(args: argparse.Namespace) -> SweepSpec:
    """The sweep the parsed command line asks for."""
    from ddpm_lightning.evaluation.sampler_sweep import SweepSpec

    return SweepSpec(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm sampler-sweep --ckpt PATH [--num 250] [--steps 1000 250 ...] [--samplers ...] [--fid]``."""
    from ddpm_lightning.legacy import upgrade_sweep_argv

    args = build_parser().parse_args(upgrade_sweep_argv(sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    spec = spec_of(args)
    from ddpm_lightning.checkpoint import check_checkpoint_file
    from ddpm_lightning.evaluation.sampler_sweep import sweep
    from ddpm_lightning.io import check_output

    # the files first; the sweep checks the FID weights and data before the classifier is trained or a sample drawn
    for ckpt in spec.ckpt:
        check_checkpoint_file(ckpt, "--ckpt")
    if spec.guide_ckpt is not None:
        check_checkpoint_file(spec.guide_ckpt, "--guide-ckpt")
    check_output(spec.out, "--out", folder=True)
    if spec.classifier_cache_dir is not None:
        check_output(spec.classifier_cache_dir, "--classifier-cache-dir", folder=True)

    paths = sweep(spec)
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {minutes:.1f} min")
    return 0
