"""`ddpm ablate`: a grid of runs over named axes, then a table (mean ± std over seeds) and curves from the runs'
metrics, bits/dim and the digit classifier's scores."""

import csv
import json
import statistics
from pathlib import Path

import lightning as L
import pytest
import yaml
from helpers import CLASSIFIER_TEST_EPOCHS, unet_spec, write_run

from ddpm_lightning.cli import main
from ddpm_lightning.cli.ablate import main as ablate_main
from ddpm_lightning.evaluation import ablation
from ddpm_lightning.plots import curves_figure

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--model.net.init_args.ch_mult", "[1]",
    "--model.num_timesteps", "100", "--data.init_args.batch_size", "8", "--trainer.max_steps", "3",
    "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _small_config(tmp_path: Path, classifier_cache: Path) -> Path:
    """configs/ablation/demo.yaml with its callbacks scaled down (the network and steps come from TINY)."""
    config = yaml.safe_load((CONFIGS / "ablation/demo.yaml").read_text())
    sizes = {
        "EMA": {},
        "BPDCallback": {"num_images": 4, "t_samples": 2, "batch_size": 4},
        "DemoReport": {"num_samples": 4, "num_eval_samples": 16, "sampler": {"name": "ddpm", "steps": 3},
                       "classifier_epochs": CLASSIFIER_TEST_EPOCHS, "classifier_cache_dir": str(classifier_cache)},
    }  # fmt: skip
    for callback in config["trainer"]["callbacks"]:
        callback["init_args"].update(sizes[callback["class_path"].rsplit(".", 1)[-1]])
    override = tmp_path / "small.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": config["trainer"]["callbacks"]}}))
    return override


@pytest.mark.integration
def test_ablate_trains_a_grid_and_writes_table_and_plots(tmp_path: Path, classifier_cache: Path) -> None:
    small = _small_config(tmp_path, classifier_cache)
    out = tmp_path / "out"
    args = [
        "--out",
        str(out),
        "--seeds",
        "0",
        "--axis",
        "schedule=linear,cosine",
        "--axis",
        "variance=fixed_large,learned_range",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "ablate",
                *args,
                "-c",
                str(CONFIGS / "demo.yaml"),
                "-c",
                str(CONFIGS / "ablation/demo.yaml"),
                "-c",
                str(small),
                *TINY,
            ]
        )
    assert exit_.value.code == 0
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["schedule"], row["variance"]) for row in rows] == [
        ("linear", "fixed_large"), ("linear", "learned_range"), ("cosine", "fixed_large"), ("cosine", "learned_range")
    ]  # fmt: skip
    assert all(row["steps"] == "3" and row["seeds"] == "0" for row in rows)
    # bits/dim (BPDCallback) and the digit classifier's scores (DemoReport) beside the losses
    assert all(float(row["bpd"].split("±")[0]) > 0 and float(row["frechet_distance"].split("±")[0]) > 0 for row in rows)
    table = (out / "table.md").read_text()
    assert "| schedule | variance | seeds | steps |" in table and "bits/dim" in table and "Frechet dist." in table
    assert "| cosine | learned_range | 0 | 3 |" in table
    for name in ("curves.png", "schedules.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for schedule, variance in [(r["schedule"], r["variance"]) for r in rows]:
        folder = ablation.run_dir(out, {"schedule": schedule, "variance": variance}, 0)
        (hparams,) = folder.rglob("hparams.yaml")
        assert f"schedule: {schedule}" in hparams.read_text() and f"variance: {variance}" in hparams.read_text()
        assert json.loads((folder / "run.json").read_text())["settings"] == {"schedule": schedule, "variance": variance}


@pytest.mark.unit
def test_the_grid_runs_seeds_outermost_and_maps_axes_to_config_keys(tmp_path: Path, capsys) -> None:
    axes = {"objective": ["eps", "v"], "model.lr": ["1e-3", "3e-3"]}
    runs = ablation.grid(axes, [0, 1])
    assert len(runs) == 8 and runs[0] == ({"objective": "eps", "model.lr": "1e-3"}, 0)
    assert runs[5] == ({"objective": "eps", "model.lr": "3e-3"}, 1)
    name = ablation.run_name(*runs[5])
    assert name == "objective=eps,model.lr=3e-3,seed=1" and ablation.parse_run(name) == runs[5]
    assert ablation.fit_overrides(*runs[5], tmp_path) == [
        "--model.objective", "eps", "--model.lr", "3e-3", "--seed_everything", "1",
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    # a list value keeps its commas: the split is at the commas outside brackets
    list_axis = ablation.parse_axis("model.net.init_args.ch_mult=[1,2],[1,2,4]")
    assert list_axis == ("model.net.init_args.ch_mult", ("[1,2]", "[1,2,4]"))
    assert ablation.parse_run("model.net.init_args.ch_mult=[1,2],seed=3") == ({list_axis[0]: "[1,2]"}, 3)
    assert (
        ablate_main(["--axis", "objective=eps,v", "--axis", "model.lr=1e-3,3e-3", "--seeds", "0", "1", "--list"]) == 0
    )
    listing = capsys.readouterr().out
    assert "   5  objective=eps,model.lr=3e-3,seed=1" in listing and "--array=0-7" in listing


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--axis", "variance=fixed_large,wide"], "unknown variance 'wide'; allowed: fixed_large"),
        (["--axis", "lr=1,2"], "unknown axis 'lr'"),
        (["--axis", "schedule"], "NAME=VALUE"),
        (["--axis", "model.net=model/unet.yaml"], "names a folder"),
        (["--axis", "objective=eps,eps"], "repeats a value"),
        (["--axis", "objective=eps", "--axis", "objective=v"], "given twice"),
        (["--axis", "objective=eps,v", "--task", "2"], "--task 2 is outside the grid's 0..1"),
        (["--only", "schedule=linear,seed=0", "--collect"], "exclude each other"),
    ],
)
def test_ablate_refuses_bad_axes_with_the_value_and_what_is_allowed(args, message, tmp_path: Path) -> None:
    with pytest.raises((ValueError, SystemExit)) as error:
        ablate_main(["--out", str(tmp_path), "--seeds", "0", *args, "-c", "x.yaml"])
    assert message in str(error.value) or error.type is SystemExit


