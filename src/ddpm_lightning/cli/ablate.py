"""``ddpm ablate``: a grid of ``ddpm fit`` runs over named axes, then one table and one plot.

    ddpm ablate -c configs/demo.yaml -c configs/ablation/demo.yaml                (linear vs cosine, seeds 0 1)
    ddpm ablate -c configs/demo.yaml -c configs/ablation/demo.yaml --axis objective=eps,v --seeds 0 1 2
    ddpm ablate -c configs/demo.yaml -c configs/ablation/demo.yaml --axis model.lr=1e-3,3e-3   (any config key)
    ddpm ablate -c configs/demo.yaml -c configs/ablation/demo.yaml --budget-seconds 120  (equal training time)
    ddpm ablate --submit --seeds 0 1 2 -c configs/cifar10.yaml ...             (a SLURM array of the grid's size)

Each (settings, seed) is a plain ``ddpm fit`` (:func:`ddpm_lightning.cli.fit.fit`) with the axes' config keys and
``--seed_everything`` set, in its own folder ``OUT/runs/<name>=<value>,...,seed=<seed>``; then
:func:`ddpm_lightning.evaluation.collect` gathers the runs. ``--only`` trains one run and ``--task K`` the K-th of the
grid (a SLURM array task, see scripts/slurm/ablation_array.sbatch); ``--list`` prints the grid; ``--submit``
writes the manifest and submits the array with ``--array=0-(N-1)`` for the grid's N runs, then a collect job.
``--budget-seconds S`` gives every run S seconds of its own training steps (:class:`TrainingBudget`, timed inside
the run's fit) instead of the config's step count. Launching writes ``OUT/manifest.json``, so that ``--collect``
names the runs that are missing (an error; ``--allow-missing`` lists them under the table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ddpm_lightning.callbacks.budget import TrainingBudget
from ddpm_lightning.cli.fit import fit
from ddpm_lightning.diffusion import SCHEDULES
from ddpm_lightning.evaluation.ablation import (
    AXES,
    DEFAULT_AXES,
    CollectSpec,
    collect,
    fit_overrides,
    grid,
    missing_runs,
    parse_axis,
    parse_run,
    run_dir,
    run_name,
    write_manifest,
)
from ddpm_lightning.io import check_output, write_json
from ddpm_lightning.plots import save_figure, schedule_figure

SBATCH_SCRIPT = Path("scripts/slurm/ablation_array.sbatch")


def budget_overrides(seconds: float) -> list[str]:
    """The ``ddpm fit`` arguments of a run on a training-time budget: no step or time limit of the config's, and a
    :class:`TrainingBudget` that sets the steps from the run's own measured rate."""
    TrainingBudget(seconds)  # validates
    callback = {"class_path": f"{TrainingBudget.__module__}.TrainingBudget", "init_args": {"seconds": seconds}}
    return ["--trainer.max_steps", "-1", "--trainer.max_time", "null", f"--trainer.callbacks+={json.dumps(callback)}"]


def run_one(
    out: str | Path,
    settings: Mapping[str, str] | str,
    seed: int,
    fit_args: Sequence[str],
    position: int | None = None,
    budget_seconds: float | None = None,
) -> Path:
    """Train one (settings, seed) with ``ddpm fit FIT_ARGS`` plus the settings (and, with ``budget_seconds``, that
    many seconds of training steps); writes ``run.json`` (settings, its place in the grid for the table's row order,
    wall time) into its run folder. A bare string for ``settings`` is a schedule."""
    if isinstance(settings, str):
        settings = {"schedule": settings}
    grid({k: [v] for k, v in settings.items()}, [seed])  # validates
    folder = run_dir(out, settings, seed)
    budget = budget_overrides(budget_seconds) if budget_seconds is not None else []
    start = time.perf_counter()
    fit([*fit_args, *fit_overrides(settings, seed, folder), *budget])
    info = {"settings": dict(settings), "seed": seed, "position": position}
    write_json({**info, "wall_time_s": time.perf_counter() - start}, folder / "run.json")
    return folder


def collect_all(spec: CollectSpec) -> dict[str, Path]:
    """:func:`collect` the runs of ``spec``, plus ``schedules.png`` (the schedules compared); returns the paths."""
    paths = collect(spec)
    paths["schedules.png"] = save_figure(schedule_figure(), spec.dest / "schedules.png")
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
    budget_seconds: float | None = None,
) -> dict[str, Path]:
    """Train every (settings, seed) of the grid one after the other with ``ddpm fit FIT_ARGS`` (e.g.
    ``["-c", "configs/ablation/demo.yaml"]``), then collect them; returns the paths of the table, CSV files and
    figures. ``axes`` maps an axis (:data:`~ddpm_lightning.evaluation.ablation.AXES` or a dotted config key) to its
    values; default: the two schedules. ``schedules`` is the schedule axis alone (the earlier spelling).
    ``budget_seconds``: every run trains for that many seconds of its own steps (equal time) instead of the
    config's step count."""
    if not fit_args:
        raise ValueError(
            "the ablation needs a training config, e.g. -c configs/demo.yaml -c configs/ablation/demo.yaml"
        )
    axes = dict(axes or ({"schedule": tuple(schedules)} if schedules else DEFAULT_AXES))
    positions = _positions(axes)
    write_manifest(out, axes, seeds, fit_args, budget_seconds)
    for settings, seed in grid(axes, seeds):
        run_one(out, settings, seed, fit_args, positions[run_name(settings, 0)], budget_seconds)
    return collect_all(CollectSpec(Path(out)))


