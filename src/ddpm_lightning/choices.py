"""The names a command line or a config offers (samplers, spacings, schedules, ...), as plain tuples with no torch
import, written once: the library's ``Literal`` types are made of them (``Literal[choices.VARIANCES]``). Also the
options several commands share.

Command parsers take their choices from here so that ``--help`` answers without importing torch;
``tests/test_choices.py`` checks these names against the library's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "heun")
SPACINGS = ("uniform", "quadratic", "karras")
SCHEDULES = ("linear", "cosine")
VARIANCES = ("fixed_large", "fixed_small", "learned_range", "learned")
OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr", "learned")
LOSS_TYPES = ("simple", "vlb")
NOISE_ASSIGNMENTS = ("random", "immiscible")
NONFINITE_LOSSES = ("stop", "skip")
MATMUL_PRECISIONS = ("highest", "high", "medium")
METRICS = ("fid", "isc", "kid")
EVAL_DATASETS = ("cifar10", "digits")
PAPER_NUM_SAMPLES = 50_000
SWEEP_SETTINGS = ("ddpm", "ddim", "ddim_quadratic", "dpmpp_2m", "heun")
SWEEP_STEPS = (1000, 250, 100, 50, 20, 10)
SWEEP_DATASETS = ("auto", "digits", "cifar10")
GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0)
FID_WEIGHTS_SOURCES = ("auto", "cache", "fid-helper")
FID_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"


def add_autoguidance_arguments(parser: argparse.ArgumentParser, default: float | None = None) -> None:
    """``--guide-ckpt`` and ``--autoguidance-scale``, the same in every command that samples."""
    parser.add_argument(
        "--guide-ckpt",
        type=Path,
        default=None,
        help="autoguidance: a weaker checkpoint of the same process (an early one of the run, or a smaller network)",
    )
    parser.add_argument(
        "--autoguidance-scale", type=float, default=default, help="autoguidance weight w (1: none; needs --guide-ckpt)"
    )


#: ``--steps`` of the commands that sample
STEPS_HELP = (
    "sampler steps (default: the checkpoint's): one network evaluation each for ddpm, ddim and dpmpp_2m; heun makes "
    "2N - 1 evaluations for N steps"
)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the option (``--num``) of the first of ``names`` whose value is set and below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
