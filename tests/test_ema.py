"""The EMA as one visible callback behind the averaging interface, and post-hoc EMA (Karras et al. 2024, EDM2):
the power-function EMA against its formula, the profiles' inner products, the reconstruction, resume and the CLI."""

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from ddpm_lightning.averaging import WeightAverage
from ddpm_lightning.callbacks import EMA, PostHocEMA
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.cli.fit import DDPMCLI, LogRunConfig
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.posthoc import (
    power_beta,
    power_profile_inner,
    reconstruct_posthoc_ema,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)
from ddpm_lightning.sampling import load_module

TINY = {"in_channels": 1, "ch": 32, "ch_mult": (1,), "num_res_blocks": 1, "image_size": 8, "attn_resolutions": ()}


class Holder(nn.Module):
    """Stands in for a DiffusionModule in the update tests: a ``net`` of a few float64 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3).double()


# ------------------------------------------------------------------------------------------------ the maths
@pytest.mark.unit
@pytest.mark.parametrize(("sigma_rel", "edm2_gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_gamma_solves_the_sigma_rel_relation(sigma_rel: float, edm2_gamma: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    # EDM2 Eq. 2: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)); EDM2 quotes gamma 16.97 and 6.94
    assert sigma_rel**2 == pytest.approx((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)), rel=1e-12)
    assert gamma == pytest.approx(edm2_gamma, abs=5e-3)


@pytest.mark.unit
def test_a_sigma_rel_with_no_power_function_ema_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0\.2887\).*got 0\.3"):
        sigma_rel_to_gamma(0.3)


@pytest.mark.unit
def test_the_power_function_ema_update_matches_its_closed_form_in_float64() -> None:
    torch.manual_seed(0)
    callback = PostHocEMA(sigma_rels=(0.05, 0.10))
    trained = Holder()
    callback._averages = [Holder(), Holder()]  # what setup makes from a module, here without a Trainer
    weights = []
    for t in range(1, 41):
        with torch.no_grad():
            for p in trained.net.parameters():
                p.copy_(torch.randn_like(p))
        weights.append(torch.cat([p.detach().flatten() for p in trained.net.parameters()]).clone())
        callback.update(trained, t)
    thetas = torch.stack(weights)  # (t, P)
    for average, gamma in zip(callback._averages, callback.gammas, strict=True):
        # beta_t = (1 - 1/t)^(g + 1) telescopes: theta_hat_t = sum_tau (tau^(g+1) - (tau-1)^(g+1)) theta_tau / t^(g+1)
        tau = torch.arange(1, 41, dtype=torch.float64)
        w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 40 ** (gamma + 1)
        expected = (w[:, None] * thetas).sum(0)
        got = torch.cat([p.flatten() for p in average.net.parameters()])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert power_beta(1, callback.gammas[0]) == 0.0  # the first update copies the weights


@pytest.mark.unit
def test_the_profile_inner_product_matches_numerical_integration() -> None:
    def profile(tau: torch.Tensor, t: float, gamma: float) -> torch.Tensor:
        return (gamma + 1) * tau**gamma / t ** (gamma + 1)  # on [0, t], 0 after

    for t_a, g_a, t_b, g_b in [(100.0, 16.97, 300.0, 6.94), (300.0, 6.94, 100.0, 16.97), (200.0, 3.0, 200.0, 6.0)]:
        tau = torch.linspace(0, min(t_a, t_b), 1_000_001, dtype=torch.float64)  # where both profiles are nonzero
        numeric = torch.trapezoid(profile(tau, t_a, g_a) * profile(tau, t_b, g_b), tau)
        closed = power_profile_inner(torch.tensor(t_a), torch.tensor(g_a), torch.tensor(t_b), torch.tensor(g_b))
        assert float(closed) == pytest.approx(float(numeric), rel=1e-6)


@pytest.mark.unit
def test_an_untracked_sigma_rel_is_reconstructed_from_the_snapshots_of_two_others() -> None:
    """A noisy, drifting trajectory (as SGD's); 0.05 and 0.10 snapshotted every 50 of 2000 steps, 0.07 tracked
    directly: the reconstruction is within 0.1% of the distance between the tracked profiles."""
    generator = torch.Generator().manual_seed(0)
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10, 0.07)]
    theta = torch.zeros(64, dtype=torch.float64)
    drift = torch.randn(64, dtype=torch.float64, generator=generator)
    averages = [torch.zeros(64, dtype=torch.float64) for _ in gammas]
    snapshots = []
    for t in range(1, 2001):
        theta = theta + 0.01 * torch.randn(64, dtype=torch.float64, generator=generator) + 0.001 * drift
        for average, gamma in zip(averages, gammas, strict=True):
            average.lerp_(theta, 1 - power_beta(t, gamma))
        if t % 50 == 0:
            snapshots += [(t, gamma, average.clone()) for average, gamma in zip(averages[:2], gammas[:2], strict=True)]
    x = solve_posthoc_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots], 2000, gammas[2])
    reconstructed = sum(float(xi) * s[2] for xi, s in zip(x, snapshots, strict=True))
    spread = (averages[2] - averages[0]).abs().max()
    assert (reconstructed - averages[2]).abs().max() < 1e-3 * spread


# ------------------------------------------------------------------------------------------------ the interface
@pytest.mark.unit
def test_sampling_asks_the_registered_average() -> None:
    module, other = (
        DiffusionModule(net=UNet(**TINY), num_timesteps=20, schedule={"name": "linear", "beta_end": 0.01}),
        DiffusionModule(net=UNet(**TINY), num_timesteps=20, schedule={"name": "linear", "beta_end": 0.01}),
    )

    class Fixed(WeightAverage):
        def average_module(self) -> L.LightningModule | None:
            return other

        def start_from(self, net_weights: dict[str, torch.Tensor]) -> None:
            raise AssertionError("not called")

    assert module.sampling_module() is module
    module.use_average(Fixed())
    assert module.sampling_module() is other
    module.use_average(None)
    assert module.sampling_module() is module


def _fit(module: DiffusionModule, tmp_path: Path, callbacks: list, steps: int) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=4,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(module, EmbeddedDigitsDataModule(batch_size=4, image_size=8))
    return trainer


@pytest.mark.integration
def test_two_weight_averages_in_one_run_are_refused(tmp_path: Path) -> None:
    module = DiffusionModule(
        net=UNet(**TINY),
        num_timesteps=20,
        schedule={"name": "linear", "beta_end": 0.01},
        lr_schedule={"warmup_steps": 0},
    )
    with pytest.raises(ValueError, match="one weight average per run, got EMA, PostHocEMA"):
        _fit(module, tmp_path, [EMA(0.9), PostHocEMA(snapshot_every=2)], 2)


@pytest.mark.unit
def test_a_checkpoint_of_other_profiles_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tracks sigma_rels \[0.05, 0.1\], this run \[0.05, 0.2\]"):
        PostHocEMA(sigma_rels=(0.05, 0.2)).load_state_dict({"step": 3, "sigma_rels": [0.05, 0.1], "profiles": []})


@pytest.mark.unit
def test_posthoc_settings_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match=r"sampling_sigma_rel=0.2 is not one of the tracked sigma_rels"):
        PostHocEMA(sampling_sigma_rel=0.2)
    with pytest.raises(ValueError, match="unknown snapshot_dtype 'int8'; allowed: float32, bfloat16, float16"):
        PostHocEMA(snapshot_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="snapshot_every must be >= 1"):
        PostHocEMA(snapshot_every=0)


# ------------------------------------------------------------------------------------------------ post-hoc EMA runs
@pytest.mark.integration
def test_a_tracked_sigma_rel_reconstructed_from_the_snapshots_is_the_tracked_average(tmp_path: Path) -> None:
    """The target is in the span of the snapshots: the least squares put all weight on the last 0.10 snapshot, so
    the reconstruction equals the run's average (the checkpoint's state_dict) to float32 rounding; the reconstructed
    checkpoint loads like a run's."""
    torch.manual_seed(0)
    module = DiffusionModule(
        net=UNet(**TINY),
        num_timesteps=20,
        schedule={"name": "linear", "beta_end": 0.01},
        lr_schedule={"warmup_steps": 0},
        lr=1e-2,
    )
    callback = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every=4)
    trainer = _fit(module, tmp_path, [callback], 12)
    assert module.sampling_module() is callback.average_module()
    assert sorted(p.name for p in (tmp_path / "posthoc_ema").glob("*.pt")) == [f"{s:010d}.pt" for s in (4, 8, 12)]
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = read_checkpoint(tmp_path / "run.ckpt")
    # the checkpoint layout: the 0.10 average and the diffusion buffers in state_dict, the raw weights beside them
    average = callback.average_module().net.state_dict()
    assert all(torch.equal(checkpoint["state_dict"][f"net.{k}"], v) for k, v in average.items())
    assert all(
        torch.equal(checkpoint["current_model_state"][f"net.{k}"], v) for k, v in module.net.state_dict().items()
    )
    assert not torch.equal(checkpoint["state_dict"]["net.conv_in.weight"], module.net.conv_in.weight)

    (path,) = reconstruct_posthoc_ema(tmp_path, [0.10], tmp_path / "out")
    assert path == tmp_path / "out" / "posthoc_ema_0.1.ckpt"
    loaded = load_module(path, "cpu")
    for name, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, average[name], rtol=0, atol=1e-6)
    assert loaded.state_dict().keys() == module.state_dict().keys()

    # the command: the other tracked profile, and an untracked one
    with pytest.raises(SystemExit) as exit_:
        main(["posthoc-ema", "--run", str(tmp_path), "--sigma-rel", "0.05", "0.2", "--out", str(tmp_path / "cli")])
    assert exit_.value.code == 0
    tracked = callback._averages[0].net.state_dict()  # sigma_rel 0.05
    for name, value in load_module(tmp_path / "cli" / "posthoc_ema_0.05.ckpt", "cpu").net.state_dict().items():
        torch.testing.assert_close(value, tracked[name], rtol=0, atol=1e-6)
    assert load_module(tmp_path / "cli" / "posthoc_ema_0.2.ckpt", "cpu").hparams.num_timesteps == 20


