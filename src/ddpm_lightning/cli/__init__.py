"""The ``ddpm`` command: LightningCLI's fit/validate/test/predict (:mod:`ddpm_lightning.cli.fit`) plus the sampling
and evaluation commands, one thin module each.

Nothing heavy is imported here: a command's module (and with it torch) is imported only when that command runs, so
``ddpm --help`` and a project command's ``--help`` answer at once.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["COMMANDS", "EXTRA_HELP", "LIGHTNING_COMMANDS", "SYNONYMS", "format_warning", "is_first_process", "main"]

# name -> (module with ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("ddpm_lightning.cli.sample", "PNG samples and a grid from a checkpoint's EMA weights"),
    "evaluate": ("ddpm_lightning.cli.evaluate", "FID / IS / KID with torch-fidelity (the paper's protocol)"),
    "fid-weights": ("ddpm_lightning.cli.fid_weights", "prepare the FID Inception weights for an offline machine"),
    "ablate": ("ddpm_lightning.cli.ablate", "train a grid of settings (schedules, losses, ...) and compare them"),
    "sampler-sweep": (
        "ddpm_lightning.cli.sampler_sweep",
        "quality and speed of each sampler against the number of network evaluations",
    ),
    "nll": ("ddpm_lightning.cli.nll", "negative log-likelihood bound in bits/dim (the paper's NLL column)"),
    "guidance-sweep": (
        "ddpm_lightning.cli.guidance_sweep",
        "accuracy of the requested class at each guidance scale (class-conditional digits)",
    ),
    "convert": (
        "ddpm_lightning.cli.convert",
        "to and from diffusers (UNet2DModel + DDPMScheduler), e.g. the paper's google/ddpm-* weights",
    ),
    "posthoc-ema": (
        "ddpm_lightning.cli.posthoc_ema",
        "sampling checkpoints of any EMA length from a run's post-hoc EMA snapshots (Karras et al. 2024)",
    ),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
#: words a user may type for a command, e.g. ``ddpm train`` (or ``ddpm trian``): "did you mean fit?"
SYNONYMS = {"train": "fit", "generate": "sample", "fid": "evaluate", "eval": "evaluate"}
EXTRA_HELP = (
    "usage: ddpm COMMAND [--help] | ddpm --version\n\n"
    "commands (each takes --help):\n"
    "  fit            train (LightningCLI; also validate, test, predict): see `ddpm fit --help`\n"
    + "".join(f"  {name:<14} {text}\n" for name, (_, text) in COMMANDS.items())
)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_format_warning = warnings.formatwarning


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning of this package's own code as ``warning: MESSAGE`` (its source file means nothing to the user of a
    command); any other as Python shows it."""
    if os.path.abspath(filename).startswith(_PACKAGE + os.sep):
        return f"warning: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ddpm`` console script.

    Bad input (a missing data set, a bad setting, an unreadable checkpoint) ends with a one-paragraph error and exit
    status 2; set ``DDPM_TRACEBACK=1`` to see the full traceback instead. The package's own warnings are shown as
    ``warning: MESSAGE`` (:func:`format_warning`). In a run of several processes (DDP) only the first prints the
    error: each process stops with the same one.
    """
    previous = warnings.formatwarning, warnings.showwarning
    warnings.formatwarning = format_warning
    warnings.showwarning = _show_warning(previous[1])
    try:
        _main(argv)
    finally:
        warnings.formatwarning, warnings.showwarning = previous


def _show_warning(show: Any) -> Any:
    """``show`` (a ``warnings.showwarning``), but this package's own warnings as :func:`format_warning` writes them
    whatever ``warnings.formatwarning`` is by then (Lightning replaces it when imported)."""

    def show_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not os.path.abspath(filename).startswith(_PACKAGE + os.sep):
            return show(message, category, filename, lineno, file, line)
        current = warnings.formatwarning
        warnings.formatwarning = format_warning
        try:
            return show(message, category, filename, lineno, file, line)
        finally:
            warnings.formatwarning = current

    return show_warning


def is_first_process() -> bool:
    """Whether this is the first process of a run (rank 0 of ``RANK``, ``SLURM_PROCID``, ``NODE_RANK`` and
    ``LOCAL_RANK``, as torchrun, SLURM and Lightning's launcher set them), or a run of one process."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def _main(argv: Sequence[str] | None) -> None:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(EXTRA_HELP, end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from ddpm_lightning import __version__

        print(f"ddpm-lightning {__version__}")
        raise SystemExit(0)
    known = (*LIGHTNING_COMMANDS, *COMMANDS)
    if argv[0] not in known and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], [*known, *SYNONYMS], n=1)
        command = SYNONYMS.get(close[0], close[0]) if close else None
        hint = f"did you mean {command}?" if command else "`ddpm --help` lists the commands"
        print(f"ddpm: error: unknown command {argv[0]!r}: {hint}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if argv[0] in COMMANDS:
            command = importlib.import_module(COMMANDS[argv[0]][0])
            raise SystemExit(command.main(argv[1:]))
        from ddpm_lightning.cli.fit import run_cli

        run_cli(None if from_console else argv)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        if os.environ.get("DDPM_TRACEBACK"):
            raise
        message = str(err)
        if "Union subtypes" in message:  # jsonargparse's dump when a configured class fails: its one reason
            from ddpm_lightning.cli.config_errors import one_line

            message = one_line(message)
        if is_first_process():  # the other processes of a DDP run stop with the same error
            print(f"ddpm: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
