"""Exact resume under 2-process gloo DDP on the CPU: N steps, stop, N more equals 2N straight."""

from pathlib import Path

import pytest
import torch
from test_resume import STEPS_PER_EPOCH, fit_args, weights

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
