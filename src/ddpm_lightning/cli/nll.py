"""``ddpm nll --ckpt PATH [--data digits|cifar10|FOLDER] [--split test] [--num N] [--t-samples K]``: the variational
bound in bits/dim (Ho et al. 2020, Table 1's NLL column), printed and written as JSON (default: beside the checkpoint,
``last.ckpt`` -> ``last.nll.json``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_lightning.choices import EVAL_DATASETS as DATASETS

if TYPE_CHECKING:
    from ddpm_lightning.evaluation.nll import NLLSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm nll",
        description="Negative log-likelihood bound in bits/dim of a checkpoint's EMA model on real images, with its "
        "standard error and the terms L_T (prior), L_0 (decoder) and L_1..L_{T-1} (rest).",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `ddpm fit`")
    parser.add_argument(
        "--data",
        default="digits",
        help=f"data set: {', '.join(DATASETS)} or a folder of PNG/JPEG/WebP images (default digits)",
    )
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default data)")
    parser.add_argument(
        "--split",
        choices=("train", "test", "all"),
        default="test",
        help="default test; a folder's test split is the images its training held out (all: every image)",
    )
    parser.add_argument("--num", type=int, default=256, help="first N images of the split (default 256; 0: all)")
    parser.add_argument(
        "--t-samples",
        type=int,
        default=None,
        help="estimate the sum over t without bias from K timesteps per image (default: the full sum, T network "
        "evaluations per image)",
    )
    parser.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] in the bound")
    parser.add_argument(
        "--off-grid",
        choices=("quantize", "refuse"),
        default="quantize",
        help="data not on the 8-bit grid: round it to the grid (default, reported) or refuse",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="image i is seeded by seed + i (default 0)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default: beside the checkpoint, last.ckpt: last.nll.json)"
    )
    return parser


def spec_of(args: argparse.Namespace) -> NLLSpec:
    """The bound the parsed command line asks for, its report beside the checkpoint unless ``--out`` says where."""
    from ddpm_lightning.evaluation.nll import NLLSpec

    fields = vars(args) | {"num": args.num or None, "progress": True}
    fields |= {"clip_denoised": not fields.pop("no_clip"), "out": args.out or args.ckpt.with_suffix(".nll.json")}
    return NLLSpec(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    spec = spec_of(build_parser().parse_args(argv))
    from ddpm_lightning.checkpoint import check_checkpoint_file
    from ddpm_lightning.evaluation.nll import nll
    from ddpm_lightning.io import check_output

    # every input before the first network evaluation: the checkpoint, the report's folder (the data are read
    # before the bound is computed)
    check_checkpoint_file(spec.ckpt, "--ckpt")
    check_output(spec.out, "--out")

    report = nll(spec)
    if report["quantized"]:
        print(
            f"note: the {spec.data} images were not on the 8-bit grid (up to {report['off_grid_levels']:.3f} levels "
            "off) and were quantized to it"
        )
    terms = ", ".join(f"{name} {v['bpd']:.4f}" for name, v in report["terms"].items())
    print(
        f"NLL <= {report['bpd']:.4f} +- {report['stderr']:.4f} bits/dim ({report['estimate']}; "
        f"{report['num_images']} {spec.data} {spec.split} images; clip x0: {report['clip_denoised']})"
    )
    print(f"terms (bits/dim): {terms}")
    if report["num_classes"] is not None:
        print(f"a class-conditional model: the bound of the likelihood {report['likelihood']}")
    print(f"wrote {spec.out}")
    return 0