def submit(
    ablate_args: Sequence[str], num_runs: int, out: str | Path, script: str | Path = SBATCH_SCRIPT
) -> tuple[str, str]:
    """Submit the grid as one SLURM array of ``num_runs`` tasks (``--array=0-(N-1)``), each running
    ``ddpm ablate --task $SLURM_ARRAY_TASK_ID ABLATE_ARGS``, and a collect job after it (after every task, finished
    or not, so that it names the missing runs); returns the two job ids."""
    if not Path(script).is_file():
        raise FileNotFoundError(f"the array script {script} does not exist: submit from the repository root")

    def sbatch(*args: str) -> str:
        try:
            done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise FileNotFoundError("sbatch is not on PATH: --submit runs on a SLURM login node") from None
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"sbatch failed ({err.returncode}): {err.stderr.strip()}") from None
        return done.stdout.strip().split(";")[0]

    array = sbatch(f"--array=0-{num_runs - 1}", str(script), *ablate_args)
    collect_job = sbatch(
        f"--dependency=afterany:{array}",
        "--job-name=ddpm-ablation-collect",
        f"--output={Path(out) / 'collect-%j.out'}",
        "--wrap",
        f"ddpm ablate --collect --out {shlex.quote(str(out))}",
    )
    return array, collect_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm ablate",
        description="Trains every combination of the axes' values for each seed, one after the other, then collects; "
        "any argument not listed below goes to `ddpm fit` unchanged "
        "(-c configs/demo.yaml -c configs/ablation/demo.yaml, "
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
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="with --collect: a table of the finished runs that lists the manifest's missing ones (default: an error)",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        metavar="S",
        help="equal training time: each run trains for S seconds of its own steps (rate measured inside its fit after "
        "a warm-up) instead of the config's max_steps; the table gives the steps each made",
    )
    parser.add_argument(
        "--submit",
        action="store_true",
        help="write the manifest and submit the grid as a SLURM array of its size, then a collect job",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm ablate [--axis NAME=V,...]... [--seeds 0 1] [--only RUN | --task K | --list | --collect] -c CONFIG``."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    args, fit_args = build_parser().parse_known_args(argv)
    if sum(bool(x) for x in (args.only, args.task is not None, args.list, args.collect, args.submit)) > 1:
        raise ValueError("--only, --task, --list, --collect and --submit exclude each other")
    if args.allow_missing and not args.collect:
        raise ValueError("--allow-missing goes with --collect")
    if args.budget_seconds is not None:
        TrainingBudget(args.budget_seconds)  # validates
    if args.axis and args.schedules:
        raise ValueError("give the schedules as --axis schedule=... or --schedules, not both")
    axes = dict(args.axis) if args.axis else ({"schedule": tuple(args.schedules)} if args.schedules else DEFAULT_AXES)
    if args.axis and len(axes) != len(args.axis):
        raise ValueError(f"an axis is given twice: {[name for name, _ in args.axis]}")
    runs = grid(axes, args.seeds)
    positions = _positions(axes)
    if args.collect and not args.out.is_dir():
        raise FileNotFoundError(f"--out {args.out} is not a folder: collect the folder the runs were launched into")
    if not args.list:
        check_output(args.out, "--out", folder=True)  # before the first run trains
    if args.list:
        for k, (settings, seed) in enumerate(runs):
            print(f"{k:>4}  {run_name(settings, seed)}")
        print(f"{len(runs)} runs: a SLURM array --array=0-{len(runs) - 1} (ddpm ablate --submit sets it)")
        return 0
    if args.submit:
        write_manifest(args.out, axes, args.seeds, fit_args, args.budget_seconds)
        array, collect_job = submit([a for a in argv if a != "--submit"], len(runs), args.out)
        print(f"submitted {len(runs)} runs as array job {array} (--array=0-{len(runs) - 1}), collect job {collect_job}")
        return 0
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise ValueError(f"--task {args.task} is outside the grid's 0..{len(runs) - 1} (see --list)")
        settings, seed = runs[args.task]
        write_manifest(args.out, axes, args.seeds, fit_args, args.budget_seconds)  # refuses another grid's folder
        run_one(args.out, settings, seed, fit_args, positions[run_name(settings, 0)], args.budget_seconds)
        return 0
    if args.only:
        settings, seed = parse_run(args.only)
        position = positions.get(run_name(settings, 0))  # outside the grid: last
        run_one(args.out, settings, seed, fit_args, position, args.budget_seconds)
        return 0
    # the grid the command names (its axes given), for a folder of --only runs without a manifest
    expected = [run_name(settings, seed) for settings, seed in runs] if args.axis or args.schedules else []
    if args.collect:
        paths = collect_all(CollectSpec(args.out, allow_missing=args.allow_missing, expected=expected))
    else:
        paths = ablate(fit_args, out=args.out, axes=axes, seeds=args.seeds, budget_seconds=args.budget_seconds)
    missing = missing_runs(args.out, expected)
    if missing:
        print(f"missing runs (listed under the table): {', '.join(missing)}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
