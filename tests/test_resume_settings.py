"""Resuming a fit: a setting given with ``--ckpt_path`` is applied (safe ones) or refused (the model's), never dropped;
the time budget is cumulative; trainer settings of the wrong type or value are clear errors."""

from pathlib import Path

import pytest
import torch

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.cli.resume import parse_max_time, reconcile_model_settings
from ddpm_lightning.legacy import upgrade_hyperparameters

pytestmark = pytest.mark.integration


def tiny_fit(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny U-Net on 8x8 digits, written as a preset (model.net) plus flat settings."""
    return [
        "fit",
        "--seed_everything=0",
        "--model.net=ddpm_lightning.models.UNet",
        "--model.net.init_args.in_channels=1",
        "--model.net.init_args.ch=32",
        "--model.net.init_args.ch_mult=[1]",
        "--model.net.init_args.num_res_blocks=1",
        "--model.net.init_args.attn_resolutions=[]",
        "--model.net.init_args.image_size=8",
        "--model.num_timesteps=50",
        "--model.lr=1e-3",
        "--model.lr_schedule.warmup_steps=2",
        "--data=ddpm_lightning.data.EmbeddedDigitsDataModule",
        "--data.batch_size=4",
        "--data.image_size=8",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        '--trainer.callbacks+={"class_path": "ddpm_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}',
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        *extra,
    ]


def last(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A run folder whose last.ckpt holds 2 steps of the tiny model (lr 1e-3, 32 channels)."""
    main(tiny_fit(tmp_path, 2))
    return tmp_path


@pytest.mark.parametrize("ckpt", ["file", "last"])
def test_a_new_learning_rate_given_on_resume_is_applied_and_printed(
    trained: Path, ckpt: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = trained
    ckpt_path = str(last(run_dir)) if ckpt == "file" else "last"
    seen: list[list[float]] = []

    from ddpm_lightning.lit_module import DiffusionModule

    original = DiffusionModule.on_train_start

    def record(module: DiffusionModule) -> None:
        original(module)
        seen.append([group["lr"] for group in module.trainer.optimizers[0].param_groups])
        seen.append(list(module.trainer.lr_scheduler_configs[0].scheduler.base_lrs))

    monkeypatch.setattr(DiffusionModule, "on_train_start", record)
    main(tiny_fit(run_dir, 4, "--model.lr=1e-5", f"--ckpt_path={ckpt_path}"))

    out = capsys.readouterr().out
    assert "model.lr: checkpoint 0.001, given 1e-05" in out
    # step 2 of a 2-step warm-up: the full new rate, in the optimizer and in the schedule
    assert seen == [[1e-5], [1e-5]]
    checkpoint = read_checkpoint(last(run_dir))
    assert checkpoint["global_step"] == 4
    assert checkpoint["hyper_parameters"]["lr"] == 1e-5
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-5


@pytest.mark.parametrize("ckpt", ["file", "last"])
def test_a_changed_model_shape_on_resume_is_refused_listing_every_difference(
    trained: Path, ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = trained
    ckpt_path = str(last(run_dir)) if ckpt == "file" else "last"
    args = ["--model.net.init_args.ch=64", "--model.num_timesteps=100", "--model.objective=v", "--model.lr=1e-4"]
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit(run_dir, 4, *args, f"--ckpt_path={ckpt_path}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.net.init_args.ch: checkpoint 32, given 64" in err
    assert "model.num_timesteps: checkpoint 50, given 100" in err
    assert "model.objective: checkpoint eps, given v" in err
    assert "model.lr" not in err.split("settings a resumed run may change")[0]  # a safe change is no error
    assert err.count("ddpm: error") == 1 and "Traceback" not in err
    assert read_checkpoint(last(run_dir))["global_step"] == 2  # nothing trained


def test_a_flat_deprecated_model_setting_on_resume_is_caught(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit(run_dir, 4, "--model.ch=64", f"--ckpt_path={last(run_dir)}"))
    assert exit_info.value.code == 2
    assert "model.net.init_args.ch: checkpoint 32, given 64" in capsys.readouterr().err  # where model.ch is today


@pytest.mark.filterwarnings("ignore:model.* deprecated, set model:FutureWarning")
def test_old_flat_settings_on_resume_change_their_grouped_setting_or_are_refused_under_its_name(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = trained
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit(run_dir, 4, "--model.beta_end=0.01", f"--ckpt_path={last(run_dir)}"))
    assert exit_info.value.code == 2
    assert "model.schedule: checkpoint" in capsys.readouterr().err  # the noise schedule cannot change
    main(tiny_fit(run_dir, 4, "--model.warmup_steps=3", "--model.weight_decay=0.1", f"--ckpt_path={last(run_dir)}"))
    out = capsys.readouterr().out
    assert "model.lr_schedule: checkpoint" in out and "'warmup_steps': 3" in out
    assert "model.optimizer: checkpoint" in out and "'weight_decay': 0.1" in out
    hparams = read_checkpoint(last(run_dir))["hyper_parameters"]
    assert hparams["lr_schedule"]["warmup_steps"] == 3 and hparams["optimizer"]["weight_decay"] == 0.1


def test_settings_left_at_their_defaults_take_the_checkpoints() -> None:
    stored = {"net": {"class_path": "ddpm_lightning.models.unet.UNet", "init_args": {"ch": 32}}, "image_size": 8}
    stored |= {"in_channels": 1, "schedule": "cosine", "lr": 1e-3, "sampler": {"name": "ddim", "steps": 5}}
    from_checkpoint, changed = reconcile_model_settings({"lr": 2e-4, "schedule": "linear"}, stored, "x.ckpt")
    assert changed == []
    assert from_checkpoint["schedule"] == "cosine" and from_checkpoint["lr"] == 1e-3
    assert from_checkpoint["net"] == stored["net"] and from_checkpoint["image_size"] == 8


def test_a_checkpoint_without_padding_and_eps_resumes_only_with_its_own() -> None:
    args = {"in_channels": 1, "ch": 32, "ch_mult": [1, 2], "image_size": 8}
    stored = upgrade_hyperparameters({"net": {"class_path": "ddpm_lightning.models.unet.UNet", "init_args": args}})
    preset = {"class_path": "ddpm_lightning.models.UNet", "init_args": {**args, "downsample_padding": "same",
                                                                          "norm_eps": 1e-6}}  # fmt: skip
    with pytest.raises(ValueError) as error:
        reconcile_model_settings({"net": preset}, stored, "old.ckpt")
    assert "model.net.init_args.downsample_padding: checkpoint symmetric, given same" in str(error.value)
    assert "model.net.init_args.norm_eps: checkpoint 1e-05, given 1e-06" in str(error.value)
    own = {**preset, "init_args": {**preset["init_args"], "downsample_padding": "symmetric", "norm_eps": 1e-5}}
    assert reconcile_model_settings({"net": own}, stored, "old.ckpt")[1] == []


def test_a_preset_made_conditional_by_model_num_classes_resumes_and_a_changed_count_is_refused() -> None:
    # configs/demo_cond.yaml: the preset's U-Net has no num_classes; model.num_classes fills it into the checkpoint's
    preset = {"class_path": "ddpm_lightning.models.UNet", "init_args": {"ch": 32, "num_classes": None}}
    stored = {"net": {**preset, "init_args": {"ch": 32, "num_classes": 10}}, "num_classes": 10}
    assert reconcile_model_settings({"net": preset, "num_classes": 10}, stored, "x.ckpt") == ({}, [])
    with pytest.raises(ValueError, match="model.num_classes: checkpoint 10, given 5"):
        reconcile_model_settings({"net": preset, "num_classes": 5}, stored, "x.ckpt")


def test_activation_checkpointing_may_change_on_resume() -> None:
    spec = {"class_path": "ddpm_lightning.models.UNet", "init_args": {"ch": 32, "grad_checkpointing": False}}
    given = {**spec, "init_args": {"ch": 32, "grad_checkpointing": True}}
    assert reconcile_model_settings({"net": given}, {"net": spec}, "x.ckpt") == ({}, [])


# ------------------------------------------------------------------------------------------------ time budget
def test_resuming_a_spent_time_budget_says_so_and_exits_0(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained
    checkpoint = read_checkpoint(last(run_dir))
    checkpoint["callbacks"]["Timer"] = {"time_elapsed": {"train": 308.0, "sanity_check": 0.0}}
    torch.save(checkpoint, last(run_dir))
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit(run_dir, 100, "--trainer.max_time=00:00:05:00", "--ckpt_path=last"))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "0:05:08 of trainer.max_time=0:05:00" in out[0] and "budget is spent" in out[0]
    assert read_checkpoint(last(run_dir))["global_step"] == 2


def test_a_larger_max_time_trains_for_the_difference(trained: Path) -> None:
    run_dir = trained
    checkpoint = read_checkpoint(last(run_dir))
    checkpoint["callbacks"]["Timer"] = {"time_elapsed": {"train": 299.0, "sanity_check": 0.0}}
    torch.save(checkpoint, last(run_dir))
    main(tiny_fit(run_dir, -1, "--trainer.max_time=00:00:05:01", "--trainer.max_epochs=-1", "--ckpt_path=last"))
    checkpoint = read_checkpoint(last(run_dir))
    elapsed = checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert checkpoint["global_step"] > 2 and 301.0 <= elapsed < 305.0  # ~2 s more, not 5 minutes


# ------------------------------------------------------------------------------------------------ clear errors
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("--trainer.max_time=garbage", "trainer.max_time='garbage' is not a duration"),
        ("--trainer.max_time=00:00:xx:00", "is not a duration"),
        ("--trainer.accelerator=gpuu", "gpuu"),
        ("--trainer.devices=abc", "`devices`"),
        ("--trainer.max_steps=ten", "max_steps"),
        ("--trainer.precision=17", "precision"),
        ("--trainer.gradient_clip_val=big", "gradient_clip_val"),
    ],
)
def test_a_wrong_trainer_setting_is_a_clear_error(
    tmp_path: Path, setting: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit(tmp_path, 1, setting))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_parse_max_time_reads_lightnings_formats() -> None:
    assert parse_max_time("01:02:03:04").total_seconds() == 93784
    assert parse_max_time({"hours": 1}).total_seconds() == 3600
    assert parse_max_time(None) is None
    with pytest.raises(ValueError, match="'5 minutes' is not a duration"):
        parse_max_time("5 minutes")
