"""The ``ddpm`` command: LightningCLI's fit/validate/test/predict plus sampling and evaluation commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from ddpm_lightning.ablation import ablate_main
from ddpm_lightning.diffusion import SAMPLERS, SPACINGS
from ddpm_lightning.evaluate import evaluate_main
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.metrics.inception_weights import fid_weights_main
from ddpm_lightning.sampler_sweep import sampler_sweep_main
from ddpm_lightning.tracking import (
    LogRunConfig,
    finish_wandb_run,
    follow_run_dir,
    resume_wandb_run,
    tracking_callbacks,
)
from ddpm_lightning.training import checkpoints_in_run_dir, resolve_ckpt_path, use_atomic_checkpoints


class DDPMCLI(LightningCLI):
    """LightningCLI over :class:`DiffusionModule` and any LightningDataModule (``data.class_path``)."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        # loggers write into the run folder (trainer.default_root_dir); a resumed fit continues its W&B run
        follow_run_dir(config.trainer)
        # checkpoints in <run dir>/checkpoints, so `--ckpt_path last` finds the previous run's last.ckpt
        checkpoints_in_run_dir(config.trainer)
        if self.subcommand == "fit":
            config.ckpt_path = resolve_ckpt_path(config.trainer, config.get("ckpt_path"))
            resume_wandb_run(config.trainer, config.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


def _lightning_main(argv: Sequence[str] | None) -> None:
    """LightningCLI on ``argv``; None: on ``sys.argv`` (the console script), which LightningCLI reads itself."""
    try:
        DDPMCLI(
            DiffusionModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            args=None if argv is None else list(argv),
            save_config_callback=LogRunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": tracking_callbacks()},
            auto_configure_optimizers=False,
        )
    finally:
        finish_wandb_run()


def sample_main(argv: Sequence[str] | None = None) -> int:
    """``ddpm sample --ckpt PATH --num N --out DIR [--seed S] [--sampler NAME --steps NFE]``: PNG files and a grid
    from the EMA weights."""
    from ddpm_lightning.sampling import sample_to_folder

    parser = argparse.ArgumentParser(prog="ddpm sample", description=sample_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i (default 0)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help="network evaluations (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument(
        "--spacing", choices=SPACINGS, default=None, help="of the timesteps (default: the checkpoint's)"
    )
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
        spacing=args.spacing,
    )
    print(f"wrote {args.num} samples to {args.out} and the grid {grid}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "sample": sample_main,
    "evaluate": evaluate_main,
    "fid-weights": fid_weights_main,
    "ablate": ablate_main,
    "sampler-sweep": sampler_sweep_main,
}
EXTRA_HELP = """more commands (each takes --help):
  sample         PNG samples and a grid from a checkpoint's EMA weights
  evaluate       FID / IS / KID with torch-fidelity (the paper's protocol)
  fid-weights    prepare the FID Inception weights for an offline machine
  ablate         train and compare the linear and cosine schedules
  sampler-sweep  quality and speed of each sampler against the number of network evaluations
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ddpm`` console script.

    Bad input (a missing data set, a bad setting, an unreadable checkpoint) ends with a one-paragraph error and exit
    status 2; set ``DDPM_TRACEBACK=1`` to see the full traceback instead.
    """
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            raise SystemExit(COMMANDS[argv[0]](argv[1:]))
        if not argv or argv[0] in ("-h", "--help"):
            print(EXTRA_HELP)
        _lightning_main(None if from_console else argv)
    except (FileNotFoundError, ValueError) as err:
        if os.environ.get("DDPM_TRACEBACK"):
            raise
        print(f"ddpm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
