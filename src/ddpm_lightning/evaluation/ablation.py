"""Ablations: a grid of ``ddpm fit`` runs over named axes, gathered into one table and one plot.

An axis is a setting with the values to compare: a short name (:data:`AXES`: ``schedule``, ``objective``,
``weighting``, ``variance``) or any dotted config key (``model.lr``, ``data.init_args.batch_size``,
``model.net.init_args.ch``). The grid is every combination of the axes' values, for each seed. Each run is a plain
``ddpm fit`` in its own folder ``OUT/runs/<name>=<value>,...,seed=<seed>`` (:func:`run_dir`; the folder name is also
the ``--only`` spelling) with a ``run.json`` (its settings and wall time). :func:`collect` reads the runs' CSV logs
(loss, ``val/fid``, ``val/bpd``) and, when the config has a :class:`~ddpm_lightning.callbacks.DemoReport`, its
``metrics.json`` (the digit classifier's scores), and writes ``OUT/table.md``, ``table.csv``, ``runs.csv`` and
``curves.png``; :func:`load_runs` gives the curves to plot in a notebook. A run trained on a time budget
(``ddpm ablate --budget-seconds``) adds its measured steps/s from ``budget.json``. ``OUT/manifest.json``
(:func:`write_manifest`, written when the runs are launched) records the grid, so that :func:`collect` names the
runs that are missing.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm_lightning.diffusion import LOSS_WEIGHTINGS, OBJECTIVES, SCHEDULES, VARIANCES
from ddpm_lightning.io import atomic_write, write_json

__all__ = [
    "AXES",
    "DEFAULT_AXES",
    "CollectSpec",
    "MANIFEST",
    "MissingRunsError",
    "collect",
    "fit_overrides",
    "grid",
    "load_runs",
    "missing_runs",
    "parse_axis",
    "parse_run",
    "read_metrics",
    "run_dir",
    "run_name",
    "write_manifest",
]

#: The short axis names: the config key each sets and the values it allows.
AXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "schedule": ("model.schedule", SCHEDULES),
    "objective": ("model.objective", OBJECTIVES),
    "weighting": ("model.loss_weighting", LOSS_WEIGHTINGS),
    "variance": ("model.variance", VARIANCES),
}
#: Without ``--axis``: the schedule ablation.
DEFAULT_AXES: dict[str, tuple[str, ...]] = {"schedule": SCHEDULES}

LOSS_KEY, VAL_LOSS_KEY, FID_KEY, BPD_KEY = "train/loss", "val/loss", "val/fid", "val/bpd"
FINAL_FRACTION = 0.1  # "final loss" = mean train/loss over the last 10% of logged steps (single steps are noisy)
#: DemoReport's scores of the trained model (metrics.json), as table columns.
QUALITY_KEYS = {"frechet_distance": "Frechet dist.", "confident_share": "confident", "class_entropy": "class entropy"}
MANIFEST = "manifest.json"
_VALUE = re.compile(r"[A-Za-z0-9_.+\-]+|\[[A-Za-z0-9_.+\-,]*\]")  # a word, or a flat list such as [1,2,4]
_BUDGET_FILE = "budget.json"  # written by callbacks.budget.TrainingBudget into the run folder


def _split(text: str) -> list[str]:
    """Split at the commas outside brackets: ``"a=[1,2],seed=0"`` -> ``["a=[1,2]", "seed=0"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _check_axis(name: str, values: Sequence[str]) -> None:
    if name not in AXES and "." not in name:
        raise ValueError(f"unknown axis {name!r}: use one of {', '.join(AXES)} or a dotted config key such as model.lr")
    if name == "seed":
        raise ValueError("seed is not an axis: give the seeds with --seeds")
    if not values:
        raise ValueError(f"axis {name!r} has no values")
    allowed = AXES[name][1] if name in AXES else None
    for value in values:
        if allowed is not None and value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if not _VALUE.fullmatch(value):
            raise ValueError(
                f"axis value {value!r} of {name!r}: use letters, digits and _ . + - or a list [a,b] (it names a folder)"
            )
    if len(set(values)) != len(values):
        raise ValueError(f"axis {name!r} repeats a value: {list(values)}")


def parse_axis(text: str) -> tuple[str, tuple[str, ...]]:
    """``"schedule=linear,cosine"`` -> ``("schedule", ("linear", "cosine"))``, validated."""
    name, sep, values = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--axis expects NAME=VALUE[,VALUE...], e.g. schedule=linear,cosine; got {text!r}")
    parsed = tuple(v for v in _split(values) if v)
    _check_axis(name, parsed)
    return name, parsed


def grid(axes: Mapping[str, Sequence[str]], seeds: Sequence[int]) -> list[tuple[dict[str, str], int]]:
    """Every (settings, seed) of the ablation: seeds outermost, then the axes' combinations in the order given (task
    ``k`` of a SLURM array is ``grid(...)[k]``)."""
    for name, values in axes.items():
        _check_axis(name, list(values))
    if not seeds:
        raise ValueError("the ablation needs at least one seed")
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    return [(combo, seed) for seed in seeds for combo in combos]


def run_name(settings: Mapping[str, str], seed: int) -> str:
    """The folder name (and ``--only`` spelling) of a run: ``schedule=cosine,objective=v,seed=0``."""
    return ",".join([*(f"{k}={v}" for k, v in settings.items()), f"seed={seed}"])


def parse_run(text: str) -> tuple[dict[str, str], int]:
    """:func:`run_name` back into (settings, seed), validated; ``"schedule=cosine,seed=1"`` -> ``({...}, 1)``."""
    try:
        fields = dict(item.split("=", 1) for item in _split(text))
        seed = int(fields.pop("seed"))
    except (KeyError, ValueError) as err:
        raise ValueError(f"--only expects NAME=VALUE,...,seed=<int> (schedule=cosine,seed=1), got {text!r}") from err
    if not fields:
        raise ValueError(f"--only names no axis, got {text!r}")
    for name, value in fields.items():
        _check_axis(name, [value])
    return fields, seed


def run_dir(out: str | Path, settings: Mapping[str, str] | str, seed: int) -> Path:
    """The run folder of one (settings, seed): ``OUT/runs/<run_name>``; a bare string is a schedule."""
    if isinstance(settings, str):
        settings = {"schedule": settings}
    return Path(out) / "runs" / run_name(settings, seed)


def fit_overrides(settings: Mapping[str, str], seed: int, folder: str | Path) -> list[str]:
    """The ``ddpm fit`` arguments of one run: each axis's config key, the seed and the run folder."""
    args = []
    for name, value in settings.items():
        args += [f"--{AXES[name][0] if name in AXES else name}", value]
    return [*args, "--seed_everything", str(seed), "--trainer.default_root_dir", str(folder)]


def read_metrics(folder: Path) -> dict[str, Any]:
    """Loss, FID and bits/dim curves of one run folder, from its newest ``metrics.csv`` (CSVLogger; empty curves
    without one), its ``run.json`` and the DemoReport's ``metrics.json`` when there is one."""
    files = sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    series: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in (LOSS_KEY, VAL_LOSS_KEY, FID_KEY, BPD_KEY)}
    if files:
        with open(files[-1], newline="") as f:
            for row in csv.DictReader(f):
                for key, (steps, values) in series.items():
                    if row.get(key):
                        steps.append(int(row["step"]))
                        values.append(float(row[key]))
    info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    report = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    budget = json.loads((folder / _BUDGET_FILE).read_text()) if (folder / _BUDGET_FILE).is_file() else {}
    return {
        "loss_steps": series[LOSS_KEY][0],
        "loss": series[LOSS_KEY][1],
        "val_loss": series[VAL_LOSS_KEY][1],
        "fid_steps": series[FID_KEY][0],
        "fid": series[FID_KEY][1],
        "bpd": series[BPD_KEY][1][-1] if series[BPD_KEY][1] else math.nan,
        "quality": {k: float(report["trained"][k]) for k in QUALITY_KEYS} if "trained" in report else {},
        "report_steps": report.get("steps"),
        "info": info,
        "wall_time_s": info.get("wall_time_s", math.nan),
        "steps_per_second": budget.get("steps_per_second") or math.nan,
        "budget_seconds": budget.get("budget_seconds", math.nan),
        "budget_steps": budget.get("max_steps"),
    }


