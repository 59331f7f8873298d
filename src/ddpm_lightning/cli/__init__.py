"""The ``ddpm`` command: LightningCLI's fit/validate/test/predict (:mod:`ddpm_lightning.cli.fit`) plus the sampling
and evaluation commands, one thin module each."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from ddpm_lightning.cli import (
    ablate,
    convert,
    evaluate,
    fid_weights,
    guidance_sweep,
    nll,
    posthoc_ema,
    sample,
    sampler_sweep,
)
from ddpm_lightning.cli.fit import run_cli

__all__ = ["COMMANDS", "EXTRA_HELP", "main"]

COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "sample": sample.main,
    "evaluate": evaluate.main,
    "fid-weights": fid_weights.main,
    "ablate": ablate.main,
    "sampler-sweep": sampler_sweep.main,
    "nll": nll.main,
    "guidance-sweep": guidance_sweep.main,
    "convert": convert.main,
    "posthoc-ema": posthoc_ema.main,
}
EXTRA_HELP = """more commands (each takes --help):
  sample         PNG samples and a grid from a checkpoint's EMA weights
  evaluate       FID / IS / KID with torch-fidelity (the paper's protocol)
  fid-weights    prepare the FID Inception weights for an offline machine
  ablate         train and compare the linear and cosine schedules
  sampler-sweep  quality and speed of each sampler against the number of network evaluations
  nll            negative log-likelihood bound in bits/dim (the paper's NLL column)
  guidance-sweep accuracy of the requested class at each guidance scale (class-conditional digits)
  convert        to and from diffusers (UNet2DModel + DDPMScheduler), e.g. the paper's google/ddpm-* weights
  posthoc-ema    sampling checkpoints of any EMA length from a run's post-hoc EMA snapshots (Karras et al. 2024)
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
        run_cli(None if from_console else argv)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        if os.environ.get("DDPM_TRACEBACK"):
            raise
        print(f"ddpm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
