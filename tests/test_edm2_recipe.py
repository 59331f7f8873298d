"""The EDM2 recipe's training options: learned uncertainty weighting, inverse-sqrt lr within a step budget, the
power-function EMA during training, a smaller guide trained in the same fit, minimum-distance noise assignment, and
configs/cifar10_edm2.yaml."""

import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from ddpm_lightning.callbacks import GuideTraining, LossWeightCurve, PowerEMA
from ddpm_lightning.callbacks import budget as budget_module
from ddpm_lightning.callbacks.budget import TrainingBudget
from ddpm_lightning.cli import main
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.diffusion import make_betas
from ddpm_lightning.diffusion.assignment import assign_noise
from ddpm_lightning.diffusion.weighting import LearnedLossWeight
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.posthoc import sigma_rel_to_gamma
from ddpm_lightning.sampling import load_module

REPO = Path(__file__).resolve().parents[1]
TINY = {"in_channels": 1, "image_size": 8, "ch": 16, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (),
        "num_groups": 8}  # fmt: skip


def tiny_module(**settings) -> DiffusionModule:
    torch.manual_seed(0)
    lr_schedule = {"warmup_steps": 2, **settings.pop("lr_schedule", {})}
    return DiffusionModule(net=UNet(**TINY), num_timesteps=50, lr_schedule=lr_schedule, **settings)


def tiny_trainer(tmp_path: Path, max_steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        gradient_clip_val=1.0, max_epochs=-1,
    )  # fmt: skip


DIGITS = {"batch_size": 8, "image_size": 8}


# ------------------------------------------------------------------------------------- learned uncertainty weighting
@pytest.mark.unit
def test_with_u_held_at_zero_the_learned_weighting_is_todays_loss() -> None:
    plain, learned = tiny_module(), tiny_module(loss_weighting="learned")
    learned.net.load_state_dict(plain.net.state_dict())
    assert torch.all(learned.loss_weight(torch.arange(50)) == 0)  # u starts at 0
    batch = torch.rand(8, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    expected = plain.batch_loss(batch)
    torch.manual_seed(3)
    got = learned.batch_loss(batch)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.unit
def test_u_moves_towards_the_log_of_the_per_t_loss() -> None:
    """Per-example losses L = exp(a(t)) E with E ~ Exp(1): the minimiser of L / exp(u) + u is u(t) = a(t)."""
    torch.manual_seed(0)
    abar = torch.cumprod(1 - make_betas("cosine", 100), 0)
    weight = LearnedLossWeight(abar)
    a = -2.0 + 1.5 * torch.sin(math.pi * torch.arange(100) / 100)  # log E[L | t], written here
    optimizer = torch.optim.Adam(weight.parameters(), lr=0.05)
    error_at_start = (weight(torch.arange(100)) - a).abs().mean().item()
    for _ in range(400):
        t = torch.randint(0, 100, (512,))
        losses = torch.exp(a[t]) * torch.empty(512).exponential_()
        loss = weight.weigh(losses, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight.observe(losses, t)
    with torch.no_grad():
        error = (weight(torch.arange(100)) - a).abs().mean().item()
    assert error_at_start > 1.0 and error < 0.2, (error_at_start, error)
    curve = weight.curve()  # the running log-mean loss per bin follows a(t) too
    centres = torch.tensor(curve["bin_t"]).long()
    assert (torch.tensor(curve["log_loss"]) - a[centres]).abs().mean() < 0.15


@pytest.mark.integration
def test_the_loss_weight_curve_is_drawn_into_the_run_folder(tmp_path: Path) -> None:
    module = tiny_module(loss_weighting="learned")
    tiny_trainer(tmp_path, 4, [LossWeightCurve(every_n_steps=2)]).fit(module, EmbeddedDigitsDataModule(**DIGITS))
    assert (tmp_path / "loss_weight.png").stat().st_size > 1000
    curve = json.loads((tmp_path / "loss_weight.json").read_text())
    assert curve["step"] == 4 and len(curve["u"]) == 50 and any(u != 0 for u in curve["u"])


@pytest.mark.unit
def test_the_loss_weight_curve_needs_a_learned_weighting(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="LossWeightCurve draws the learned loss weighting.*model.loss_weighting=learned"
    ):
        tiny_trainer(tmp_path, 1, [LossWeightCurve()]).fit(tiny_module(), EmbeddedDigitsDataModule(**DIGITS))


# ------------------------------------------------------------------------------------- the step budget and the lr
class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class StepClock:
    """A clock for the budget in which every optimizer step takes 0.1 s (read at its start and at its end)."""

    def __init__(self) -> None:
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return 0.1 * (self.reads // 2)


@pytest.mark.integration
def test_a_step_budget_fixes_the_run_length_that_a_linear_decay_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_module, "time", StepClock())
    module = tiny_module(lr=1e-3, lr_schedule={"name": "linear", "min_lr_ratio": 0.1})
    record, budget = RecordLR(), TrainingBudget(seconds="00:00:00:01.2", warmup_steps=1, measure_steps=2)
    trainer = tiny_trainer(tmp_path, -1, [budget, record])
    trainer.fit(module, EmbeddedDigitsDataModule(**DIGITS))
    n = budget.max_steps
    assert n == 12 == trainer.global_step == len(record.lrs)  # 1.2 s at 10 steps/s
    for step in range(2):  # the warm-up
        assert record.lrs[step] == pytest.approx(1e-3 * (step + 1) / 2)
    for step in range(4, n):  # once the length is known: the decay over n steps, ending near the floor
        p = (step - 2) / (n - 2)
        assert record.lrs[step] == pytest.approx(1e-3 * (1 - 0.9 * p)), step


@pytest.mark.unit
def test_a_budget_reads_a_duration() -> None:
    assert TrainingBudget("00:00:05:00").seconds == 300 and TrainingBudget(90).seconds == 90
    with pytest.raises(ValueError, match="the training budget 'five' is not a duration"):
        TrainingBudget("five")


# ------------------------------------------------------------------------------------- the power-function EMA
class RecordWeights(L.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(torch.cat([p.detach().double().flatten() for p in pl_module.parameters()]))


@pytest.mark.integration
def test_the_power_ema_is_the_power_function_average_of_the_weights(tmp_path: Path) -> None:
    module, record, ema = tiny_module(lr=1e-2), RecordWeights(), PowerEMA(sigma_rel=0.1)
    tiny_trainer(tmp_path, 12, [ema, record]).fit(module, EmbeddedDigitsDataModule(**DIGITS))
    gamma = sigma_rel_to_gamma(0.1)
    # EDM2 Eq. 3 telescopes: theta_hat_T = sum_t (t^(g+1) - (t-1)^(g+1)) theta_t / T^(g+1)
    t = torch.arange(1, 13, dtype=torch.float64)
    w = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / 12 ** (gamma + 1)
    expected = (w[:, None] * torch.stack(record.weights)).sum(0)
    got = torch.cat([p.detach().double().flatten() for p in ema.average_module().parameters()])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, record.weights[-1], atol=1e-6)


# ------------------------------------------------------------------------------------- the smaller guide
@pytest.mark.integration
def test_a_smaller_guide_is_trained_for_its_share_of_the_run_and_loads(tmp_path: Path) -> None:
    module = tiny_module(lr=1e-2)
    guide = GuideTraining(width=0.5, fraction=0.25, ema_decay=0.5)
    tiny_trainer(tmp_path, 8, [guide]).fit(module, EmbeddedDigitsDataModule(**DIGITS))
    path = tmp_path / "checkpoints" / "guide.ckpt"
    loaded = load_module(path, "cpu")
    assert loaded.net.init_args["ch"] == 8 and module.net.init_args["ch"] == 16
    assert torch.load(path, weights_only=True)["global_step"] == 2  # a quarter of 8 steps
    torch.manual_seed(0)
    untrained = UNet(**{**TINY, "ch": 8}).state_dict()  # a half-width network as the guide starts
    assert any(not torch.equal(untrained[k], v) for k, v in loaded.net.state_dict().items())  # it trained
    images = loaded.sample(2, {"name": "ddim", "steps": 3})
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.integration
def test_a_guide_in_a_run_bounded_by_a_step_budget_takes_its_share_of_the_fixed_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_module, "time", StepClock())  # 10 steps/s: a budget of 1.2 s fixes 12 steps
    guide, budget = GuideTraining(fraction=0.5), TrainingBudget(seconds=1.2, warmup_steps=1, measure_steps=2)
    trainer = tiny_trainer(tmp_path, -1, [budget, guide])
    trainer.fit(tiny_module(lr_schedule={"name": "linear"}), EmbeddedDigitsDataModule(**DIGITS))
    assert trainer.global_step == 12
    assert torch.load(tmp_path / "checkpoints" / "guide.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.unit
def test_a_guide_setting_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"GuideTraining width must lie in \(0, 1\].*got 1.5"):
        GuideTraining(width=1.5)
    with pytest.raises(ValueError, match=r"GuideTraining fraction must lie in \(0, 1\].*got 0"):
        GuideTraining(fraction=0)


# ------------------------------------------------------------------------------------- noise assignment
@pytest.mark.unit
def test_the_noise_assignment_is_the_permutation_of_least_total_distance() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 1, 4, 4, generator=generator)
    assigned = assign_noise(x0, noise)
    distance = lambda order: sum(float((x0[i] - noise[j]).norm()) for i, j in enumerate(order))  # noqa: E731
    best = min(itertools.permutations(range(6)), key=distance)
    torch.testing.assert_close(assigned, noise[list(best)])
    assert sorted(assigned.flatten().tolist()) == sorted(noise.flatten().tolist())  # the same draws, reordered


