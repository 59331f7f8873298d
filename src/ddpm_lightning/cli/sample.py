"""``ddpm sample --ckpt PATH --num N --out DIR``: PNG samples and a grid from a checkpoint's EMA weights."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ddpm_lightning.choices import SAMPLERS, SPACINGS, STEPS_HELP, add_autoguidance_arguments, check_positive


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm sample",
        description="PNG files and a grid of samples from a checkpoint's EMA weights (sample i seeded by seed + i).",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument(
        "--spacing", choices=SPACINGS, default=None, help="of the timesteps (default: the checkpoint's)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale s of a class-conditional model: 1 conditional, 0 unconditional, > 1 "
        "guided (default: the checkpoint's)",
    )
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        type=int,
        default=None,
        help="class of a conditional model; repeat it for several: image i gets the i-th, cycling (default: all)",
    )
    add_autoguidance_arguments(parser)
    parser.add_argument("--grid-by-class", action="store_true", help="grid.png with one row per class")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm sample --ckpt PATH --num N --out DIR [--seed S] [--sampler NAME --steps N] [--class K ...
    --guidance-scale S --grid-by-class]``."""
    args = build_parser().parse_args(argv)
    check_positive(args, "num", "steps", "batch_size")
    from ddpm_lightning.checkpoint import check_checkpoint_file
    from ddpm_lightning.io import check_output
    from ddpm_lightning.sampling import sample_to_folder

    # every input before the first sample: the output folder and the checkpoints
    check_output(args.out, "--out", folder=True)
    check_checkpoint_file(args.ckpt, "--ckpt")
    if args.guide_ckpt is not None:
        check_checkpoint_file(args.guide_ckpt, "--guide-ckpt")

    grid = sample_to_folder(**vars(args))
    print(f"wrote {args.num} samples to {args.out} and the grid {grid}")
    return 0
