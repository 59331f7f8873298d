"""The default callbacks of every `ddpm fit` are visible in the config, added to the callbacks a config lists, and
removable by name."""

import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from ddpm_lightning.callbacks import (
    EMA,
    FinalCheckpoint,
    GracefulStop,
    ImagesPerSecond,
    ProgressBar,
    RNGStates,
    WandbRunId,
    default_callbacks,
)
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.cli.fit import DDPMCLI, LogRunConfig, with_default_callbacks
from ddpm_lightning.lit_module import DiffusionModule

# OWN_CALLBACKS sets the deprecated model.ema_decay on purpose: its alias (the EMA callback's decay) is tested here
pytestmark = pytest.mark.filterwarnings("ignore:model.ema_decay=.* is deprecated:FutureWarning")
ALL = ["EMA", "RNGStates", "GracefulStop", "FinalCheckpoint", "ProgressBar", "ImagesPerSecond", "WandbRunId"]
# a config with trainer.callbacks of its own, as configs/demo.yaml, debug.yaml, ablation/*.yaml and callbacks/fid.yaml
OWN_CALLBACKS = """
seed_everything: 0
model:
  net:
    class_path: ddpm_lightning.models.UNet
    init_args: {image_size: 16, in_channels: 1, ch: 32, ch_mult: [1], num_res_blocks: 1, attn_resolutions: []}
  num_timesteps: 50
  lr_schedule: {warmup_steps: 2}
  ema_decay: 0.9
data:
  class_path: ddpm_lightning.data.EmbeddedDigitsDataModule
  init_args: {batch_size: 4, image_size: 16}
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 3, save_last: true, save_top_k: 0}
"""


class SignalAt(L.Callback):
    """Sends this process SIGTERM after optimizer step ``step``, as a cluster would: GracefulStop must stop the run."""

    def __init__(self, step: int = 4):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            # without a handler the signal would end the test process itself
            assert any(isinstance(c, GracefulStop) for c in trainer.callbacks), "no GracefulStop to handle SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)


def instantiate(tmp_path: Path, *args: str) -> L.Trainer:
    """The Trainer `ddpm fit -c <OWN_CALLBACKS config> ARGS` would train with (nothing is trained)."""
    config = tmp_path / "own_callbacks.yaml"
    config.write_text(OWN_CALLBACKS)
    with warnings.catch_warnings():
        # as run_cli: Lightning's CLI on jsonargparse >= 4.49, and its note on args given beside pytest's sys.argv
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated in v4\.", module=r"lightning\.pytorch\.cli")
        warnings.filterwarnings("ignore", message=r"(?s)\s*By default only one", module=r"lightning\.pytorch\.cli")
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter", module=r"lightning\.pytorch\.cli")
        cli = DDPMCLI(
            DiffusionModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            args=["-c", str(config), f"--trainer.default_root_dir={tmp_path}", *args],
            save_config_callback=LogRunConfig,
            auto_configure_optimizers=False,
            run=False,
        )
    return cli.trainer


def kinds(trainer: L.Trainer) -> list[type]:
    return [type(c) for c in trainer.callbacks]


@pytest.mark.unit
def test_default_callbacks_are_the_documented_list() -> None:
    assert [type(c) for c in default_callbacks(0.99)] == [
        EMA, RNGStates, GracefulStop, FinalCheckpoint, ProgressBar, ImagesPerSecond, WandbRunId,
    ]  # fmt: skip
    assert default_callbacks(0.99)[0].decay == 0.99
    assert EMA not in [type(c) for c in default_callbacks(0.0)]  # decay 0: no EMA
    assert ProgressBar not in [type(c) for c in default_callbacks(progress_bar=False)]