class MissingRunsError(ValueError):
    """Runs of the manifest's grid that have not finished (no ``run.json``)."""


def write_manifest(
    out: str | Path,
    axes: Mapping[str, Sequence[str]],
    seeds: Sequence[int],
    fit_args: Sequence[str] = (),
    budget_seconds: float | None = None,
) -> Path:
    """Write down the grid being launched, ``OUT/manifest.json``: the axes, seeds, the runs in task order, the
    ``ddpm fit`` arguments and the time budget. Refuses to overwrite a manifest of another grid in the same folder."""
    runs = [run_name(settings, seed) for settings, seed in grid(axes, seeds)]
    path = Path(out) / MANIFEST
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("runs") != runs:
            raise ValueError(
                f"{path} holds another grid ({len(earlier.get('runs', []))} runs: {', '.join(earlier.get('runs', []))})"
                f"; use another --out or remove the folder"
            )
    manifest = {
        "axes": {k: list(v) for k, v in axes.items()},
        "seeds": list(seeds),
        "runs": runs,
        "fit_args": list(fit_args),
        "budget_seconds": budget_seconds,
    }
    return write_json(manifest, path)


def missing_runs(out: str | Path, expected: Sequence[str] = ()) -> list[str]:
    """The runs without a finished run folder (``run.json``): those of ``OUT/manifest.json`` in task order, or
    without a manifest those of ``expected`` (the grid the command names); [] where neither says."""
    path = Path(out) / MANIFEST
    runs = json.loads(path.read_text())["runs"] if path.is_file() else list(expected)
    return [name for name in runs if not (Path(out) / "runs" / name / "run.json").is_file()]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value: it has no spread)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    """``mean ± std``; the mean alone for one value; ``n/a`` for none."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _csv_cell(mean: float, std: float) -> str:
    return f"{mean:.6g}" if math.isnan(std) and not math.isnan(mean) else f"{mean:.6g}±{std:.3g}"


def _settings_of(folder: Path, info: Mapping[str, Any]) -> tuple[dict[str, str], int, float]:
    """(settings, seed, grid position) of a run folder: from run.json, or from a ``<schedule>-seed<seed>`` name; a
    run trained outside the grid (``--only``) comes last."""
    if "settings" in info:
        position = info.get("position")
        return dict(info["settings"]), int(info["seed"]), math.inf if position is None else int(position)
    if "," in folder.name or folder.name.startswith(tuple(f"{k}=" for k in AXES)):
        settings, seed = parse_run(folder.name)
        return settings, seed, 0
    schedule, seed = folder.name.rsplit("-seed", 1)  # the schedule ablation's earlier folder names
    return {"schedule": schedule}, int(seed), SCHEDULES.index(schedule) if schedule in SCHEDULES else len(SCHEDULES)


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """Every run in ``OUT/runs``: its settings, ``label`` (the settings as text), curves (:func:`read_metrics`),
    final losses and steps, in grid order."""
    out = Path(out)
    folders = sorted(p for p in (out / "runs").glob("*") if p.is_dir() and ("seed" in p.name))
    if not folders:
        raise FileNotFoundError(f"no ablation runs in {out / 'runs'}; run `ddpm ablate` first")
    runs = []
    for folder in folders:
        metrics = read_metrics(folder)
        settings, seed, position = _settings_of(folder, metrics["info"])
        tail = max(1, math.ceil(FINAL_FRACTION * len(metrics["loss"])))
        steps = metrics["loss_steps"][-1] + 1 if metrics["loss_steps"] else (metrics["report_steps"] or 0)
        steps = metrics["budget_steps"] or steps  # a budget run ends at the steps its budget set
        runs.append(
            {
                **settings,
                "settings": settings,
                "label": " ".join(settings.values()) if len(settings) > 1 else next(iter(settings.values())),
                "seed": seed,
                "position": position,
                "steps": steps,
                "final_loss": sum(metrics["loss"][-tail:]) / tail if metrics["loss"] else math.nan,
                "final_val_loss": metrics["val_loss"][-1] if metrics["val_loss"] else math.nan,
                **metrics,
            }
        )
    return sorted(runs, key=lambda r: (r["position"], r["label"], r["seed"]))


@dataclass(frozen=True)
class CollectSpec:
    """What :func:`collect` gathers and where it writes.

    Args:
        out: the ablation's folder (``OUT/runs/*``, ``OUT/manifest.json``).
        dest: the folder of the table, CSV files and curves (default ``out``).
        allow_missing: runs of the grid that have not finished are listed under the table instead of an error.
        expected: the grid's run names (:func:`run_name`), where no manifest gives them.
    """

    out: Path
    dest: Path | None = None
    allow_missing: bool = False
    expected: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.expected, str):
            raise ValueError(f"expected is a list of run names, got the string {self.expected!r}")
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "dest", Path(self.dest) if self.dest is not None else Path(self.out))
        object.__setattr__(self, "expected", tuple(self.expected))


def collect(spec: CollectSpec) -> dict[str, Path]:
    """Gather ``spec.out/runs/*`` into table.md, table.csv (mean ± std over seeds, one row per setting), runs.csv and
    curves.png, written to ``spec.dest``; returns their paths. Runs of the manifest's grid (without one: of
    ``spec.expected``) that have not finished raise :class:`MissingRunsError` naming them, or with
    ``spec.allow_missing`` are listed under the table."""
    from ddpm_lightning.plots import curves_figure, save_figure  # matplotlib only once a figure is drawn

    missing = missing_runs(spec.out, spec.expected)
    if missing and not spec.allow_missing:
        grid_of = spec.out / MANIFEST if (spec.out / MANIFEST).is_file() else f"the grid in {spec.out}"
        raise MissingRunsError(
            f"{len(missing)} run(s) of {grid_of} have not finished: {', '.join(missing)} (train them "
            "with --only NAME or --task K, or pass --allow-missing for a table that lists them as missing)"
        )
    runs = load_runs(spec.out)
    table = _Table.of(runs)
    paths = {name: spec.dest / name for name in ("table.md", "table.csv", "runs.csv", "curves.png")}
    _write_csv([[*table.axes, "seeds", "steps", *table.columns, "wall_time_s"], *table.rows_csv], paths["table.csv"])
    _write_runs_csv(runs, table, paths["runs.csv"])
    md_header = [*table.axes, "seeds", "steps", *table.md_names, "wall time (s)"]
    lines = ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows_md]
    note = _table_note(runs, table.has_bpd, table.has_rate, table.quality, missing)
    text = "\n".join(lines) + "\n" + note + "\n"
    atomic_write(paths["table.md"], lambda tmp: tmp.write_text(text))
    save_figure(curves_figure(runs), paths["curves.png"])
    return paths


@dataclass
class _Table:
    """The ablation's table: one row per setting, each figure's mean and spread over the seeds."""

    axes: list[str]
    quality: list[str]
    has_bpd: bool
    has_rate: bool
    columns: list[str]
    md_names: list[str]
    rows_csv: list[list[Any]]
    rows_md: list[list[str]]

    @classmethod
    def of(cls, runs: Sequence[dict[str, Any]]) -> _Table:
        axes = list(dict.fromkeys(name for run in runs for name in run["settings"]))
        fid_steps = sorted({step for run in runs for step in run["fid_steps"]})
        has_bpd = any(not math.isnan(run["bpd"]) for run in runs)
        quality = [k for k in QUALITY_KEYS if any(k in run["quality"] for run in runs)]
        has_rate = any(not math.isnan(run["steps_per_second"]) for run in runs)
        columns = ["final_loss", "final_val_loss", *(f"fid@{s}" for s in fid_steps)]
        columns += ["bpd"] * has_bpd + quality + ["steps_per_second"] * has_rate
        md_names = ["final train loss", "final val loss", *(f"FID @ {s}" for s in fid_steps)]
        md_names += ["bits/dim"] * has_bpd + [QUALITY_KEYS[k] for k in quality] + ["steps/s"] * has_rate
        table = cls(axes, quality, has_bpd, has_rate, columns, md_names, [], [])
        groups: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            groups.setdefault(run["label"], []).append(run)
        for group in groups.values():
            table.add(group, fid_steps)
        return table

    def add(self, group: Sequence[dict[str, Any]], fid_steps: Sequence[int]) -> None:
        """The row of one setting's runs (one per seed)."""

        def spread(key: str) -> tuple[float, float]:
            return _mean_std([r[key] for r in group if not math.isnan(r[key])])

        cells = [spread("final_loss"), spread("final_val_loss")]
        for step in fid_steps:
            cells.append(_mean_std([r["fid"][r["fid_steps"].index(step)] for r in group if step in r["fid_steps"]]))
        cells += [spread("bpd")] * self.has_bpd
        cells += [_mean_std([r["quality"][k] for r in group if k in r["quality"]]) for k in self.quality]
        cells += [spread("steps_per_second")] * self.has_rate
        wall = _mean_std([r["wall_time_s"] for r in group])
        settings = [group[0]["settings"].get(name, "") for name in self.axes]
        seeds = " ".join(str(r["seed"]) for r in group)
        steps = max(r["steps"] for r in group)
        self.rows_csv.append([*settings, seeds, steps] + [_csv_cell(m, s) for m, s in cells] + [f"{wall[0]:.1f}"])
        md_cells = [_fmt(*c) for c in cells[:2]] + [_fmt(*c, digits=2) for c in cells[2:]] + [_fmt(*wall, digits=0)]
        self.rows_md.append([*settings, seeds, str(steps), *md_cells])


def _write_runs_csv(runs: Sequence[dict[str, Any]], table: _Table, path: Path) -> Path:
    """One line per run: its settings, seed, steps, losses, bits/dim, wall time, rate and scores."""
    run_columns = ["seed", "steps", "final_loss", "final_val_loss", "bpd", "wall_time_s"]
    run_columns += ["budget_seconds", "steps_per_second"] * table.has_rate
    lines = [
        [*(r["settings"].get(a, "") for a in table.axes), *(r[k] for k in run_columns)]
        + [r["quality"].get(k, math.nan) for k in table.quality]
        for r in runs
    ]
    return _write_csv([[*table.axes, *run_columns, *table.quality], *lines], path)


def _table_note(
    runs: Sequence[dict[str, Any]], has_bpd: bool, has_rate: bool, quality: Sequence[str], missing: Sequence[str]
) -> str:
    """The lines under the table: what its columns mean, and the runs missing from it."""
    note = (
        f"\nMean ± std over seeds (the value alone for one seed). Final train loss: mean of the logged training loss "
        f"over the last {FINAL_FRACTION:.0%} of logged steps; final val loss: the last evaluation (fixed t and noise "
        "per batch)."
    )
    if has_bpd:
        note += " Bits/dim: the last `val/bpd` (the bound of Ho et al. Eq. 5 on a fixed subset, EMA weights)."
    if has_rate:
        budgets = sorted({r["budget_seconds"] for r in runs if not math.isnan(r["budget_seconds"])})
        note += (
            f" Equal training time: {' / '.join(f'{b:g}' for b in budgets)} s of each run's own training steps; "
            "steps: the steps each run made in it; steps/s: its rate measured inside its fit after a warm-up."
        )
    if quality:
        note += (
            " Frechet dist., confident (share of samples the digit classifier gives > 0.9) and class entropy: the "
            "DemoReport's scores of the trained model's samples (metrics.json)."
        )
    if missing:
        note += f"\n\n**Missing runs** (in the manifest, not finished; not in the table): {', '.join(missing)}."
    return note


def _write_csv(rows: Sequence[Sequence[Any]], path: Path) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
