"""Never lose work: exact resume with `--ckpt_path last`, atomic checkpoint writes, clear errors for bad checkpoints."""

import warnings
from pathlib import Path

import pytest
import torch
from helpers import STEPS_PER_EPOCH, fit_args, weights

from ddpm_lightning.checkpoint import AtomicCheckpointIO, read_checkpoint
from ddpm_lightning.cli import main

pytestmark = pytest.mark.integration


def test_resume_with_ckpt_path_last_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    n = STEPS_PER_EPOCH  # stop at an epoch boundary: plain DataLoaders cannot resume mid-epoch
    main(fit_args(tmp_path / "straight", 2 * n))
    main(fit_args(tmp_path / "resumed", n))
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == n
    main(fit_args(tmp_path / "resumed", 2 * n, "--ckpt_path=last"))

    checkpoint = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 * n
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 2 * n
    (states,) = checkpoint["rng_states"]  # one process
    assert set(states) == {"torch", "cuda", "numpy", "python"}
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(fit_args(tmp_path, 1, "--ckpt_path=last"))
    assert f"no last.ckpt in {tmp_path / 'checkpoints'} yet; starting a new run" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, path)

    def crash_after_half(obj: object, f, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_after_half)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, path)
    monkeypatch.undo()

    assert read_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(fit_args(tmp_path, 1))
    path = tmp_path / "checkpoints" / "last.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 100)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, 2, "--ckpt_path=last"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = {"truncated": "is corrupt or truncated", "garbage": "is a text file, not a checkpoint"}[damage]
    assert f"checkpoint {path} {expected}" in err


def test_resume_with_another_model_shape_names_the_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(fit_args(tmp_path, 1))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, 2, "--ckpt_path=last", "--model.ch=64"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "last.ckpt" in err and "model.net.init_args.ch: checkpoint 32, given 64" in err


def test_last_checkpoint_holds_the_final_step_between_periodic_saves(tmp_path: Path) -> None:
    # periodic saves every 3 steps write last.ckpt at step 3; the run ends at step 4, which must not be lost
    main(fit_args(tmp_path, STEPS_PER_EPOCH + 1))
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH + 1


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # Lightning's note on the copied file's folder
def test_a_last_checkpoint_copied_into_another_run_folder_is_continued_there(tmp_path: Path) -> None:
    import shutil

    n = STEPS_PER_EPOCH
    main(fit_args(tmp_path / "first", n))
    (tmp_path / "second" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "first" / "checkpoints" / "last.ckpt", tmp_path / "second" / "checkpoints" / "last.ckpt")
    main(fit_args(tmp_path / "second", 2 * n, "--ckpt_path=last"))
    folder = tmp_path / "second" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt beside a stale last.ckpt
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 2 * n
    assert read_checkpoint(tmp_path / "first" / "checkpoints" / "last.ckpt")["global_step"] == n


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_the_middle_of_an_epoch_matches_an_uninterrupted_run(tmp_path: Path, num_workers: int) -> None:
    # epochs of 4 steps, a stop after 1.5 epochs: the data order, the flips, dropout and the noise all continue
    epoch = ("--trainer.limit_train_batches=4", f"--data.num_workers={num_workers}")
    n = 6
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable")
        main(fit_args(tmp_path / "straight", 2 * n, *epoch))
        main(fit_args(tmp_path / "resumed", n, *epoch))
        main(fit_args(tmp_path / "resumed", 2 * n, *epoch, "--ckpt_path=last"))
    checkpoint = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 * n
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def _without_model_checkpoint(args: list[str]) -> list[str]:
    """``fit_args`` without its ModelCheckpoint and with Lightning's default logger: a config that lists neither."""
    return [
        a for a in args if "ModelCheckpoint" not in a and not a.startswith(("--trainer.callbacks.", "--trainer.logger"))
    ]


def test_without_a_model_checkpoint_last_ckpt_is_the_newest_state_and_the_logger_version_is_kept(
    tmp_path: Path,
) -> None:
    n = STEPS_PER_EPOCH
    main(_without_model_checkpoint(fit_args(tmp_path, n)))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == n  # written at the end of fit
    main(_without_model_checkpoint(fit_args(tmp_path, 2 * n, "--ckpt_path=last")))
    assert read_checkpoint(last)["global_step"] == 2 * n  # a resumed run updates it
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]


def test_a_signal_before_the_first_periodic_save_leaves_one_last_ckpt_that_the_resume_updates(tmp_path: Path) -> None:
    # ModelCheckpoint saves every 3 steps; SIGTERM during step 2 saves last.ckpt through it, so that its own save at
    # the end of fit does not write a last-v1.ckpt beside it, which the resume would update instead
    signal_at = '--trainer.callbacks+={"class_path": "helpers.SignalAt", "init_args": {"step": 2, "signal": "SIGTERM"}}'
    main(fit_args(tmp_path, 2 * STEPS_PER_EPOCH, signal_at))
    folder = tmp_path / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 2
    main(fit_args(tmp_path, 4, "--ckpt_path=last"))
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 4
