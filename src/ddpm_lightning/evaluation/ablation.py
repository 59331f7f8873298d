"""The schedule ablation's analysis: the runs that ``ddpm ablate`` trained, gathered into one table and one plot.

Each (schedule, seed) ran in its own folder ``OUT/runs/<schedule>-seed<seed>`` (:func:`run_dir`) with a CSV logger
(see configs/ablation/) and a ``run.json`` (its wall time). :func:`collect` reads them and writes ``OUT/table.md``,
``table.csv``, ``runs.csv`` and ``curves.png``; :func:`load_runs` gives the curves to plot in a notebook.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpm_lightning.diffusion import SCHEDULES
from ddpm_lightning.io import atomic_write

__all__ = ["collect", "load_runs", "read_metrics", "run_dir"]

LOSS_KEY, VAL_LOSS_KEY, FID_KEY = "train/loss", "val/loss", "val/fid"
FINAL_FRACTION = 0.1  # "final loss" = mean train/loss over the last 10% of logged steps (single steps are noisy)


def run_dir(out: str | Path, schedule: str, seed: int) -> Path:
    """The run folder of one (schedule, seed): ``OUT/runs/<schedule>-seed<seed>``."""
    return Path(out) / "runs" / f"{schedule}-seed{seed}"


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
    """Gather ``OUT/runs/*`` into table.md, table.csv (mean ± std over seeds), runs.csv and curves.png; returns
    their paths."""
    from ddpm_lightning.plots import curves_figure, save_figure  # matplotlib only once a figure is drawn

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
    run_columns = ["schedule", "seed", "steps", "final_loss", "final_val_loss", "wall_time_s"]
    _write_csv([header, *rows_csv], paths["table.csv"])
    _write_csv([run_columns, *([r[k] for k in run_columns] for r in runs)], paths["runs.csv"])
    md_header = ["schedule", "seeds", "steps", "final train loss", "final val loss"]
    md_header += [f"FID @ {step}" for step in fid_steps] + ["wall time (s)"]
    lines = ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows_md]
    note = (
        f"\nMean ± std over seeds. Final train loss: mean L_simple over the last {FINAL_FRACTION:.0%} of logged "
        "steps; final val loss: the last evaluation (fixed t and noise per batch).\n"
    )
    text = "\n".join(lines) + "\n" + note
    atomic_write(paths["table.md"], lambda tmp: tmp.write_text(text))
    save_figure(curves_figure(runs), paths["curves.png"])
    return paths


def _write_csv(rows: Sequence[Sequence[Any]], path: Path) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
