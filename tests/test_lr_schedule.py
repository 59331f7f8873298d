"""The learning-rate schedules against their formulas written here, and across a resume."""

import dataclasses
import math
from pathlib import Path

import lightning as L
import pytest

from ddpm_lightning.cli.resume import reconcile_model_settings
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.optim import LRSchedule

W, N, R = 3, 20, 0.1  # warm-up steps, decay length, floor


def warmup(s: int) -> float:
    return (s + 1) / W


def expected(name: str, s: int, decay_fraction: float = 0.25, ref_steps: int = 7) -> float:
    """The factor of lr at step s (steps done), written out per schedule."""
    if s < W:
        return warmup(s)
    if name == "inverse_sqrt":  # EDM2 Eq. 20: alpha_ref / sqrt(max(t / t_ref, 1))
        return 1.0 if s <= ref_steps else (ref_steps / s) ** 0.5
    p = min(max((s - W) / (N - W), 0.0), 1.0)
    if name == "constant":
        return 1.0
    if name == "linear":
        return 1.0 - (1.0 - R) * p
    if name == "cosine":
        return R + (1.0 - R) * 0.5 * (1.0 + math.cos(math.pi * p))
    start = N - round(decay_fraction * N)  # wsd: stable until the last quarter, then linear to R
    return 1.0 if s < start else 1.0 - (1.0 - R) * min((s - start) / (N - start), 1.0)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "wsd", "inverse_sqrt"])
def test_each_schedule_follows_its_formula(name: str) -> None:
    schedule = LRSchedule(name=name, min_lr_ratio=R, decay_fraction=0.25, ref_steps=7)
    for s in range(N + 5):
        assert dataclasses.replace(schedule, warmup_steps=W).factor(s, N) == pytest.approx(
            expected(name, s), abs=1e-12
        ), s


@pytest.mark.unit
def test_the_decays_end_on_the_floor_and_wsd_is_flat_before_its_last_fraction() -> None:
    for name in ("linear", "cosine", "wsd"):
        assert LRSchedule(name=name, warmup_steps=W, min_lr_ratio=R).factor(N, N) == pytest.approx(R)
    wsd = LRSchedule(name="wsd", warmup_steps=W, decay_fraction=0.25)
    assert [wsd.factor(s, N) for s in range(W, 15)] == [1.0] * (15 - W)
    assert wsd.factor(16, N) < 1.0


@pytest.mark.unit
def test_a_bare_name_and_a_mapping_parse_to_the_same_setting() -> None:
    assert LRSchedule.parse("cosine") == LRSchedule.parse({"name": "cosine"}) == LRSchedule(name="cosine")
    assert LRSchedule.parse(None) == LRSchedule()
    assert DiffusionModule(net=UNet(**TINY), lr_schedule="wsd").hparams.lr_schedule["name"] == "wsd"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"name": "step"}, "unknown lr_schedule 'step'; allowed: constant, linear, cosine, wsd"),
        ({"name": "cosine", "min_lr_ratio": 1.5}, "min_lr_ratio must be in [0, 1]"),
        ({"name": "wsd", "decay_fraction": 0.0}, "decay_fraction must be in (0, 1]"),
        ({"name": "linear", "total_steps": 0}, "total_steps must be a positive integer or null, got 0"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_value(value: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        LRSchedule.parse(value)


@pytest.mark.unit
def test_a_decay_without_max_steps_or_total_steps_is_refused_and_constant_needs_neither() -> None:
    with pytest.raises(ValueError, match="lr_schedule 'cosine' decays over the run's length.*trainer.max_steps"):
        LRSchedule(name="cosine").decay_steps(-1)
    assert LRSchedule(name="cosine").decay_steps(500) == 500
    assert LRSchedule(name="cosine", total_steps=300).decay_steps(None) == 300
    assert LRSchedule().decay_steps(None) is None


@pytest.mark.unit
def test_a_changed_schedule_on_resume_is_a_safe_setting() -> None:
    stored = {"lr_schedule": LRSchedule().to_dict()}
    _, changed = reconcile_model_settings({"lr_schedule": "cosine"}, stored, "x.ckpt")
    assert changed == [
        f"model.lr_schedule: checkpoint {LRSchedule().to_dict()}, given {LRSchedule('cosine').to_dict()}"
    ]
    # left at its default: the checkpoint's
    assert reconcile_model_settings({}, {"lr_schedule": {"name": "wsd"}}, "x.ckpt")[0] == {
        "lr_schedule": {"name": "wsd"}
    }


TINY = {"in_channels": 1, "image_size": 8, "ch": 32, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": ()}


class RecordLR(L.Callback):
    """The learning rate each optimizer step runs with, by step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def _fit(max_steps: int, schedule: dict, ckpt_path: Path | None, save: Path) -> dict[int, float]:
    module = DiffusionModule(net=UNet(**TINY), num_timesteps=50, lr=1e-3, lr_schedule={"warmup_steps": W, **schedule})
    record = RecordLR()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, EmbeddedDigitsDataModule(batch_size=2, image_size=8), ckpt_path=ckpt_path)
    trainer.save_checkpoint(save)
    return record.lr


@pytest.mark.integration
@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "wsd"])
def test_a_resumed_run_continues_the_schedule_where_it_stopped(tmp_path: Path, name: str) -> None:
    """N/2 steps, then a resume to N: every step's lr is lr times the formula at that step, as one run of N steps."""
    schedule = {"name": name, "min_lr_ratio": R, "decay_fraction": 0.25, "total_steps": N}
    first = _fit(N // 2, schedule, None, tmp_path / "half.ckpt")
    second = _fit(N, schedule, tmp_path / "half.ckpt", tmp_path / "full.ckpt")
    assert sorted(first) == list(range(N // 2)) and sorted(second) == list(range(N // 2, N))
    for s, lr in {**first, **second}.items():
        assert lr == pytest.approx(1e-3 * expected(name, s), rel=1e-12), s


@pytest.mark.integration
def test_a_decay_follows_max_steps_when_it_has_no_total_steps(tmp_path: Path) -> None:
    lrs = _fit(8, {"name": "linear"}, None, tmp_path / "run.ckpt")
    assert lrs[7] == pytest.approx(1e-3 * (1 - (7 - W) / (8 - W)), rel=1e-12)
