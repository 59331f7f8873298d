"""End to end through the ``ddpm`` command, in-process so the fake CIFAR-10's md5 patch applies."""

import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.integration
TINY = [
    "-c",
    "configs/cifar10.yaml",
    "-c",
    "configs/debug.yaml",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _fit(cifar10_dir: Path, run_dir: Path, *extra: str) -> None:
    main(["fit", *TINY, f"--data.init_args.data_dir={cifar10_dir}", f"--trainer.default_root_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fake_cifar10_dir) -> Path:
    """One tiny fit on the fake CIFAR-10 shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        from helpers import patch_cifar_md5

        patch_cifar_md5(mp, fake_cifar10_dir)
        _fit(fake_cifar10_dir, run_dir, "--trainer.max_steps=6")
    return run_dir


def _last(run_dir: Path) -> Path:
    (ckpt,) = run_dir.rglob("last.ckpt")
    return ckpt


def test_fit_writes_a_checkpoint_with_ema_and_raw_weights(trained_run):
    checkpoint = torch.load(_last(trained_run), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert set(ema) == set(raw) and all(k.startswith("net.") for k in ema)
    # the EMA lags the raw weights after a few steps of training
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert checkpoint["hyper_parameters"]["net"]["init_args"]["ch"] == 32


def test_sample_reads_the_checkpoint_back(trained_run, tmp_path):
    out = tmp_path / "samples"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt", str(_last(trained_run)), "--num", "5", "--out", str(out), "--seed", "3"])
    assert exit_info.value.code == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"]
    assert Image.open(out / "000000.png").size == (32, 32)
    # same seed, same images
    again = tmp_path / "again"
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(_last(trained_run)), "--num", "2", "--out", str(again), "--seed", "3"])
    assert (again / "000001.png").read_bytes() == (out / "000001.png").read_bytes()


def test_sample_takes_any_sampler_and_names_a_bad_step_count(trained_run, tmp_path, capsys):
    ckpt = str(_last(trained_run))  # T = 100 (configs/debug.yaml)
    for sampler in ("dpmpp_2m", "ddpm"):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--ckpt", ckpt, "--num", "2", "--out", str(tmp_path / sampler), "--sampler", sampler,
                  "--steps", "4", "--spacing", "quadratic"])  # fmt: skip
        assert exit_info.value.code == 0 and (tmp_path / sampler / "000001.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt", ckpt, "--num", "2", "--out", str(tmp_path / "bad"), "--sampler", "ddim",
              "--steps", "101"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "steps must be in [1, 100]" in capsys.readouterr().err


def test_predict_writes_one_png_per_global_index_and_says_where(trained_run, tmp_path, capsys):
    out = tmp_path / "samples"  # SampleWriter's default: <default_root_dir>/samples
    main(
        [
            "predict",
            *TINY,
            "-c",
            "configs/predict.yaml",
            "--data.init_args.num_predict=3",
            "--data.init_args.data_dir=/nonexistent",
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={_last(trained_run)}",
        ]
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert f"wrote 3 samples to {out}/ (000000.png ...)" in capsys.readouterr().out.splitlines()


# bf16: the paper's network with the config's gradient clipping; ~1 min on 2 CPU cores, so in the slow tier (the
# sync-free tests train a small network in bf16-mixed in the default tier)
@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)])
def test_paper_config_with_the_cosine_schedule_runs_fast_dev_run(cifar10_dir, tmp_path, precision, monkeypatch):
    fitted = []
    monkeypatch.setattr(DiffusionModule, "on_fit_end", lambda self: fitted.append(self), raising=False)
    main(
        [
            "fit",
            "-c",
            "configs/cifar10.yaml",
            "-c",
            "configs/schedule/cosine.yaml",
            f"--trainer.precision={precision}",
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            f"--data.init_args.data_dir={cifar10_dir}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    [module] = fitted
    assert module.trainer.global_step == 1 and module.trainer.precision == precision
    # one finite L_simple (about 1 at initialisation, eps ~ N(0, I)) and one Adam step taken, not skipped
    loss = float(module.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss) and 0.1 < loss < 10 and module.nonfinite_skips == 0
    [optimizer] = module.trainer.optimizers
    assert {int(state["step"]) for state in optimizer.state.values()} == {1}
    # Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2), s = 0.008
    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = torch.tensor([min(1 - f[t] / f[t - 1], 0.999) for t in range(1, T + 1)], dtype=torch.float64)
    torch.testing.assert_close(module.diffusion.betas.cpu(), betas, rtol=1e-10, atol=0)


def test_missing_data_is_one_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit) as exit_info:
        _fit(empty, tmp_path / "run")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and str(empty.resolve()) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--model.schedule=sigmoid", "sigmoid"),
        ("--model.lr=-1", "lr must be > 0"),
        ("--model.no_such_key=1", "no_such_key"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, tmp_path / "run", option)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# Lightning's and jsonargparse's messages about their own internals, harmless for a user: ddpm fit silences them at
# their source (by message and module, inside the command only)
HARMLESS = (r"isinstance\(treespec, LeafSpec\)", r"LightningCLI's args parameter", r"was deprecated in v4\.")


def test_fit_prints_none_of_the_known_harmless_warnings(cifar10_dir, tmp_path):
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(cifar10_dir, tmp_path, "--trainer.max_steps=2")
    finally:
        lightning_log.removeHandler(handler)
    shown = [str(w.message) for w in caught]  # without the filters every fit shows the first two
    for pattern in HARMLESS:
        assert not [m for m in shown if re.search(pattern, m)], pattern
    # Lightning's advertisements ("💡 Tip: ... try installing litlogger"), its other messages kept
    assert any("GPU available" in m for m in logged) and not [m for m in logged if "Tip:" in m]
