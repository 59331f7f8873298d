"""Tracking: W&B (offline) and TensorBoard runs in the run folder, run metadata, img/s, and W&B run-id resume."""

import math
import struct
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
import yaml
from jsonargparse import Namespace
from PIL import Image

from ddpm_lightning.callbacks import tracking
from ddpm_lightning.cli import fit as cli_fit
from ddpm_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_FIT = """
seed_everything: 0
model:
  net:
    class_path: ddpm_lightning.models.UNet
    init_args: {ch: 32, ch_mult: [1], num_res_blocks: 1, attn_resolutions: []}
  num_timesteps: 100
  lr_schedule: {warmup_steps: 2}
  sampler: {name: ddim, steps: 5}
data:
  class_path: ddpm_lightning.data.EmbeddedDigitsDataModule
  init_args: {batch_size: 8, image_size: 16}
trainer: {accelerator: cpu, devices: 1, max_steps: 2, limit_val_batches: 1, val_check_interval: 2,
          log_every_n_steps: 1, enable_progress_bar: false, enable_model_summary: false,
          callbacks: [{class_path: ddpm_lightning.callbacks.EMA, init_args: {decay: 0.9}}]}
"""


def _fit(args: list[str]) -> None:
    try:
        main(["fit", *args])
    except SystemExit as exit_:  # LightningCLI exits only on errors
        raise AssertionError(f"ddpm fit exited with {exit_.code}") from None


def _wandb_records(path: Path) -> list:
    """Records of an offline run's .wandb file: a ':W&B' header, then a LevelDB log (32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _history(records: list) -> list[dict[str, str]]:
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step fit logging to offline W&B and TensorBoard (with sample grids), then the same run resumed to 3 steps."""
    tmp = tmp_path_factory.mktemp("wandb")
    loggers = [
        yaml.safe_load((CONFIGS / f"logger/{name}.yaml").read_text())["trainer"]["logger"]
        for name in ("wandb", "tensorboard")
    ]
    (tmp / "fit.yaml").write_text(TINY_FIT)
    sampling = {
        "class_path": "ddpm_lightning.callbacks.SamplingCallback",
        "init_args": {
            "every_n_steps": 2,
            "num_samples": 4,
            "chain_samples": 1,
            "sampler": {"name": "ddim", "steps": 2},
            "on_train_end": False,
        },
    }
    (tmp / "loggers.yaml").write_text(yaml.safe_dump({"trainer": {"logger": loggers, "callbacks": [sampling]}}))
    run_dir = tmp / "run"
    common = ["-c", str(tmp / "fit.yaml"), "-c", str(tmp / "loggers.yaml"), "--trainer.default_root_dir", str(run_dir)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
        mp.setenv("WANDB_SILENT", "true")
        _fit(common)
        wandb.teardown()  # stops W&B's service process, which writes out the rest of the run file
        (first,) = run_dir.glob("wandb/offline-run-*/*.wandb")
        (ckpt,) = run_dir.rglob("*step=2.ckpt")
        _fit([*common, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)])
        wandb.teardown()
    (second,) = set(run_dir.glob("wandb/offline-run-*/*.wandb")) - {first}
    return {
        "run_dir": run_dir,
        "first": _wandb_records(first),
        "first_files": first.parent / "files",
        "second": _wandb_records(second),
        "ckpt": ckpt,
    }


def _run_id(records: list) -> str:
    return next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")