def _fit_args(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny U-Net on the embedded digits with post-hoc EMA snapshots every step, epochs of 3 steps."""
    return [
        "fit",
        "--seed_everything=0",
        "--model.net=ddpm_lightning.models.UNet",
        *(f"--model.net.init_args.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()),
        "--model.num_timesteps=20",
        "--model.schedule.beta_end=0.01",
        "--model.lr_schedule.warmup_steps=2",
        "--data=ddpm_lightning.data.EmbeddedDigitsDataModule",
        "--data.batch_size=4",
        "--data.image_size=8",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=ddpm_lightning.callbacks.PostHocEMA",
        "--trainer.callbacks.snapshot_every=1",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        *extra,
    ]


@pytest.mark.integration
def test_a_resumed_run_continues_the_same_profiles(tmp_path: Path) -> None:
    main(_fit_args(tmp_path / "straight", 6))
    main(_fit_args(tmp_path / "resumed", 3))
    main(_fit_args(tmp_path / "resumed", 6, "--ckpt_path=last"))
    names = [f"{s:010d}.pt" for s in range(1, 7)]
    for run in ("straight", "resumed"):
        assert sorted(p.name for p in (tmp_path / run / "posthoc_ema").glob("*.pt")) == names
    for name in names:
        straight = torch.load(tmp_path / "straight" / "posthoc_ema" / name, weights_only=True)
        resumed = torch.load(tmp_path / "resumed" / "posthoc_ema" / name, weights_only=True)
        assert resumed["step"] == straight["step"] == int(name[:-3])
        for mine, theirs in zip(resumed["nets"], straight["nets"], strict=True):
            for key in theirs:
                torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    # no default EMA beside the listed average
    checkpoint = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert "EMA" not in checkpoint["callbacks"] and "PostHocEMA" in checkpoint["callbacks"]


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.integration
def test_print_config_shows_the_ema_callback_with_its_decay(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo.yaml", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    emas = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "ddpm_lightning.callbacks.EMA"]
    assert [c["init_args"]["decay"] for c in emas] == [0.98]
    assert not {"ema_decay", "beta_end", "ch"} & set(config["model"])  # the flat settings of earlier versions


def _trainer(tmp_path: Path, *args: str) -> tuple[L.Trainer, DDPMCLI]:
    cli = DDPMCLI(
        DiffusionModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=[
            "--model.net=ddpm_lightning.models.UNet",
            *(f"--model.net.init_args.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()),
            "--data=ddpm_lightning.data.EmbeddedDigitsDataModule",
            "--data.image_size=8",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *args,
        ],
        save_config_callback=LogRunConfig,
        auto_configure_optimizers=False,
        run=False,
    )
    return cli.trainer, cli


@pytest.mark.integration
def test_the_deprecated_model_ema_decay_warns_and_configures_the_ema_callback(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match=r"model.ema_decay=0.5 is deprecated: list the EMA callback"):
        trainer, cli = _trainer(tmp_path, "--model.ema_decay=0.5")
    assert [c.decay for c in trainer.callbacks if isinstance(c, EMA)] == [0.5]
    assert "ema_decay" not in cli.model.hparams  # the callback holds it now, and the saved config shows it
    listed = cli.config.trainer.callbacks
    assert [(c.class_path, c.init_args.decay) for c in listed] == [("ddpm_lightning.callbacks.EMA", 0.5)]
    with pytest.warns(FutureWarning, match=r"ema_decay=0.0 is deprecated"):
        trainer, _ = _trainer(tmp_path, "--model.ema_decay=0")
    assert not any(isinstance(c, EMA) for c in trainer.callbacks)  # 0: no EMA, as before


@pytest.mark.integration
def test_the_deprecated_decay_sets_the_listed_ema(tmp_path: Path) -> None:
    listed = "--trainer.callbacks+=ddpm_lightning.callbacks.EMA"
    with pytest.warns(FutureWarning, match=r"model.ema_decay=0.5 is deprecated"):
        trainer, _ = _trainer(tmp_path, listed, "--trainer.callbacks.decay=0.9", "--model.ema_decay=0.5")
    assert [c.decay for c in trainer.callbacks if isinstance(c, EMA)] == [0.5]  # e.g. an ablation axis
    with pytest.warns(FutureWarning, match=r"model.ema_decay=0.0 is deprecated"):
        trainer, _ = _trainer(tmp_path, listed, "--trainer.callbacks.decay=0.9", "--model.ema_decay=0")
    assert not any(isinstance(c, EMA) for c in trainer.callbacks)


@pytest.mark.integration
def test_a_listed_post_hoc_ema_wins_over_the_deprecated_decay_and_the_default_ema(tmp_path: Path) -> None:
    with pytest.warns(
        FutureWarning, match=r"ema_decay=0.5 is deprecated and ignored: trainer.callbacks lists .*PostHocEMA"
    ):
        trainer, _ = _trainer(
            tmp_path, "--model.ema_decay=0.5", "--trainer.callbacks+=ddpm_lightning.callbacks.PostHocEMA"
        )
    assert [type(c) for c in trainer.callbacks if isinstance(c, WeightAverage)] == [PostHocEMA]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no alias given: no warning
        trainer, _ = _trainer(tmp_path)
    assert [c.decay for c in trainer.callbacks if isinstance(c, EMA)] == [0.9999]  # the default average
