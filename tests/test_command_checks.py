"""Every long command checks its inputs (checkpoint, output folder, data, FID weights) before its first expensive step,
with one line naming the option."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_cli_error
from PIL import Image

from ddpm_lightning.cli import main

pytestmark = pytest.mark.integration
CKPT = Path(__file__).parent / "fixtures" / "legacy_digits8.ckpt"  # an unconditional 8x8 digits model, T = 100


def never(what: str):
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail(f"{what} before the inputs were checked")

    return fail


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("hello\nworld\n")
    return path


def test_a_folder_as_checkpoint_is_called_a_folder_and_a_run_folder_points_to_its_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    err = one_line_cli_error(["sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "s")], capsys)
    assert f"--ckpt {tmp_path} is a folder, not a checkpoint file" in err and "does not exist" not in err
    shutil.copy(CKPT, run / "checkpoints" / "last.ckpt")
    err = one_line_cli_error(["sample", "--ckpt", str(run), "--out", str(tmp_path / "s")], capsys)
    assert err.endswith(f"did you mean --ckpt {run / 'checkpoints' / 'last.ckpt'}?")


def test_a_text_file_as_checkpoint_is_called_a_text_file(a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_cli_error(["nll", "--ckpt", str(a_file)], capsys)
    assert err == f"ddpm: error: --ckpt {a_file} is a text file, not a checkpoint (it begins 'hello')"
    assert "torch.save" not in err


def test_sample_refuses_an_output_under_a_file_before_loading_the_model(
    a_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("ddpm_lightning.sampling.load_module", never("loaded"))
    err = one_line_cli_error(["sample", "--ckpt", str(CKPT), "--out", str(a_file / "samples")], capsys)
    assert f"--out {a_file / 'samples'}: {a_file} is a file" in err


def test_nll_refuses_an_unwritable_report_before_computing_the_bound(
    a_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("ddpm_lightning.evaluation.nll.bpd_of_images", never("computed the bound"))
    err = one_line_cli_error(["nll", "--ckpt", str(CKPT), "--out", str(a_file / "nll.json")], capsys)
    assert f"--out {a_file / 'nll.json'}" in err
    err = one_line_cli_error(["nll", "--ckpt", str(CKPT), "--data", str(a_file.parent / "none")], capsys)
    assert "is neither cifar10 nor digits nor a folder of images" in err


def test_nll_writes_its_report_beside_the_checkpoint_and_takes_a_folder_of_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(CKPT, ckpt)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(images / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    args = ["nll", "--ckpt", str(ckpt), "--data", str(images), "--split", "all", "--t-samples", "2", "--num", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert not (tmp_path / "nll.json").exists()
    report = json.loads((ckpt.parent / "last.nll.json").read_text())
    assert report["num_images"] == 5 and report["data"] == str(images)
    assert f"wrote {ckpt.parent / 'last.nll.json'}" in capsys.readouterr().out


def test_sampler_sweep_refuses_missing_fid_weights_before_training_the_classifier_or_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    sweep_module = sys.modules["ddpm_lightning.evaluation.sampler_sweep"]
    monkeypatch.setattr("ddpm_lightning.evaluation.inception_weights.find_cached_weights", lambda: None)
    monkeypatch.setattr("ddpm_lightning.evaluation.fidelity.find_cached_weights", lambda: None)
    monkeypatch.setattr(fidelity_inception, "FeatureExtractorInceptionV3", offline)
    monkeypatch.setattr(sweep_module.DigitScorer, "from_splits", never("trained the classifier"))
    monkeypatch.setattr(sweep_module, "generate", never("sampled"))
    sweep = ["sampler-sweep", "--ckpt", str(CKPT), "--data", "cifar10", "--steps", "10", "--out", str(tmp_path)]
    err = one_line_cli_error(sweep, capsys)
    assert "FID needs the Inception-v3 weights" in err and "pass it as `--weights PATH`" in err
    assert "feature_extractor_weights_path" not in err
    err = one_line_cli_error([*sweep, "--weights", str(tmp_path / "w.pth")], capsys)
    assert f"--weights '{tmp_path / 'w.pth'}'" in err


def test_guidance_sweep_and_ablate_refuse_an_output_under_a_file_before_any_work(
    a_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("ddpm_lightning.evaluation.guidance.load_module", never("loaded"))
    err = one_line_cli_error(["guidance-sweep", "--ckpt", str(CKPT), "--out", str(a_file / "guidance")], capsys)
    assert f"--out {a_file / 'guidance'}: {a_file} is a file" in err
    monkeypatch.setattr("ddpm_lightning.cli.ablate.fit", never("trained"))
    err = one_line_cli_error(["ablate", "-c", "configs/ablation/demo.yaml", "--out", str(a_file / "ablation")], capsys)
    assert f"--out {a_file / 'ablation'}: {a_file} is a file" in err
    err = one_line_cli_error(["ablate", "--collect", "--out", str(a_file.parent / "none")], capsys)
    assert "is not a folder" in err


def test_a_count_below_one_names_its_option_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ddpm_lightning.sampling.load_module", never("the checkpoint was loaded"))
    out = str(tmp_path / "s")
    err = one_line_cli_error(["sample", "--ckpt", str(CKPT), "--out", out, "--num", "0"], capsys)
    assert err == "ddpm: error: --num must be positive, got 0"
    err = one_line_cli_error(["evaluate", "--ckpt", str(CKPT), "--num", "10", "--batch-size", "-1"], capsys)
    assert err == "ddpm: error: --batch-size must be positive, got -1"


def test_steps_are_sampler_steps_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS sampler steps" in help_text and "heun makes 2N - 1 evaluations for N steps" in help_text
