"""Exact resume under 2-process gloo DDP on the CPU: N steps, stop, N more equals 2N straight."""

from pathlib import Path

import pytest
import torch
from helpers import STEPS_PER_EPOCH, fit_args, weights

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

DDP = ("--trainer.devices=2", "--trainer.strategy=ddp_spawn", "--data.batch_size=8")


def test_ddp_resume_with_ckpt_path_last_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    n = STEPS_PER_EPOCH
    main(fit_args(tmp_path / "straight", 2 * n, *DDP))
    main(fit_args(tmp_path / "resumed", n, *DDP))
    main(fit_args(tmp_path / "resumed", 2 * n, *DDP, "--ckpt_path=last"))

    checkpoint = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 * n
    assert len(checkpoint["rng_states"]) == 2  # one per process
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ddp_resume_in_the_middle_of_an_epoch_matches_an_uninterrupted_run(tmp_path: Path, num_workers: int) -> None:
    # epochs of 4 steps, a stop after 1.5 epochs (N = 6), each process continuing its own shard
    epoch = ("--trainer.limit_train_batches=4", f"--data.num_workers={num_workers}")
    n = 6
    main(fit_args(tmp_path / "straight", 2 * n, *DDP, *epoch))
    main(fit_args(tmp_path / "resumed", n, *DDP, *epoch))
    main(fit_args(tmp_path / "resumed", 2 * n, *DDP, *epoch, "--ckpt_path=last"))

    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 2 * n
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_a_mid_epoch_resume_with_another_world_size_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(fit_args(tmp_path, 2, *DDP))  # 2 of 3 batches of the epoch
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, 4, "--data.batch_size=8", "--ckpt_path=last"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "2 processes and a global batch size of 8; this run has 1 and 8" in err
