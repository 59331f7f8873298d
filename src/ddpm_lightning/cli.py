"""The ``ddpm`` command: LightningCLI's fit/validate/test/predict plus sampling and evaluation commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from ddpm_lightning.lit_module import DiffusionModule


class DDPMCLI(LightningCLI):
    """LightningCLI over :class:`DiffusionModule` and any LightningDataModule (``data.class_path``)."""


def _lightning_main(argv: Sequence[str]) -> None:
    DDPMCLI(
        DiffusionModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=list(argv),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def sample_main(argv: Sequence[str] | None = None) -> int:
    """``ddpm sample --ckpt PATH --num N --out DIR [--seed S]``: PNG files and a grid from the EMA weights."""
    from ddpm_lightning.sampling import sample_to_folder

    parser = argparse.ArgumentParser(prog="ddpm sample", description=sample_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    grid = sample_to_folder(
        args.ckpt,
        args.out,
        num=args.num,
        seed=args.seed,
        sampler=args.sampler,
        num_steps=args.steps,
        eta=args.eta,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"wrote {args.num} samples to {args.out} and the grid {grid}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {"sample": sample_main}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ddpm`` console script.

    Bad input (a missing data set, a bad setting, an unreadable checkpoint) ends with a one-paragraph error and exit
    status 2; set ``DDPM_TRACEBACK=1`` to see the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            raise SystemExit(COMMANDS[argv[0]](argv[1:]))
        _lightning_main(argv)
    except (FileNotFoundError, ValueError) as err:
        if os.environ.get("DDPM_TRACEBACK"):
            raise
        print(f"ddpm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