@pytest.mark.unit
def test_a_listed_callback_of_the_same_kind_replaces_the_default() -> None:
    own_ema, own_bar = EMA(0.5), TQDMProgressBar()
    callbacks = with_default_callbacks([own_ema, own_bar], ALL, ema_decay=0.9)
    assert [c for c in callbacks if isinstance(c, EMA)] == [own_ema]  # one EMA, the listed one
    assert [c for c in callbacks if isinstance(c, TQDMProgressBar)] == [own_bar]  # Lightning refuses two bars
    assert {RNGStates, GracefulStop, FinalCheckpoint, ImagesPerSecond, WandbRunId} <= {type(c) for c in callbacks}


@pytest.mark.integration
def test_print_config_shows_the_default_callbacks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["default_callbacks"] == ALL


@pytest.mark.integration
def test_print_config_shows_the_shape_the_model_takes_from_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo.yaml", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]  # the digits' 1x28x28, not null
    assert (model["image_size"], model["in_channels"]) == (28, 1)
    assert (model["net"]["init_args"]["image_size"], model["net"]["init_args"]["in_channels"]) == (28, 1)


@pytest.mark.integration
def test_a_config_with_its_own_callbacks_keeps_the_defaults(tmp_path: Path) -> None:
    trainer = instantiate(tmp_path, "--trainer.enable_progress_bar=true")
    assert {ModelCheckpoint, *map(type, default_callbacks(0.9))} <= set(kinds(trainer))
    (ema,) = [c for c in trainer.callbacks if isinstance(c, EMA)]
    assert ema.decay == 0.9  # model.ema_decay
    assert isinstance(trainer.progress_bar_callback, ProgressBar)


@pytest.mark.integration
def test_leaving_a_name_out_of_default_callbacks_removes_it(tmp_path: Path) -> None:
    trainer = instantiate(tmp_path, "--default_callbacks=[RNGStates, GracefulStop, FinalCheckpoint]")
    assert {RNGStates, GracefulStop, FinalCheckpoint, ModelCheckpoint} <= set(kinds(trainer))
    assert not {EMA, ImagesPerSecond, WandbRunId, ProgressBar} & set(kinds(trainer))
    assert EMA not in kinds(instantiate(tmp_path, "--model.ema_decay=0"))  # no EMA without a decay


@pytest.mark.integration
def test_a_config_with_its_own_callbacks_trains_with_ema_graceful_stop_and_final_checkpoint(tmp_path: Path) -> None:
    config = tmp_path / "own_callbacks.yaml"
    config.write_text(OWN_CALLBACKS)
    common = ["fit", "-c", str(config), "--trainer.max_steps=5"]
    # FinalCheckpoint: periodic saves every 3 steps, yet last.ckpt holds the final step 5
    main([*common, f"--trainer.default_root_dir={tmp_path / 'full'}"])
    checkpoint = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 5
    assert "current_model_state" in checkpoint  # the EMA: averaged weights in state_dict, raw ones beside them
    assert len(checkpoint["rng_states"]) == 1  # RNGStates
    # GracefulStop: SIGTERM after step 4 saves last.ckpt there and ends the run normally
    stopped = tmp_path / "stopped"
    main([*common, f"--trainer.default_root_dir={stopped}", "--trainer.callbacks+=test_default_callbacks.SignalAt"])
    assert read_checkpoint(stopped / "checkpoints" / "last.ckpt")["global_step"] == 4
    # without the EMA by name: the checkpoint holds only the raw weights
    main([*common, f"--trainer.default_root_dir={tmp_path / 'no_ema'}", "--default_callbacks=[FinalCheckpoint]"])
    assert "current_model_state" not in read_checkpoint(tmp_path / "no_ema" / "checkpoints" / "last.ckpt")


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval")
def test_the_step_bar_is_drawn_with_its_total_and_no_empty_bar_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from helpers import tiny, trainer

    data = torch.utils.data.DataLoader(torch.rand(8, 1, 8, 8) * 2 - 1, batch_size=4)
    trainer(tmp_path, 3, [], max_epochs=-1, num_sanity_val_steps=0).fit(tiny(), data)
    out = capsys.readouterr().out
    assert "Training steps" in out and "3/3" in out
    assert "0/?" not in out and "Training:" not in out
