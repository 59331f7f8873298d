"""``ddpm posthoc-ema --run DIR --sigma-rel 0.05 0.1 [--out DIR] [--step N]``: sampling checkpoints of any EMA length
from the post-hoc EMA snapshots of a run (:func:`~ddpm_lightning.posthoc.reconstruct_posthoc_ema`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm posthoc-ema",
        description="Reconstruct the EMA of each relative length sigma_rel from the snapshots a run with the "
        "PostHocEMA callback wrote (<run>/posthoc_ema), by least squares over the snapshots (Karras et al. 2024), "
        "and write one checkpoint per sigma_rel for ddpm sample / evaluate / sampler-sweep --ckpt.",
    )
    parser.add_argument("--run", required=True, type=Path, help="the run folder (or its posthoc_ema folder)")
    parser.add_argument(
        "--sigma-rel", required=True, type=float, nargs="+", help="EMA lengths relative to the run, e.g. 0.05 0.1"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder of the checkpoints (default: the snapshots')")
    parser.add_argument("--step", type=int, default=None, help="the EMA as at this snapshot's step (default: last)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm posthoc-ema --run DIR --sigma-rel S [S ...] [--out DIR] [--step N]``."""
    args = build_parser().parse_args(argv)
    from ddpm_lightning.posthoc import reconstruct_posthoc_ema  # torch only once the command runs

    for path in reconstruct_posthoc_ema(args.run, args.sigma_rel, args.out, args.step):
        print(f"wrote {path}")
    return 0
