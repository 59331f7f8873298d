"""``ddpm nll --ckpt PATH [--data digits|cifar10|FOLDER] [--split test] [--num N] [--t-samples K]``: the variational
bound in bits/dim (Ho et al. 2020, Table 1's NLL column), printed and written as JSON (default: beside the checkpoint,
``last.ckpt`` -> ``last.nll.json``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ddpm_lightning.choices import EVAL_DATASETS as DATASETS


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data not in DATASETS and not Path(args.data).expanduser().is_dir():
        raise ValueError(f"--data {args.data!r} is neither {' nor '.join(DATASETS)} nor a folder of images")
    if args.split == "all" and args.data in DATASETS:
        raise ValueError(f"--split all is for a folder of images; {args.data} has: train, test")
    out = args.out if args.out is not None else args.ckpt.with_suffix(".nll.json")
    from ddpm_lightning.checkpoint import check_checkpoint_file
    from ddpm_lightning.evaluation.nll import nll
    from ddpm_lightning.io import check_output, write_json

    # every input before the first network evaluation: the checkpoint, the report's folder (the data are read
    # before the bound is computed)
    check_checkpoint_file(args.ckpt, "--ckpt")
    check_output(out, "--out")

    report = nll(
        args.ckpt,
        data=args.data,
        data_dir=args.data_dir,
        split=args.split,
        num=args.num or None,
        t_samples=args.t_samples,
        clip_denoised=not args.no_clip,
        off_grid=args.off_grid,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    if report["quantized"]:
        print(
            f"note: the {args.data} images were not on the 8-bit grid (up to {report['off_grid_levels']:.3f} levels "
            "off) and were quantized to it"
        )
    terms = ", ".join(f"{name} {v['bpd']:.4f}" for name, v in report["terms"].items())
    print(
        f"NLL <= {report['bpd']:.4f} +- {report['stderr']:.4f} bits/dim ({report['estimate']}; "
        f"{report['num_images']} {args.data} {args.split} images; clip x0: {report['clip_denoised']})"
    )
    print(f"terms (bits/dim): {terms}")
    if report["num_classes"] is not None:
        print(f"a class-conditional model: the bound of the likelihood {report['likelihood']}")
    write_json(report, out)
    print(f"wrote {out}")
    return 0
