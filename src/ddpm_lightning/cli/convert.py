"""``ddpm convert (--from-diffusers DIR_OR_HUB_ID | --to-diffusers CKPT) --out PATH``: the U-Net and schedule to and
from diffusers' ``UNet2DModel`` + ``DDPMScheduler`` (needs ``pip install diffusers``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ddpm_lightning.choices import SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm convert",
        description="Convert a diffusers DDPM (UNet2DModel + DDPMScheduler, e.g. google/ddpm-cifar10-32) into a "
        "checkpoint for ddpm sample / evaluate / nll / fit --init_from, or a checkpoint into a DDPMPipeline folder.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-diffusers",
        metavar="DIR_OR_HUB_ID",
        help="a save_pretrained or pipeline folder, or a hub id (fetched only when given, and online)",
    )
    source.add_argument("--to-diffusers", metavar="CKPT", type=Path, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--out", required=True, type=Path, help="the checkpoint, or the pipeline folder, to write")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="the checkpoint's default sampler")
    parser.add_argument(
        "--variance",
        choices=("fixed_large", "fixed_small"),
        default=None,
        help="replace the scheduler's fixed variance (default: the scheduler's; the paper's CIFAR-10 FID: fixed_large)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm convert --from-diffusers DIR_OR_HUB_ID --out model.ckpt`` or ``--to-diffusers CKPT --out DIR``."""
    from ddpm_lightning.legacy import upgrade_convert_argv

    args = build_parser().parse_args(upgrade_convert_argv(sys.argv[1:] if argv is None else argv))
    from ddpm_lightning.interop.diffusers import from_diffusers, to_diffusers

    try:
        if args.from_diffusers is not None:
            module = from_diffusers(args.from_diffusers, args.out, sampler=args.sampler, variance=args.variance)
            hp, size = module.hparams, sum(p.numel() for p in module.net.parameters())
            print(
                f"wrote {args.out}: {size:,} parameters, T={hp.num_timesteps} {module.schedule.name} betas, variance "
                f"{hp.variance}, objective {hp.objective}"
            )
        else:
            to_diffusers(args.to_diffusers, args.out)
            print(f"wrote the DDPMPipeline folder {args.out}")
    except ImportError as err:
        print(f"ddpm convert: error: {err}", file=sys.stderr)
        return 2
    return 0
