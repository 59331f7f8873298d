"""``ddpm ablate``: a grid of ``ddpm fit`` runs over named axes, then one table and one plot.

    ddpm ablate -c configs/ablation/demo.yaml                                  (linear vs cosine, seeds 0 1)
    ddpm ablate -c configs/ablation/demo.yaml --axis objective=eps,v --axis weighting=none,min_snr --seeds 0 1 2
    ddpm ablate -c configs/ablation/demo.yaml --axis model.lr=1e-3,3e-3        (any dotted config key)

Each (settings, seed) is a plain ``ddpm fit`` (:func:`ddpm_lightning.cli.fit.fit`) with the axes' config keys and
``--seed_everything`` set, in its own folder ``OUT/runs/<name>=<value>,...,seed=<seed>``; then
:func:`ddpm_lightning.evaluation.collect` gathers the runs. ``--only`` trains one run and ``--task K`` the K-th of the
grid (a SLURM array task, see scripts/slurm/ablation_array.sbatch); ``--list`` prints the grid.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ddpm_lightning.cli.fit import fit
from ddpm_lightning.diffusion import SCHEDULES
from ddpm_lightning.evaluation.ablation import (
    AXES,
    DEFAULT_AXES,
    collect,
    fit_overrides,
    grid,
    parse_axis,
    parse_run,
    run_dir,
    run_name,
)
from ddpm_lightning.io import write_json
from ddpm_lightning.plots import save_figure, schedule_figure


def run_one(
    out: str | Path, settings: Mapping[str, str] | str, seed: int, fit_args: Sequence[str], position: int | None = None
) -> Path:
    """Train one (settings, seed) with ``ddpm fit FIT_ARGS`` plus the settings; writes ``run.json`` (settings, its
    place in the grid for the table's row order, wall time) into its run folder. A bare string for ``settings`` is a
    schedule."""
    if isinstance(settings, str):
        settings = {"schedule": settings}
    grid({k: [v] for k, v in settings.items()}, [seed])  # validates
    folder = run_dir(out, settings, seed)
    start = time.perf_counter()
    fit([*fit_args, *fit_overrides(settings, seed, folder)])
    info = {"settings": dict(settings), "seed": seed, "position": position}
    write_json({**info, "wall_time_s": time.perf_counter() - start}, folder / "run.json")
    return folder


def collect_all(out: str | Path) -> dict[str, Path]:
    """:func:`collect` the runs in ``out``, plus ``schedules.png`` (the schedules compared); returns the paths."""
    paths = collect(out)
    paths["schedules.png"] = save_figure(schedule_figure(), Path(out) / "schedules.png")
    return paths


def _positions(axes: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each combination's place in the grid (the table's row order)."""
    return {run_name(settings, 0): i for i, (settings, _) in enumerate(grid(axes, [0]))}


def ablate(
    fit_args: Sequence[str],
    *,
    out: str | Path = "results/ablation",
    axes: Mapping[str, Sequence[str]] | None = None,
    seeds: Sequence[int] = (0, 1),
    schedules: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Train every (settings, seed) of the grid one after the other with ``ddpm fit FIT_ARGS`` (e.g.
    ``["-c", "configs/ablation/demo.yaml"]``), then collect them; returns the paths of the table, CSV files and
    figures. ``axes`` maps an axis (:data:`~ddpm_lightning.evaluation.ablation.AXES` or a dotted config key) to its
    values; default: the two schedules. ``schedules`` is the schedule axis alone (the earlier spelling)."""
    if not fit_args:
        raise ValueError("the ablation needs a training config, e.g. -c configs/ablation/demo.yaml")
    axes = dict(axes or ({"schedule": tuple(schedules)} if schedules else DEFAULT_AXES))
    positions = _positions(axes)
    for settings, seed in grid(axes, seeds):
        run_one(out, settings, seed, fit_args, positions[run_name(settings, 0)])
    return collect_all(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm ablate",
        description="Trains every combination of the axes' values for each seed, one after the other, then collects; "
        "any argument not listed below goes to `ddpm fit` unchanged (-c configs/ablation/demo.yaml, "
        "--trainer.max_steps 500, ...).",
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, default=Path("results/ablation"), help="default: results/ablation")
    parser.add_argument(
        "--axis",
        action="append",
        type=parse_axis,
        metavar="NAME=V1,V2",
        help=f"an axis and its values (repeat for a grid): {', '.join(AXES)} or a dotted config key (model.lr); "
        "default: schedule=linear,cosine",
    )
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, help="= --axis schedule=...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--only", help="train one run, e.g. schedule=cosine,seed=1")
    parser.add_argument("--task", type=int, help="train the K-th run of the grid (0-based; a SLURM array task id)")
    parser.add_argument("--list", action="store_true", help="print the grid's runs with their task numbers and stop")
    parser.add_argument("--collect", action="store_true", help="only gather finished runs into the table and plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm ablate [--axis NAME=V,...]... [--seeds 0 1] [--only RUN | --task K | --list | --collect] -c CONFIG``."""
    args, fit_args = build_parser().parse_known_args(argv)
    if sum(bool(x) for x in (args.only, args.task is not None, args.list, args.collect)) > 1:
        raise ValueError("--only, --task, --list and --collect exclude each other")
    if args.axis and args.schedules:
        raise ValueError("give the schedules as --axis schedule=... or --schedules, not both")
    axes = dict(args.axis) if args.axis else ({"schedule": tuple(args.schedules)} if args.schedules else DEFAULT_AXES)
    if args.axis and len(axes) != len(args.axis):
        raise ValueError(f"an axis is given twice: {[name for name, _ in args.axis]}")
    runs = grid(axes, args.seeds)
    positions = _positions(axes)
    if args.list:
        for k, (settings, seed) in enumerate(runs):
            print(f"{k:>4}  {run_name(settings, seed)}")
        print(f"{len(runs)} runs: a SLURM array --array=0-{len(runs) - 1}")
        return 0
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise ValueError(f"--task {args.task} is outside the grid's 0..{len(runs) - 1} (see --list)")
        settings, seed = runs[args.task]
        run_one(args.out, settings, seed, fit_args, positions[run_name(settings, 0)])
        return 0
    if args.only:
        settings, seed = parse_run(args.only)
        run_one(args.out, settings, seed, fit_args, positions.get(run_name(settings, 0)))  # outside the grid: last
        return 0
    paths = collect_all(args.out) if args.collect else ablate(fit_args, out=args.out, axes=axes, seeds=args.seeds)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
