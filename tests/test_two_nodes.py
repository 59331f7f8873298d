"""A two-node run on one CPU machine: two `ddpm fit` launched with the environment a multi-node job gives (node rank,
world size, master address and port on localhost; 2 nodes x 1 process, gloo), on the demo config with the FID and
sampling callbacks on. The run folder gets one set of files, written by global rank 0 only; the FID is the
one-process value; a run interrupted by a signal and resumed with `--ckpt_path last` ends with the step count and
weights of an uninterrupted one."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CLASSIFIER_TEST_EPOCHS
from helpers import weights as last_weights

from ddpm_lightning.checkpoint import read_checkpoint

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.timeout(1800)]

TESTS = Path(__file__).resolve().parent
DEMO_CONFIG = TESTS.parent / "configs" / "demo.yaml"
NODES = ("--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp", "--trainer.accelerator=cpu")


def _small_config(folder: Path, classifier_cache: Path) -> Path:
    """The demo's callbacks scaled down, plus FIDCallback with the tests' tiny feature extractor."""
    callbacks = yaml.safe_load(DEMO_CONFIG.read_text())["trainer"]["callbacks"]
    sizes = {
        "SamplingCallback": {"every_n_steps": 2, "num_samples": 4, "sampler": {"name": "ddim", "steps": 3}},
        "DemoReport": {"num_samples": 4, "num_eval_samples": 16, "sampler": {"name": "ddim", "steps": 3,
                       "autoguidance_scale": 2.0}, "classifier_epochs": CLASSIFIER_TEST_EPOCHS,
                       "classifier_cache_dir": str(classifier_cache)},
    }  # fmt: skip
    for callback in callbacks:
        callback.setdefault("init_args", {}).update(sizes.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    fid = {
        "class_path": "ddpm_lightning.callbacks.FIDCallback",
        "init_args": {"every_n_steps": None, "num_samples": 10, "batch_size": 5, "sampler": {"name": "ddim",
                      "steps": 3}, "num_real": 40, "cache_dir": str(folder / "fid_cache"),
                      "feature_extractor": {"class_path": "helpers.TinyExtractor", "init_args": {"channels": 1}}},
    }  # fmt: skip
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [*callbacks, fid]}}))
    return path


def _argv(run: Path, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ddpm_lightning.cli", "fit", "-c", str(DEMO_CONFIG), "-c", str(config),
            f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=2", "--model.net.init_args.ch_mult=[1, 2]",
            "--model.net.init_args.attn_resolutions=[]", "--model.num_timesteps=100", *args]  # fmt: skip


def _environment() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(argv: list[str]) -> list[subprocess.CompletedProcess]:
    """``argv`` launched twice, as node 0 and node 1 of a 2-node job with one process per node."""
    port = str(_free_port())
    nodes = []
    for node in (0, 1):
        env = {**_environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
               "NODE_RANK": str(node), "LOCAL_RANK": "0"}  # fmt: skip
        nodes.append(subprocess.Popen([*argv, *NODES], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    done = []
    for process in nodes:
        out, err = process.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
        assert process.returncode == 0, err
    return done


def _one_process(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([*argv, "--trainer.accelerator=cpu"], env=_environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def _files(run: Path) -> list[str]:
    """The run folder's files; a TensorBoard event file's name holds the host, process id and time."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(run))) for p in run.rglob("*"))


def _logged_fid(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run / "lightning_logs").iterdir()
    events = EventAccumulator(str(version))
    events.Reload()
    (fid,) = events.Scalars("val/fid")
    return fid.value


def test_two_nodes_write_one_set_of_files_and_the_fid_of_one_process(tmp_path: Path, classifier_cache: Path) -> None:
    config = _small_config(tmp_path, classifier_cache)
    # a learning rate too small to move a float32 weight: both runs end with the same model, so the FIDs compare
    # the evaluation alone (the two runs' gradients differ: each process draws its own t and eps)
    frozen = ("--trainer.max_steps=4", "--model.lr=1e-30")
    _one_process(_argv(tmp_path / "one", config, *frozen))
    node0, node1 = _two_nodes(_argv(tmp_path / "two", config, *frozen))

    assert _files(tmp_path / "two") == _files(tmp_path / "one")  # one version folder, one lock, one report
    assert "demo: 4 steps" in node0.stdout and "demo:" not in node1.stdout  # node 1 wrote no report
    assert "in use by" not in node1.stderr  # the run's own processes do not refuse each other
    fid1, fid2 = _logged_fid(tmp_path / "one"), _logged_fid(tmp_path / "two")
    assert "2 processes" in node0.stderr + node0.stdout
    assert abs(fid2 - fid1) <= 1e-4 * abs(fid1)
    checkpoint = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and len(checkpoint["rng_states"]) == 2


def test_an_interrupted_two_node_run_resumes_to_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, classifier_cache: Path
) -> None:
    config = _small_config(tmp_path, classifier_cache)
    _two_nodes(_argv(tmp_path / "straight", config, "--trainer.max_steps=6"))
    at = '{"class_path": "helpers.SignalAt", "init_args": {"step": 2, "signal": "SIGTERM"}}'
    _two_nodes(_argv(tmp_path / "resumed", config, "--trainer.max_steps=6", f"--trainer.callbacks+={at}"))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2  # stopped by the signal, after step 2
    _two_nodes(_argv(tmp_path / "resumed", config, "--trainer.max_steps=6", "--ckpt_path=last"))

    assert read_checkpoint(last)["global_step"] == 6
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    # the resume added no version folder (each launch adds its TensorBoard event file to the same one)
    assert set(_files(tmp_path / "resumed")) == set(_files(tmp_path / "straight"))
