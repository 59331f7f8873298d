"""`make demo`: the demo config runs end to end and writes its report; the digit classifier's scores separate real
digits from noise."""

import itertools
import json
import math
import shlex
import signal as signal_module
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from helpers import CLASSIFIER_TEST_EPOCHS as TEST_EPOCHS
from helpers import SignalAt
from PIL import Image

from ddpm_lightning.callbacks import DemoReport
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.evaluation import digit_classifier
from ddpm_lightning.evaluation.digit_classifier import (
    class_entropy,
    frechet_distance,
    load_or_train_digit_classifier,
    score_digits,
)
from ddpm_lightning.sampling import load_module

pytestmark = pytest.mark.integration

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _classifier(digits: EmbeddedDigitsDataModule, cache: Path) -> tuple[digit_classifier.DigitClassifier, float, Path]:
    return load_or_train_digit_classifier(
        digits.split_arrays("train"), digits.split_arrays("val"), cache_dir=cache, epochs=TEST_EPOCHS
    )


def test_class_entropy_is_log10_for_all_digits_and_0_for_one() -> None:
    assert class_entropy(torch.arange(10).repeat(7)) == pytest.approx(math.log(10))
    assert class_entropy(torch.full((50,), 3)) == 0.0


def test_frechet_distance_matches_the_closed_form() -> None:
    # FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of the Gaussians fitted to each set, in float64; with
    # s = S1^(1/2), Tr (S1 S2)^(1/2) = Tr (s S2 s)^(1/2), the square root of a symmetric PSD matrix
    generator = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.3, 0.3]], dtype=torch.float64)
    features = torch.randn(60, 3, generator=generator, dtype=torch.float64) @ mix  # (N, D)
    reference = torch.randn(40, 3, generator=generator, dtype=torch.float64) + torch.tensor([1.0, 0.0, -2.0])
    (mu1, s1), (mu2, s2) = [(x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)) for x in (features, reference)]
    w, v = np.linalg.eigh(s1)
    s = (v * np.sqrt(w)) @ v.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(s @ s2 @ s)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(features, reference) == pytest.approx(expected, rel=1e-9)


def test_classifier_is_cached_and_reloaded_without_training(digits, classifier_cache: Path) -> None:
    model, accuracy, path = _classifier(digits, classifier_cache)
    assert path.parent == classifier_cache and path.name.startswith("digit_classifier-")
    with mock.patch.object(digit_classifier, "train_digit_classifier", side_effect=AssertionError("retrained")):
        again, again_accuracy, again_path = _classifier(digits, classifier_cache)
    x = digits.split_arrays("val")[0][:8]
    assert again_path == path and again_accuracy == accuracy
    assert torch.equal(model(x), again(x))


def test_scorer_separates_real_heldout_digits_from_noise(digits, classifier_cache: Path) -> None:
    model, accuracy, _ = _classifier(digits, classifier_cache)
    assert accuracy > 0.9
    val = digits.split_arrays("val")[0]
    half = len(val) // 2
    reference = model.features(val[:half]).detach()
    real = score_digits(model, val[half:], reference)
    noise = score_digits(model, torch.randn(half, 1, 32, 32, generator=torch.Generator().manual_seed(0)), reference)
    assert real["confident_share"] > 0.7
    # held-out digits cover all ten classes; noise falls into few of them (often confidently: the share alone is not
    # enough, which is why the entropy and the distance are reported beside it)
    assert real["class_entropy"] > 0.95 * math.log(10) > 0.5 > noise["class_entropy"]
    assert noise["frechet_distance"] > 20 * real["frechet_distance"]


def _demo(
    tmp_path: Path, classifier_cache: Path, *args: str, extra_callbacks: tuple[dict, ...] = (), **report: Any
) -> Path:
    """``ddpm fit -c configs/demo.yaml`` with its callbacks and network scaled down (``report``: DemoReport's
    settings to change further); returns the run folder."""
    argv, run = _demo_argv(tmp_path, classifier_cache, *args, extra_callbacks=extra_callbacks, **report)
    main(argv)
    return run