@pytest.mark.integration
def test_offline_wandb_run_in_run_folder_logs_loss_and_throughput(wandb_runs: dict) -> None:
    history = _history(wandb_runs["first"])
    losses = [float(h["train/loss"]) for h in history if "train/loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert all(float(h["train/img_per_sec"]) > 0 for h in history if "train/loss" in h)
    assert any("val/loss" in h for h in history)


@pytest.mark.integration
def test_wandb_history_holds_the_sample_grid_as_uint8_pixels(wandb_runs: dict) -> None:
    import json

    grids = [h for h in _history(wandb_runs["first"]) if "samples/ddim2_grid/filenames" in h]
    assert [h["trainer/global_step"] for h in grids] == ["2"]  # one grid, at step 2
    (filename,) = json.loads(grids[0]["samples/ddim2_grid/filenames"])
    logged = np.array(Image.open(wandb_runs["first_files"] / filename))
    (saved,) = (wandb_runs["run_dir"] / "samples").glob("step_0000002_ddim2_grid.png")
    # the callback's own PNG of the uint8 grid: W&B holds the same pixels (float images would come out black)
    assert np.array_equal(logged, np.array(Image.open(saved)))
    assert logged.std() > 0


@pytest.mark.integration
def test_wandb_run_config_holds_resolved_config_git_commit_and_versions(wandb_runs: dict) -> None:
    import json

    config = {
        item.key: json.loads(item.value_json)
        for r in wandb_runs["first"]
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["config"]["model"]["num_timesteps"] == 100  # the resolved config of this run
    assert config["config"]["trainer"]["default_root_dir"] == str(wandb_runs["run_dir"])
    assert config["versions"]["torch"] == metadata.version("torch")
    assert config["git_commit"] == cli_fit.git_commit()


@pytest.mark.integration
def test_checkpoint_keeps_the_wandb_run_id_and_resume_continues_that_run(wandb_runs: dict) -> None:
    first_id = _run_id(wandb_runs["first"])
    assert tracking.read_wandb_run_id(wandb_runs["ckpt"]) == first_id
    assert wandb_runs["ckpt"].is_relative_to(wandb_runs["run_dir"])  # checkpoints follow the run folder
    assert _run_id(wandb_runs["second"]) == first_id
    steps = [int(h["trainer/global_step"]) for h in _history(wandb_runs["second"]) if "train/loss" in h]
    assert steps == [2]  # the resumed fit goes on from step 2 in the same run


@pytest.mark.integration
def test_tensorboard_event_file_in_run_folder_holds_the_scalars(wandb_runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_file = min((wandb_runs["run_dir"] / "tensorboard").rglob("events.out.tfevents*"))  # the first fit's
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert {"train/loss", "train/img_per_sec", "val/loss"} <= set(events.Tags()["scalars"])
    assert "samples/ddim2_grid" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]


@pytest.mark.unit
def test_images_per_second_is_global_images_over_elapsed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 10.5, 11.0, 11.5, 12.0])  # one batch every 0.5 s
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: next(clock))
    logged: list[float] = []
    module = SimpleNamespace(log=lambda key, value, **kwargs: logged.append(value))
    trainer = SimpleNamespace(log_every_n_steps=2, world_size=2, global_step=0)
    callback = tracking.ImagesPerSecond()
    callback.on_train_start(trainer, module)
    batch = (torch.zeros(8, 1, 4, 4), torch.zeros(8))
    callback.on_train_batch_start(trainer, module, batch, 0)
    for i in range(4):
        trainer.global_step = i + 1
        callback.on_train_batch_end(trainer, module, None, batch, i)
    # 8 images x 2 processes per 0.5 s = 32 img/s, over a window of at most 2 batches; logged at steps 2 and 4 only
    assert logged == pytest.approx([32.0, 32.0])


@pytest.mark.unit
def test_logger_save_dir_follows_the_run_folder_unless_set() -> None:
    def entry(name: str, save_dir: str | None) -> Namespace:
        return Namespace(class_path=f"lightning.pytorch.loggers.{name}", init_args=Namespace(save_dir=save_dir))

    loggers = [entry("WandbLogger", "."), entry("CSVLogger", "${trainer.default_root_dir}"), entry("CSVLogger", "/x")]
    trainer = Namespace(default_root_dir="runs/exp1", logger=loggers)
    cli_fit.follow_run_dir(trainer)
    assert [e.init_args.save_dir for e in loggers] == ["runs/exp1", "runs/exp1", "/x"]