@pytest.mark.unit
def test_collect_table_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    losses = {("linear", 0): [1.0] * 10 + [0.5] * 10, ("linear", 1): [1.0] * 18 + [0.3, 0.1]}
    losses |= {("cosine", 0): [0.8] * 20, ("cosine", 1): [0.6] * 20}
    fids = {("linear", 0): {9: 50.0, 19: 30.0}, ("linear", 1): {9: 40.0, 19: 20.0}}
    for (schedule, seed), values in losses.items():
        write_run(tmp_path, schedule, seed, values, fids.get((schedule, seed), {}), wall=10.0 + seed)
    ablation.collect(ablation.CollectSpec(tmp_path))
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
def test_one_seed_is_tabulated_as_its_value_without_a_spread(tmp_path: Path) -> None:
    write_run(tmp_path, "linear", 0, [1.0] * 18 + [0.4, 0.2], {19: 30.0}, wall=10.0)
    ablation.collect(ablation.CollectSpec(tmp_path))
    with open(tmp_path / "table.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["final_loss"] == "0.3" and row["fid@19"] == "30"
    assert "| linear | 0 | 20 | 0.3000 | n/a | 30.00 | 10 |" in (tmp_path / "table.md").read_text()


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


@pytest.mark.unit
def test_collect_reads_earlier_folder_names_bits_per_dim_and_the_reports_scores(tmp_path: Path) -> None:
    for seed, (bpd, fd) in enumerate([(3.0, 40.0), (2.0, 60.0)]):
        folder = tmp_path / "runs" / f"cosine-seed{seed}"  # the schedule ablation's earlier folder names
        (folder / "csv").mkdir(parents=True)
        (folder / "csv" / "metrics.csv").write_text(f"step,train/loss,val/bpd\n0,1.0,\n1,0.5,\n1,,{bpd}\n")
        scores = {"frechet_distance": fd, "confident_share": 0.5, "class_entropy": 2.0}
        (folder / "metrics.json").write_text(json.dumps({"trained": scores, "steps": 2}))
    ablation.collect(ablation.CollectSpec(tmp_path))
    with open(tmp_path / "table.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["schedule"] == "cosine" and row["seeds"] == "0 1" and row["steps"] == "2"
    assert row["bpd"] == f"2.5±{statistics.stdev([3.0, 2.0]):.3g}"
    assert row["frechet_distance"] == f"50±{statistics.stdev([40.0, 60.0]):.3g}"
    assert (
        "| cosine | 0 1 | 2 | 0.5000 ± 0.0000 | n/a | 2.50 ± 0.71 | 50.00 ± 14.14 |"
        in (tmp_path / "table.md").read_text()
    )


# ------------------------------------------------------------------------------- equal time, manifest, submit
class _StopWhenSet(L.Callback):
    """Ends the fit at the step where the budget has set the run's steps."""

    def __init__(self, budget) -> None:
        self.budget = budget

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or self.budget.max_steps is not None


def _tiny_fit(tmp_path: Path, budget, steps: int = -1, stop_when_set: bool = False):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ddpm_lightning.lit_module import DiffusionModule

    module = DiffusionModule(
        net=unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
        num_timesteps=10, schedule="cosine", lr_schedule={"warmup_steps": 1},
    )  # fmt: skip
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[budget, *([_StopWhenSet(budget)] if stop_when_set else [])],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(8, 1, 8, 8)), batch_size=4))
    return trainer