def _demo_argv(
    tmp_path: Path, classifier_cache: Path, *args: str, extra_callbacks: tuple[dict, ...] = (), **report: Any
) -> tuple[list[str], Path]:
    """The arguments of :func:`_demo`'s ``ddpm`` command and its run folder."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    sizes = {
        "SamplingCallback": {"every_n_steps": 2, "num_samples": 4, "sampler": {"name": "ddim", "steps": 3}},
        "DemoReport": {
            "num_samples": 4,
            "num_eval_samples": 16,
            "sampler": {"name": "ddim", "steps": 3, "autoguidance_scale": 2.0},
            "untrained_baseline": True,
            "unguided_baseline": True,
            "classifier_epochs": TEST_EPOCHS,
            "classifier_cache_dir": str(classifier_cache),
            **report,
        },
    }
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(sizes.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    tmp_path.mkdir(parents=True, exist_ok=True)
    override = tmp_path / "small.yaml"
    callbacks = [*config["trainer"]["callbacks"], *extra_callbacks]
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    run = tmp_path / "demo"
    argv = ["fit", "-c", str(DEMO_CONFIG), "-c", str(override), f"--trainer.default_root_dir={run}",
            "--trainer.enable_progress_bar=false", "--model.net.init_args.ch_mult=[1, 2]",
            "--model.net.init_args.attn_resolutions=[]",
            "--model.num_timesteps=100", *args]  # fmt: skip
    return argv, run


def test_demo_config_writes_every_report_file(tmp_path: Path, classifier_cache: Path, capsys) -> None:
    run = _demo(tmp_path, classifier_cache, "--trainer.max_steps=3", unguided_baseline=False)
    summary = capsys.readouterr().out
    for name in ("demo.ckpt", "samples.png", "chain.png", "loss.png", "metrics.json"):
        assert (run / name).is_file(), name
        assert str(run / name) in summary  # the report says where everything is
    size = load_module(run / "demo.ckpt", "cpu").image_shape[-1]
    assert Image.open(run / "samples.png").size == (2 * (size + 2) + 2,) * 2  # 2 x 2 grid
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3
    for row in ("trained", "untrained", "real_heldout"):
        assert set(metrics[row]) == {"confident_share", "class_entropy", "frechet_distance"}
    assert metrics["untrained"] != metrics["trained"]  # the initial weights, not the run's EMA
    assert "unguided" not in metrics and metrics["sampler"].endswith("-ag2")  # autoguided, no unguided row
    assert load_module(run / "demo.ckpt", "cpu").hparams.in_channels == 1


@pytest.mark.parametrize("size", [28, 32])
def test_the_report_scores_native_28_pixel_digits_and_padded_32_pixel_ones(tmp_path, classifier_cache, size):
    run = _demo(tmp_path, classifier_cache, "--trainer.max_steps=2", f"--data.init_args.image_size={size}",
                f"--model.image_size={size}")  # fmt: skip
    assert Image.open(run / "samples.png").size == (2 * (size + 2) + 2,) * 2
    metrics = json.loads((run / "metrics.json").read_text())
    # the classifier sees 28-pixel digits with the 32-pixel data's border: real digits score the same either way
    assert metrics["real_heldout"]["confident_share"] > 0.7 and metrics["steps"] == 2


def test_the_demo_trains_a_fixed_number_of_steps_however_slow_the_clock(tmp_path, classifier_cache) -> None:
    trainer = yaml.safe_load(DEMO_CONFIG.read_text())["trainer"]
    assert trainer["max_steps"] > 0 and trainer.get("max_time") is None  # DEMO_STEPS, not a wall-clock budget
    hours = itertools.count(0, 3600.0)  # every reading of the clocks: one hour later
    slow_clock = mock.Mock(monotonic=lambda: next(hours), perf_counter=lambda: next(hours))
    # make demo DEMO_TIME=...: a TrainingBudget that fixes the step count from the run's own rate
    make = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", "DEMO_TIME=00:00:30:00"],
        cwd=DEMO_CONFIG.parents[1], capture_output=True, text=True,
    )  # fmt: skip
    fit = next(line for line in make.stdout.splitlines() if "ddpm fit" in line)
    budget = next(arg for arg in shlex.split(fit) if "TrainingBudget" in arg)
    assert '"seconds": "00:00:30:00"' in budget
    with (
        mock.patch("lightning.pytorch.callbacks.timer.time", slow_clock),
        mock.patch("ddpm_lightning.callbacks.budget.time", slow_clock),
    ):
        steps = json.loads(
            (_demo(tmp_path / "a", classifier_cache, "--trainer.max_steps=4") / "metrics.json").read_text()
        )
        timed = _demo(tmp_path / "b", classifier_cache, "--trainer.max_steps=-1", budget)
    assert steps["steps"] == 4
    assert json.loads((timed / "metrics.json").read_text())["steps"] < 4  # DEMO_TIME: the clock decides


def test_a_resumed_demo_continues_from_the_newest_state_and_reports_the_whole_run(tmp_path, classifier_cache) -> None:
    argv, run = _demo_argv(tmp_path, classifier_cache, untrained_baseline=False, unguided_baseline=False)
    ddpm = [sys.executable, "-m", "ddpm_lightning.cli", *argv]
    subprocess.run([*ddpm, "--trainer.max_steps=2"], capture_output=True, text=True, check=True)
    # a demo that ends normally leaves last.ckpt beside demo.ckpt: --ckpt_path last continues it
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    first = json.loads((run / "metrics.json").read_text())

    done = subprocess.run([*ddpm, "--trainer.max_steps=4", "--ckpt_path=last"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "starting a new run" not in done.stdout
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4  # updated at the end
    metrics = json.loads((run / "metrics.json").read_text())
    # the report covers the whole run; its rate is that of the 2 steps this process ran
    assert (metrics["steps"], metrics["steps_this_run"]) == (4, 2)
    assert metrics["train_time_s"] > first["train_time_s"]
    assert "demo: 4 steps in" in done.stdout and "(2 in this run: " in done.stdout
    # loss.png plots the losses of both processes, kept in the checkpoints
    losses = read_checkpoint(run / "demo.ckpt")["callbacks"]["DemoReport"]["losses"]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == ["version_0"]  # one logger version


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_demo_writes_last_ckpt_and_ends_with_the_report(tmp_path, classifier_cache, name) -> None:
    at = {
        "class_path": f"{SignalAt.__module__}.SignalAt",
        "init_args": {"step": 2, "signal": name},
    }  # the step finishes
    before = signal_module.getsignal(signal_module.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    run = _demo(tmp_path, classifier_cache, "--trainer.max_steps=50", extra_callbacks=(at,))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert signal_module.getsignal(signal_module.SIGINT) is before  # handler restored


def test_the_demo_autoguides_with_its_own_early_checkpoint(tmp_path, classifier_cache) -> None:
    run = _demo(tmp_path, classifier_cache, "--trainer.max_steps=4")
    metrics = json.loads((run / "metrics.json").read_text())
    guide_ckpt = run / "checkpoints" / "guide.ckpt"
    assert metrics["guide_ckpt"] == str(guide_ckpt) and metrics["sampler"].endswith("-ag2")
    assert torch.load(guide_ckpt, weights_only=True)["global_step"] == 1  # GuideCheckpoint: 30% of the run
    # the unguided row samples the same seeds without the guide: the step-1 guide changes the samples
    assert metrics["unguided"]["frechet_distance"] != metrics["trained"]["frechet_distance"]


def test_a_run_stopped_before_the_guide_step_reports_unguided_samples(tmp_path, classifier_cache, capsys) -> None:
    at = {"class_path": f"{SignalAt.__module__}.SignalAt", "init_args": {"step": 2, "signal": "SIGINT"}}
    run = _demo(tmp_path, classifier_cache, "--trainer.max_steps=50", extra_callbacks=(at,))  # the guide at step 15
    metrics = json.loads((run / "metrics.json").read_text())
    assert "guide_ckpt" not in metrics and "unguided" not in metrics and not metrics["sampler"].endswith("-ag2")
    assert "the samples are unguided" in capsys.readouterr().out


def test_the_report_refuses_autoguidance_without_a_guide(tmp_path) -> None:
    with pytest.raises(ValueError, match="autoguidance needs both"):
        DemoReport(sampler={"name": "ddim", "steps": 3, "autoguidance_scale": 2.0})
    trainer = mock.Mock(datamodule=EmbeddedDigitsDataModule(), callbacks=[], default_root_dir=str(tmp_path))
    trainer.checkpoint_callbacks = []
    report = DemoReport(sampler={"name": "ddim", "steps": 3, "autoguidance_scale": 2.0}, guide_ckpt="guide.ckpt")
    with pytest.raises(ValueError, match="no GuideCheckpoint"):  # before the first step, not after training
        report.setup(trainer, mock.Mock(**{"diffusion.num_timesteps": 100}), "fit")


def test_demo_report_refuses_other_data() -> None:
    trainer = mock.Mock(datamodule=object())
    with pytest.raises(ValueError, match="EmbeddedDigitsDataModule"):
        DemoReport().setup(trainer, mock.Mock(), "fit")


@pytest.mark.slow
def test_full_recipe_classifier_beats_97_percent(digits, tmp_path: Path) -> None:
    _, accuracy, _ = load_or_train_digit_classifier(
        digits.split_arrays("train"), digits.split_arrays("val"), cache_dir=tmp_path
    )
    assert accuracy > 0.97


@pytest.mark.unit
def test_the_report_names_no_make_variable_and_no_none_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """Inside `ddpm ablate` there is no DEMO_STEPS, and `--trainer.max_steps=0` times no step."""
    report = DemoReport()
    report._train_start = 0.0
    for max_steps in (1100, -1):
        trainer = mock.Mock(max_steps=max_steps, global_step=20)
        with mock.patch("time.perf_counter", return_value=10.0):
            line = report._eta_line(trainer)
        assert "DEMO_" not in line and "2.00 " in line and "steps/s" in line
    scores = {"confident_share": 0.0, "class_entropy": 0.0, "frechet_distance": 1.0}
    metrics = {"steps": 0, "train_time_s": 0.0, "steps_per_s": None, "device": "cpu", "torch_threads": 1,
               "trained": scores, "real_heldout": scores, "sampler": "DDIM 25 steps"}  # fmt: skip
    DemoReport._print_summary(Path("run"), Path("run/demo.ckpt"), metrics)
    out = capsys.readouterr().out
    assert "demo: 0 steps in 0 s (no step timed on cpu, 1 threads)" in out and "None" not in out
