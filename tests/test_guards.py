"""Bad input gets a clear error naming the value and what is allowed; a NaN loss is skipped or stops the run."""

from pathlib import Path

import pytest
import torch
from helpers import fit_args

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main

pytestmark = pytest.mark.integration


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--model.schedule=quadratic", "quadratic"),
        ("--model.sampler=euler", "euler"),
        ("--model.num_timesteps=0", "num_timesteps must be a positive integer, got 0"),
        ("--model.lr=0", "lr must be > 0, got 0"),
        ("--model.lr=-0.001", "lr must be > 0, got -0.001"),
        ("--model.runtime.nonfinite_loss=ignore", "ignore"),
    ],
)
def test_bad_model_setting_is_named(tmp_path: Path, option: str, expected: str, capsys) -> None:
    assert expected in cli_error(fit_args(tmp_path, 1, option), capsys)


def test_data_that_does_not_fit_the_model_is_named(tmp_path: Path, capsys) -> None:
    err = cli_error(fit_args(tmp_path, 1, "--model.in_channels=3"), capsys)
    assert "1x16x16 images but the model expects 3x16x16" in err
    assert not (tmp_path / "checkpoints").exists()  # nothing half-written


def test_corrupt_cifar10_archive_is_named_through_the_cli(tmp_path: Path, capsys) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated gzip")
    args = fit_args(tmp_path / "run", 1, "--data=ddpm_lightning.data.CIFAR10DataModule", f"--data.data_dir={tmp_path}")
    err = cli_error([a for a in args if not a.startswith("--data.image_size")], capsys)
    assert "cifar-10-python.tar.gz" in err and "corrupt or incomplete" in err


@pytest.mark.ddp
@pytest.mark.slow
def test_batch_size_not_divisible_by_processes_is_named(tmp_path: Path, capsys) -> None:
    args = fit_args(tmp_path, 1, "--data.batch_size=5", "--trainer.devices=2", "--trainer.strategy=ddp_spawn")
    # every process raises it: the CLI prints it, or ddp_spawn re-raises a child's first
    with pytest.raises((SystemExit, Exception)) as info:
        main(args)
    message = f"{info.value} {capsys.readouterr().err}"
    assert "batch_size=5 is the global batch size and must be divisible by the world size (2 processes)" in message


@pytest.mark.parametrize("damage", ["missing", "truncated", "shape"])
def test_sample_from_a_bad_checkpoint_is_named(tmp_path: Path, damage: str, capsys) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    if damage != "missing":
        main(fit_args(tmp_path, 1))
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            checkpoint = torch.load(path, weights_only=True)
            checkpoint["hyper_parameters"]["net"]["init_args"]["ch"] = 64
            torch.save(checkpoint, path)
    err = cli_error(["sample", "--ckpt", str(path), "--num", "1", "--out", str(tmp_path / "out")], capsys)
    assert str(path) in err
    assert {"missing": "does not exist", "truncated": "corrupt or truncated", "shape": "does not fit"}[damage] in err
    assert not (tmp_path / "out").exists()


def inject_nan_at_step_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm_lightning.diffusion import GaussianDiffusion

    loss = GaussianDiffusion.training_loss
    calls = []

    def nan_once(self, model, x0, *args, **kwargs):
        calls.append(1)
        out = loss(self, model, x0, *args, **kwargs)
        return out * float("nan") if len(calls) == 3 and torch.is_grad_enabled() else out

    monkeypatch.setattr(GaussianDiffusion, "training_loss", nan_once)


def test_nan_loss_stops_naming_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    inject_nan_at_step_2(monkeypatch)
    err = cli_error(fit_args(tmp_path, 4), capsys)
    assert "the training loss is nan at step 2 and its gradients are not finite" in err
    assert "1 in all up to step 4" in err


def test_nan_loss_skip_counts_and_leaves_weights_finite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inject_nan_at_step_2(monkeypatch)
    skipped = "1 optimizer step skipped for non-finite gradients so far, the first at step 2"
    with pytest.warns(UserWarning, match=skipped):
        main(fit_args(tmp_path, 3, "--model.runtime.nonfinite_loss=skip"))
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["nonfinite_skips"] == 1
    assert checkpoint["global_step"] == 3  # Lightning counts the skipped batch as a step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_steps_skipped_by_float16_loss_scaling_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning makes no GradScaler on the CPU: the hook is driven with one, as under 16-mixed on a GPU
    from types import SimpleNamespace

    from ddpm_lightning.lit_module import DiffusionModule
    from ddpm_lightning.models import UNet

    net = UNet(in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8)
    module = DiffusionModule(net=net, num_timesteps=50)
    scaler = torch.amp.GradScaler("cpu")
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), global_step=3)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    optimizer = torch.optim.Adam(module.parameters())
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    module.guard.loss = torch.tensor(1.0)
    module.on_before_optimizer_step(optimizer)  # finite: not a skip
    next(module.parameters()).grad.fill_(float("inf"))
    module.guard.loss = torch.tensor(float("inf"))
    module.on_before_optimizer_step(optimizer)
    assert module.nonfinite_skips == 1
    assert next(module.parameters()).grad is not None  # the scaler decides the step itself
    module.guard.check(module)  # loss scaling expects skips: no NonFiniteLossError under "stop"
