"""`ddpm ablate`: runs both schedules, then a table (mean ± std over seeds) and curves from the runs' metrics."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from ddpm_lightning.cli import main
from ddpm_lightning.cli.ablate import main as ablate_main
from ddpm_lightning.evaluation import ablation
from ddpm_lightning.plots import curves_figure

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--model.image_size", "16", "--data.init_args.image_size", "16", "--model.ch_mult", "[1]",
    "--model.num_timesteps", "100", "--data.init_args.batch_size", "8", "--trainer.max_steps", "3",
    "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def write_run(out: Path, schedule: str, seed: int, losses: list[float], fids: dict[int, float], wall: float) -> None:
    """A run folder as `ddpm ablate` leaves it: a CSVLogger metrics.csv and run.json."""
    folder = ablation.run_dir(out, schedule, seed) / "csv" / "version_0"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/fid"])
        for step, loss in enumerate(losses):
            writer.writerow([0, step, loss, ""])
            if step in fids:
                writer.writerow([0, step, "", fids[step]])
    (folder.parents[1] / "run.json").write_text(json.dumps({"schedule": schedule, "seed": seed, "wall_time_s": wall}))


@pytest.mark.integration
def test_ablate_trains_both_schedules_and_writes_table_and_plots(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ablate", "--out", str(tmp_path), "--seeds", "0", "-c", str(CONFIGS / "ablation/demo.yaml"), *TINY])
    assert exit_.value.code == 0
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["schedule"] for row in rows] == ["linear", "cosine"]
    assert all(row["steps"] == "3" and row["seeds"] == "0" for row in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| linear | 0 | 3 |" in table and "| cosine | 0 | 3 |" in table
    for name in ("curves.png", "schedules.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for schedule in ("linear", "cosine"):
        (hparams,) = (tmp_path / "runs" / f"{schedule}-seed0").rglob("hparams.yaml")
        assert f"schedule: {schedule}" in hparams.read_text()


@pytest.mark.unit
def test_collect_table_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    losses = {("linear", 0): [1.0] * 10 + [0.5] * 10, ("linear", 1): [1.0] * 18 + [0.3, 0.1]}
    losses |= {("cosine", 0): [0.8] * 20, ("cosine", 1): [0.6] * 20}
    fids = {("linear", 0): {9: 50.0, 19: 30.0}, ("linear", 1): {9: 40.0, 19: 20.0}}
    for (schedule, seed), values in losses.items():
        write_run(tmp_path, schedule, seed, values, fids.get((schedule, seed), {}), wall=10.0 + seed)
    ablation.collect(tmp_path)
    with open(tmp_path / "table.csv", newline="") as f:
        rows = {row["schedule"]: row for row in csv.DictReader(f)}
    # final loss = mean of the last 10% (2 of 20) logged losses: linear seeds 0.5 and 0.2
    mean, std = statistics.mean([0.5, 0.2]), statistics.stdev([0.5, 0.2])
    assert rows["linear"]["final_loss"] == f"{mean:.6g}±{std:.3g}"
    assert rows["linear"]["fid@19"] == f"{25.0:.6g}±{statistics.stdev([30.0, 20.0]):.3g}"
    assert rows["cosine"]["fid@9"] == "nan±nan"  # no FID logged for cosine
    assert rows["cosine"]["wall_time_s"] == "10.5"
    assert "| linear | 0 1 | 20 | 0.3500 ± 0.2121 |" in (tmp_path / "table.md").read_text()


@pytest.mark.unit
def test_curves_have_one_colour_per_schedule_and_fid_panel_when_logged() -> None:
    def run(schedule: str, seed: int, fid: list[float]) -> dict:
        return {"schedule": schedule, "seed": seed, "loss_steps": [0, 1, 2], "loss": [1.0, 0.5, 0.25],
                "fid_steps": [2][: len(fid)], "fid": fid}  # fmt: skip

    fig = curves_figure([run("linear", 0, [30.0]), run("linear", 1, []), run("cosine", 0, [])])
    loss_ax, fid_ax = fig.axes
    colours = {line.get_label(): line.get_color() for line in loss_ax.lines if not line.get_label().startswith("_")}
    assert set(colours) == {"linear", "cosine"} and colours["linear"] != colours["cosine"]
    assert len(loss_ax.lines) == 3 and len(fid_ax.lines) == 1


@pytest.mark.unit
@pytest.mark.parametrize("only", ["schedule=sigmoid,seed=0", "schedule=linear", "schedule=linear,seed=0,lr=1"])
def test_ablate_only_rejects_bad_runs(only: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schedule|seed|only"):
        ablate_main(["--out", str(tmp_path), "--only", only, "-c", "x.yaml"])
