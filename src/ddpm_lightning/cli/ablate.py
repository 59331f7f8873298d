"""``ddpm ablate``: the same model trained with the linear and the cosine schedule, then one table and one plot.

Each (schedule, seed) is a plain ``ddpm fit`` (:func:`ddpm_lightning.cli.fit.fit`) with ``--model.schedule`` and
``--seed_everything`` set, in its own run folder ``OUT/runs/<schedule>-seed<seed>`` (with a CSV logger, see
configs/ablation/); :func:`ddpm_lightning.evaluation.collect` then gathers the runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from ddpm_lightning.cli.fit import fit
from ddpm_lightning.diffusion import SCHEDULES
from ddpm_lightning.evaluation.ablation import collect, run_dir
from ddpm_lightning.io import write_json
from ddpm_lightning.plots import save_figure, schedule_figure


def run_one(out: str | Path, schedule: str, seed: int, fit_args: Sequence[str]) -> Path:
    """Train one (schedule, seed) with ``ddpm fit FIT_ARGS``; writes ``run.json`` (wall time) into its run folder."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    folder = run_dir(out, schedule, seed)
    start = time.perf_counter()
    fit(
        [
            *fit_args,
            "--model.schedule",
            schedule,
            "--seed_everything",
            str(seed),
            "--trainer.default_root_dir",
            str(folder),
        ]
    )
    write_json({"schedule": schedule, "seed": seed, "wall_time_s": time.perf_counter() - start}, folder / "run.json")
    return folder


def collect_all(out: str | Path) -> dict[str, Path]:
    """:func:`collect` the runs in ``out``, plus ``schedules.png`` (the schedules compared); returns the paths."""
    paths = collect(out)
    paths["schedules.png"] = save_figure(schedule_figure(), Path(out) / "schedules.png")
    return paths


def ablate(
    fit_args: Sequence[str],
    *,
    out: str | Path = "results/ablation",
    schedules: Sequence[str] = SCHEDULES,
    seeds: Sequence[int] = (0, 1),
) -> dict[str, Path]:
    """Train every (schedule, seed) one after the other with ``ddpm fit FIT_ARGS`` (e.g.
    ``["-c", "configs/ablation/demo.yaml"]``), then collect them; returns the paths of the table, CSV files and
    figures."""
    if not fit_args:
        raise ValueError("the ablation needs a training config, e.g. -c configs/ablation/demo.yaml")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise ValueError(f"unknown schedules {unknown}; allowed: {', '.join(SCHEDULES)}")
    for seed in seeds:
        for schedule in schedules:
            run_one(out, schedule, seed, fit_args)
    return collect_all(out)


def _parse_only(text: str) -> tuple[str, int]:
    """``schedule=cosine,seed=1`` -> ("cosine", 1)."""
    try:
        fields = dict(item.split("=", 1) for item in text.split(","))
        schedule, seed = fields.pop("schedule"), int(fields.pop("seed"))
    except (KeyError, ValueError) as err:
        raise ValueError(f"--only expects 'schedule=<{'|'.join(SCHEDULES)}>,seed=<int>', got {text!r}") from err
    if fields:
        raise ValueError(f"--only takes the keys schedule and seed, got also {sorted(fields)}")
    return schedule, seed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm ablate",
        description="Trains every (schedule, seed) one after the other and collects; any argument not listed below "
        "goes to `ddpm fit` unchanged (-c configs/ablation/demo.yaml, --trainer.max_steps 500, ...).",
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, default=Path("results/ablation"), help="default: results/ablation")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--only", help="train one run, e.g. schedule=cosine,seed=1 (a SLURM array task)")
    parser.add_argument("--collect", action="store_true", help="only gather finished runs into the table and plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ddpm ablate [--seeds 0 1] [--only schedule=S,seed=N | --collect] -c CONFIG ...``."""
    args, fit_args = build_parser().parse_known_args(argv)
    if args.only and args.collect:
        raise ValueError("--only and --collect exclude each other: train one run, or collect them all")
    if args.only:
        run_one(args.out, *_parse_only(args.only), fit_args)
        return 0
    if args.collect:
        paths = collect_all(args.out)
    else:
        paths = ablate(fit_args, out=args.out, schedules=args.schedules, seeds=args.seeds)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
