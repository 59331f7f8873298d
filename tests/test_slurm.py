"""The SLURM training script on a fresh clone: its log folder exists, and a fake srun reaches `ddpm fit` with one
process per task."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
pytestmark = pytest.mark.unit


def test_the_log_goes_to_a_folder_that_a_fresh_clone_has():
    # SLURM opens --output before the script runs and creates no folder: one that git ignores would not exist
    output = re.search(r"^#SBATCH --output=(\S+)", SCRIPT.read_text(), re.M).group(1)
    folder = Path(output).parent
    assert folder == Path(".") or subprocess.run(["git", "ls-files", str(folder)], cwd=REPO, capture_output=True,
                                                  text=True).stdout  # fmt: skip


def test_a_fake_srun_gets_ddpm_fit_with_the_tasks_per_node_as_devices(tmp_path: Path):
    record = tmp_path / "srun.args"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "3"}
    subprocess.run(["bash", str(SCRIPT), "--trainer.max_steps=10"], cwd=REPO, env=env, check=True)
    args = record.read_text().split("\n")
    assert args[:2] == ["ddpm", "fit"] and "--trainer.num_nodes=2" in args and "--trainer.devices=3" in args
    assert args[args.index("--ckpt_path") + 1] == "last" and "--trainer.max_steps=10" in args