@pytest.mark.integration
def test_a_training_budget_sets_the_steps_from_the_runs_own_measured_rate(tmp_path: Path) -> None:
    from ddpm_lightning.callbacks import TrainingBudget

    budget = TrainingBudget(1e6, warmup_steps=2, measure_steps=3)  # a budget far longer than the measurement
    trainer = _tiny_fit(tmp_path, budget, stop_when_set=True)  # stopped once the steps are set, not after 1e6 s
    info = json.loads((tmp_path / "budget.json").read_text())
    assert info["measured_steps"] == 3 and info["steps_per_second"] == budget.steps_per_second > 0
    assert info["max_steps"] == round(1e6 * info["steps_per_second"])  # the steps of 1e6 s at the measured rate
    assert trainer.fit_loop.epoch_loop.max_steps == info["max_steps"]


@pytest.mark.integration
def test_a_tiny_budget_stops_the_run_where_it_is_spent(tmp_path: Path) -> None:
    from ddpm_lightning.callbacks import TrainingBudget

    trainer = _tiny_fit(tmp_path, TrainingBudget(1e-9, warmup_steps=2, measure_steps=3))
    assert trainer.global_step == 1  # the first step spends it
    assert json.loads((tmp_path / "budget.json").read_text())["max_steps"] == 1


@pytest.mark.unit
@pytest.mark.parametrize("seconds", [0, -1.0, float("inf"), True])
def test_a_bad_budget_is_refused(seconds) -> None:
    from ddpm_lightning.callbacks import TrainingBudget

    with pytest.raises(ValueError, match="positive number of seconds"):
        TrainingBudget(seconds)


@pytest.mark.unit
def test_budget_runs_table_the_steps_they_made_and_their_rate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for schedule, rate, steps in (("linear", 4.0, 40), ("cosine", 2.0, 20)):
        write_run(out, schedule, 0, [1.0, 0.5], {}, wall=12.0)
        budget = {"budget_seconds": 10.0, "steps_per_second": rate, "max_steps": steps}
        (ablation.run_dir(out, schedule, 0) / "budget.json").write_text(json.dumps(budget))
    ablation.collect(ablation.CollectSpec(out))
    with open(out / "table.csv", newline="") as f:
        rows = {row["schedule"]: row for row in csv.DictReader(f)}
    assert (rows["linear"]["steps"], rows["cosine"]["steps"]) == ("40", "20")
    assert float(rows["linear"]["steps_per_second"].split("±")[0]) == 4.0
    assert "Equal training time: 10 s" in (out / "table.md").read_text()


