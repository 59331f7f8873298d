"""SIGTERM / SIGUSR1 during training: the run writes last.ckpt, exits with status 0, and resumes from it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import fit_args

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main

pytestmark = pytest.mark.integration

MAX_STEPS = 10_000  # far more than the test waits for: only the signal ends the first run
ONE_EPOCH_NO_VALIDATION = ("--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=0")


def start_fit(run_dir: Path, *extra: str) -> subprocess.Popen:
    code = "import sys; from ddpm_lightning.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = fit_args(run_dir, MAX_STEPS, *ONE_EPOCH_NO_VALIDATION, *extra)
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_signal_saves_last_checkpoint_exits_cleanly_and_resumes(tmp_path: Path, signum: signal.Signals) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    process = start_fit(tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not last.exists():  # the periodic checkpoint (every 3 steps) shows that training runs
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    stopped_at = read_checkpoint(last)["global_step"]
    assert f"{signum.name}: saved {last} at step {stopped_at}" in stderr  # written by the signal, not periodically

    main(fit_args(tmp_path, stopped_at + 2, *ONE_EPOCH_NO_VALIDATION, "--ckpt_path=last"))  # resumed in-process
    assert read_checkpoint(last)["global_step"] == stopped_at + 2
