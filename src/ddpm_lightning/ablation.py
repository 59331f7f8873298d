"""``ddpm ablate``: the same model trained with the linear and the cosine schedule, then one table and one plot.

Each (schedule, seed) is a plain ``ddpm fit`` with ``--model.schedule`` and ``--seed_everything`` set, in its own run
folder ``OUT/runs/<schedule>-seed<seed>`` (with a CSV logger, see configs/ablation/). :func:`collect` reads the
runs' ``metrics.csv`` and ``run.json`` and writes ``OUT/table.md``, ``table.csv``, ``runs.csv`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpm_lightning.diffusion import SCHEDULES

LOSS_KEY, VAL_LOSS_KEY, FID_KEY = "train/loss", "val/loss", "val/fid"
FINAL_FRACTION = 0.1  # "final loss" = mean train/loss over the last 10% of logged steps (single steps are noisy)


def run_dir(out: str | Path, schedule: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{schedule}-seed{seed}"


def run_one(out: str | Path, schedule: str, seed: int, fit_args: Sequence[str]) -> Path:
    """Train one (schedule, seed) with ``ddpm fit FIT_ARGS``; writes ``run.json`` (wall time) into its run folder."""
    from ddpm_lightning.cli import main

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    folder = run_dir(out, schedule, seed)
    start = time.perf_counter()
    main(
        [
            "fit",
            *fit_args,
            "--model.schedule",
            schedule,
            "--seed_everything",
            str(seed),
            "--trainer.default_root_dir",
            str(folder),
        ]
    )
    info = {"schedule": schedule, "seed": seed, "wall_time_s": time.perf_counter() - start}
    (folder / "run.json").write_text(json.dumps(info, indent=1))
    return folder


def read_metrics(folder: Path) -> dict[str, Any]:
    """Loss and FID curves of one run folder, from its newest ``metrics.csv`` (CSVLogger)."""
    files = sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {folder}: the ablation runs need a CSVLogger")
    series: dict[str, tuple[list[int], list[float]]] = {key: ([], []) for key in (LOSS_KEY, VAL_LOSS_KEY, FID_KEY)}
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key, (steps, values) in series.items():
                if row.get(key):
                    steps.append(int(row["step"]))
                    values.append(float(row[key]))
    info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    return {
        "loss_steps": series[LOSS_KEY][0],
        "loss": series[LOSS_KEY][1],
        "val_loss": series[VAL_LOSS_KEY][1],
        "fid_steps": series[FID_KEY][0],
        "fid": series[FID_KEY][1],
        "wall_time_s": info.get("wall_time_s", math.nan),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """Every run in ``OUT/runs/<schedule>-seed<seed>``: its curves (:func:`read_metrics`), final losses and steps."""
    out = Path(out)
    folders = sorted(p for p in (out / "runs").glob("*-seed*") if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no ablation runs in {out / 'runs'}; run `ddpm ablate` first")
    runs = []
    for folder in folders:
        schedule, seed = folder.name.rsplit("-seed", 1)
        metrics = read_metrics(folder)
        tail = max(1, math.ceil(FINAL_FRACTION * len(metrics["loss"])))
        runs.append(
            {
                "schedule": schedule,
                "seed": int(seed),
                "steps": metrics["loss_steps"][-1] + 1 if metrics["loss_steps"] else 0,
                "final_loss": sum(metrics["loss"][-tail:]) / tail if metrics["loss"] else math.nan,
                "final_val_loss": metrics["val_loss"][-1] if metrics["val_loss"] else math.nan,
                **metrics,
            }
        )
    return runs


def collect(out: str | Path) -> dict[str, Path]:
    """Gather ``OUT/runs/*`` into table.md, table.csv (mean ± std over seeds), runs.csv and curves.png."""
    from ddpm_lightning.plots import curves_figure, save_figure

    out = Path(out)
    runs = load_runs(out)
    fid_steps = sorted({step for run in runs for step in run["fid_steps"]})
    header = ["schedule", "seeds", "steps", "final_loss", "final_val_loss"]
    header += [f"fid@{step}" for step in fid_steps] + ["wall_time_s"]
    rows_csv, rows_md = [], []
    for schedule in [s for s in SCHEDULES if any(r["schedule"] == s for r in runs)]:
        group = [r for r in runs if r["schedule"] == schedule]
        cells: list[tuple[float, float]] = [
            _mean_std([r["final_loss"] for r in group]),
            _mean_std([r["final_val_loss"] for r in group if not math.isnan(r["final_val_loss"])]),
        ]
        for step in fid_steps:
            cells.append(_mean_std([r["fid"][r["fid_steps"].index(step)] for r in group if step in r["fid_steps"]]))
        wall = _mean_std([r["wall_time_s"] for r in group])
        seeds = " ".join(str(r["seed"]) for r in group)
        steps = max(r["steps"] for r in group)
        rows_csv.append([schedule, seeds, steps] + [f"{m:.6g}±{s:.3g}" for m, s in cells] + [f"{wall[0]:.1f}"])
        md_cells = [_fmt(*c) for c in cells[:2]] + [_fmt(*c, digits=2) for c in cells[2:]] + [_fmt(*wall, digits=0)]
        rows_md.append([schedule, seeds, str(steps)] + md_cells)
    paths = {name: out / name for name in ("table.md", "table.csv", "runs.csv", "curves.png")}
    with open(paths["table.csv"], "w", newline="") as f:
        csv.writer(f).writerows([header, *rows_csv])
    with open(paths["runs.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["schedule", "seed", "steps", "final_loss", "final_val_loss", "wall_time_s"])
        for r in runs:
            writer.writerow(
                [r[k] for k in ("schedule", "seed", "steps", "final_loss", "final_val_loss", "wall_time_s")]
            )
    md_header = ["schedule", "seeds", "steps", "final train loss", "final val loss"]
    md_header += [f"FID @ {step}" for step in fid_steps] + ["wall time (s)"]
    lines = ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows_md]
    note = (
        f"\nMean ± std over seeds. Final train loss: mean L_simple over the last {FINAL_FRACTION:.0%} of logged "
        "steps; final val loss: the last evaluation (fixed t and noise per batch).\n"
    )
    paths["table.md"].write_text("\n".join(lines) + "\n" + note)
    save_figure(curves_figure(runs), paths["curves.png"])
    return paths


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


def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``ddpm ablate [--seeds 0 1] [--only schedule=S,seed=N | --collect] -c CONFIG ...``.

    Trains every (schedule, seed) one after the other and collects; any argument not listed below goes to
    ``ddpm fit`` unchanged (``-c configs/ablation/demo.yaml``, ``--trainer.max_steps 500``, ...).
    """
    from ddpm_lightning.plots import save_figure, schedule_figure

    parser = argparse.ArgumentParser(prog="ddpm ablate", description=ablate_main.__doc__, allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("results/ablation"), help="default: results/ablation")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--only", help="train one run, e.g. schedule=cosine,seed=1 (a SLURM array task)")
    parser.add_argument("--collect", action="store_true", help="only gather finished runs into the table and plot")
    args, fit_args = parser.parse_known_args(argv)
    if args.only and args.collect:
        raise ValueError("--only and --collect exclude each other: train one run, or collect them all")
    if args.only:
        run_one(args.out, *_parse_only(args.only), fit_args)
        return 0
    if not args.collect:
        if not fit_args:
            raise ValueError("ddpm ablate needs a training config, e.g. -c configs/ablation/demo.yaml")
        for seed in args.seeds:
            for schedule in args.schedules:
                run_one(args.out, schedule, seed, fit_args)
    paths = collect(args.out)
    save_figure(schedule_figure(), args.out / "schedules.png")
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), args.out / "schedules.png"]))
    return 0