@pytest.mark.unit
def test_collecting_an_incomplete_grid_names_the_missing_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    ablation.write_manifest(out, {"schedule": ["linear", "cosine"]}, [0, 1, 2])
    write_run(out, "linear", 0, [1.0], {}, wall=1.0)
    write_run(out, "cosine", 1, [1.0], {}, wall=1.0)
    missing = ["schedule=cosine,seed=0", "schedule=linear,seed=1", "schedule=linear,seed=2", "schedule=cosine,seed=2"]
    with pytest.raises(ablation.MissingRunsError) as error:
        ablate_main(["--collect", "--out", str(out)])
    assert "4 run(s)" in str(error.value) and all(name in str(error.value) for name in missing)
    assert ablate_main(["--collect", "--allow-missing", "--out", str(out)]) == 0
    assert "missing runs (listed under the table): " + ", ".join(missing) in capsys.readouterr().out
    assert "**Missing runs**" in (out / "table.md").read_text()


@pytest.mark.unit
def test_collecting_only_runs_without_a_manifest_names_the_missing_ones_of_the_grid_it_is_given(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"  # runs trained with --only: no manifest
    write_run(out, "linear", 0, [1.0], {}, wall=1.0)
    argv = ["--collect", "--out", str(out), "--axis", "schedule=linear,cosine", "--seeds", "0", "1"]
    with pytest.raises(ablation.MissingRunsError) as error:
        ablate_main(argv)
    missing = "schedule=cosine,seed=0, schedule=linear,seed=1, schedule=cosine,seed=1"
    assert f"3 run(s) of the grid in {out} have not finished: {missing}" in str(error.value)
    assert ablate_main([*argv, "--allow-missing"]) == 0
    assert f"missing runs (listed under the table): {missing}" in capsys.readouterr().out


@pytest.mark.unit
def test_a_manifest_of_another_grid_is_not_overwritten(tmp_path: Path) -> None:
    ablation.write_manifest(tmp_path, {"schedule": ["linear", "cosine"]}, [0])
    ablation.write_manifest(tmp_path, {"schedule": ["linear", "cosine"]}, [0])  # the same grid: fine
    with pytest.raises(ValueError, match="holds another grid"):
        ablation.write_manifest(tmp_path, {"schedule": ["linear", "cosine"]}, [0, 1])


def _fake(bin_dir: Path, name: str, reply: str) -> Path:
    """A shell script on PATH that records its argv (one argument a line, runs separated by ---) and prints reply."""
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" >> {log}\necho --- >> {log}\necho "{reply}"\n')
    script.chmod(0o755)
    return log


@pytest.mark.unit
def test_submit_sizes_the_array_by_the_grid_and_the_script_runs_each_task(tmp_path: Path, monkeypatch, capsys):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch_log, srun_log = _fake(bin_dir, "sbatch", "123;cluster"), _fake(bin_dir, "srun", "")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    args = ["--out", str(out), "--axis", "schedule=linear,cosine", "--seeds", "0", "1", "2", "-c", "configs/x.yaml"]
    assert ablate_main(["--submit", *args]) == 0
    array_call, collect_call = sbatch_log.read_text().split("---\n")[:2]
    array_argv = array_call.splitlines()
    assert array_argv[:3] == ["--parsable", "--array=0-5", "scripts/slurm/ablation_array.sbatch"]  # 2 x 3 runs
    assert array_argv[3:] == args
    assert "--dependency=afterany:123" in collect_call and f"ddpm ablate --collect --out {out}" in collect_call
    assert json.loads((out / "manifest.json").read_text())["runs"][5] == "schedule=cosine,seed=2"
    assert "array job 123 (--array=0-5)" in capsys.readouterr().out
    # the array script hands its task id and the arguments to `ddpm ablate` through srun
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "5"}
    subprocess.run(["bash", "scripts/slurm/ablation_array.sbatch", *args], env=env, check=True, cwd=root)
    assert srun_log.read_text().splitlines()[:-1] == ["ddpm", "ablate", "--task", "5", *args]
    assert "--array=0-3" not in (root / "scripts/slurm/ablation_array.sbatch").read_text()


@pytest.mark.unit
def test_a_collect_spec_writes_beside_the_runs_unless_told_and_refuses_a_string_of_run_names(tmp_path: Path) -> None:
    assert ablation.CollectSpec(tmp_path).dest == tmp_path
    assert ablation.CollectSpec(tmp_path, dest=tmp_path / "t").dest == tmp_path / "t"
    with pytest.raises(ValueError, match="expected is a list of run names, got the string 'schedule=cosine,seed=0'"):
        ablation.CollectSpec(tmp_path, expected="schedule=cosine,seed=0")
