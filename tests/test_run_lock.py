"""One `ddpm fit` at a time per run folder: a second live run into it is refused with one line and writes nothing;
the lock of a killed run does not block the next; only the run's first process (global rank 0) takes it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fit_args

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.cli.fit import RUN_LOCK, is_first_process

pytestmark = pytest.mark.integration

HOLD = "from ddpm_lightning import io; import sys, time; lock = io.lock_folder(sys.argv[1], sys.argv[2], ''); print('held', flush=True); time.sleep(600)"  # noqa: E501


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A live process holding the run folder's lock, as a running `ddpm fit` does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), RUN_LOCK], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_a_second_fit_into_a_folder_in_use_is_refused_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        before = _files(run)
        done = subprocess.run(
            [sys.executable, "-m", "ddpm_lightning.cli", *fit_args(run, 1)], capture_output=True, text=True
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert line.startswith(f"ddpm: error: {run} is in use by process {holder.pid} on ")
    assert "--trainer.default_root_dir" in line
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr  # the error and at most Lightning's seed line
    assert _files(run) == before  # no checkpoint, log or image


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # killed: no cleanup ran
    holder.wait()
    assert (tmp_path / RUN_LOCK).is_file()
    main(fit_args(tmp_path, 1))
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1
    main(fit_args(tmp_path, 2, "--ckpt_path=last"))  # released when the first fit returned
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environment", "first"),
    [
        ({}, True),
        ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),  # node 1's local rank 0 of a multi-node run
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning's launcher started
        ({"RANK": "3", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),  # torchrun
        ({"SLURM_PROCID": "2"}, False),  # srun
        ({"SLURM_PROCID": "0"}, True),
    ],
)
def test_only_the_first_process_of_a_run_takes_the_lock(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], first: bool
) -> None:
    for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert is_first_process() is first
