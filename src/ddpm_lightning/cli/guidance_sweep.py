"""``ddpm guidance-sweep --ckpt PATH [--scales 1 2 3 5]``: accuracy of the requested class and Frechet distance of a
class-conditional digits model at each classifier-free guidance scale."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_lightning.choices import GUIDANCE_SCALES as SCALES
from ddpm_lightning.choices import SAMPLERS, STEPS_HELP

if TYPE_CHECKING:
    from ddpm_lightning.evaluation.guidance import GuidanceSweepSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm guidance-sweep",
        description="For each guidance scale s: N samples of a class-conditional digits checkpoint, the classes "
        "cycled, scored by the demo's digit classifier (accuracy of the requested class, Frechet distance). Writes "
        "OUT/table.md, table.json and grid_s<s>.png (one row per class).",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint of a class-conditional digits model")
    parser.add_argument("--out", type=Path, default=Path("results/guidance"), help="default: results/guidance")
    parser.add_argument(
        "--scales", nargs="+", type=float, default=list(SCALES), help="guidance scales (default: 1 2 3 5)"
    )
    parser.add_argument("--num", type=int, default=250, help="samples per scale (default 250)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=250, help="default 250")
    parser.add_argument("--classifier-epochs", type=int, default=6, help="the demo's digit classifier (default 6)")
    parser.add_argument("--classifier-cache-dir", default=None, help="default: ~/.cache/ddpm-lightning")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def spec_of(args: argparse.Namespace) -> GuidanceSweepSpec:
    """The sweep the parsed command line asks for."""
    from ddpm_lightning.evaluation.guidance import GuidanceSweepSpec

    return GuidanceSweepSpec(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm guidance-sweep --ckpt PATH [--scales 1 2 3 5] [--num 250] [--sampler NAME --steps N]``."""
    spec = spec_of(build_parser().parse_args(argv))
    start = time.perf_counter()
    from ddpm_lightning.checkpoint import check_checkpoint_file
    from ddpm_lightning.evaluation.guidance import guidance_sweep
    from ddpm_lightning.io import check_output

    # every input before the classifier is trained and the first sample drawn
    check_checkpoint_file(spec.ckpt, "--ckpt")
    check_output(spec.out, "--out", folder=True)
    if spec.classifier_cache_dir is not None:
        check_output(spec.classifier_cache_dir, "--classifier-cache-dir", folder=True)

    paths = guidance_sweep(spec)
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {minutes:.1f} min")
    return 0