@pytest.mark.unit
def test_a_module_with_immiscible_noise_trains_with_the_assigned_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    module = tiny_module(noise_assignment="immiscible")
    calls = []
    import ddpm_lightning.lit_module as lit_module

    monkeypatch.setattr(lit_module, "assign_noise", lambda x0, noise: calls.append(x0.shape) or noise)
    module.batch_loss(torch.zeros(4, 1, 8, 8))
    assert calls == [torch.Size([4, 1, 8, 8])]
    with pytest.raises(ValueError, match="unknown noise_assignment 'sorted'; allowed: random, immiscible"):
        tiny_module(noise_assignment="sorted")


# ------------------------------------------------------------------------------------- the CIFAR-10 config
@pytest.mark.integration
def test_the_cifar10_edm2_config_runs_with_the_debug_overlay(cifar10_dir: Path, tmp_path: Path) -> None:
    main(["fit", "-c", str(REPO / "configs/cifar10.yaml"), "-c", str(REPO / "configs/cifar10_edm2.yaml"),
          "-c", str(REPO / "configs/debug.yaml"), "--model.net", str(REPO / "configs/model/mp_unet_tiny_rgb.yaml"),
          f"--data.init_args.data_dir={cifar10_dir}", "--trainer.max_steps=2",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])  # fmt: skip
    module = load_module(tmp_path / "checkpoints" / "last.ckpt", "cpu")
    assert type(module.net).__name__ == "MPUNet" and module.hparams.loss_weighting["name"] == "learned"
    assert module.hparams.lr_schedule["name"] == "inverse_sqrt"
    assert module.hparams.lr_schedule["warmup_steps"] == 10  # the overlay's field, composed into the recipe's setting
