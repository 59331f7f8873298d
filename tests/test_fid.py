"""FIDCallback: the closed-form FID, real-statistics cache, checkpoint contents and state resets."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from helpers import NUM_REAL, TinyExtractor, TinyImages, closed_form_fid, fid_callback, real_images, tiny_diffusion
from torch import nn

from ddpm_lightning.callbacks import BPDCallback, EveryNSteps, FIDCallback, default_callbacks
from ddpm_lightning.data import to_uint8
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.lit_module import DiffusionModule


class Replay(L.LightningModule):
    """A "generator" whose sample i is real image i moved by `shift`: FID then has a closed form.

    It has what FIDCallback needs from a module: ``diffusion.num_timesteps``, ``sampler_config_for`` and ``sample``.
    """

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift
        self.weight = nn.Parameter(torch.zeros(()))
        self.images = real_images()
        self.diffusion = SimpleNamespace(num_timesteps=20)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch[0].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def sampler_config_for(self, sampler: SamplerConfig) -> SamplerConfig:
        return sampler

    def sample(self, num: int, sampler: SamplerConfig, *, seeds: list[int], **_: Any) -> torch.Tensor:
        assert num == len(seeds)
        return (self.images[seeds] + self.shift).clamp(-1, 1)


def fit(module: L.LightningModule, callback: L.Callback, root: Path, max_steps: int = 1, **kwargs: Any) -> L.Trainer:
    # a DiffusionModule is trained with the default callbacks, as `ddpm fit` does
    defaults = default_callbacks(0.0, progress_bar=False) if isinstance(module, DiffusionModule) else []
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=[callback, *defaults],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, datamodule=TinyImages())
    return trainer


def tiny_features(images: torch.Tensor) -> np.ndarray:
    return TinyExtractor()(to_uint8(images)).double().numpy()


pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(does not have many workers|will save all extracted).*"),
    pytest.mark.usefixtures("single_thread"),
]


class StepRecorder(EveryNSteps):
    """Logs the step it evaluates at, and keeps it."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.steps: list[int] = []

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        self.steps.append(trainer.global_step)
        return {"val/step": float(trainer.global_step)}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("every_n_steps", "on_fit_end", "max_steps", "evaluated"),
    [(2, True, 5, [2, 4, 5]), (2, True, 4, [2, 4]), (None, True, 3, [3]), (2, False, 5, [2, 4]), (None, False, 3, [])],
)
def test_a_periodic_evaluation_runs_every_n_steps_and_once_more_when_fit_ends(
    tmp_path: Path, every_n_steps: int | None, on_fit_end: bool, max_steps: int, evaluated: list[int]
) -> None:
    callback = StepRecorder(every_n_steps=every_n_steps, on_fit_end=on_fit_end)
    trainer = fit(Replay(shift=0.0), callback, tmp_path, max_steps=max_steps)
    assert callback.steps == evaluated
    assert trainer.callback_metrics.get("val/step") == (torch.tensor(float(evaluated[-1])) if evaluated else None)
    fit(Replay(shift=0.0), callback, tmp_path / "again", max_steps=max_steps)  # a second fit evaluates afresh
    assert callback.steps == evaluated * 2


@pytest.mark.unit
@pytest.mark.parametrize("cls", [FIDCallback, BPDCallback])
def test_the_periodic_callbacks_refuse_a_period_that_is_not_a_positive_number_of_steps(cls: type) -> None:
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"every_n_steps must be a positive number of steps or None, got {bad}"):
            cls(every_n_steps=bad)


@pytest.mark.integration
def test_fid_of_the_real_set_against_itself_is_zero(tmp_path: Path) -> None:
    trainer = fit(Replay(shift=0.0), fid_callback(tmp_path / "cache"), tmp_path)
    assert abs(float(trainer.callback_metrics["val/fid"])) < 1e-6


@pytest.mark.integration
def test_fid_of_a_shifted_set_matches_the_closed_form(tmp_path: Path) -> None:
    trainer = fit(Replay(shift=0.3), fid_callback(tmp_path / "cache"), tmp_path)
    real = real_images()
    expected = closed_form_fid(tiny_features((real + 0.3).clamp(-1, 1)), tiny_features(real))
    assert expected > 1e-3
    assert float(trainer.callback_metrics["val/fid"]) == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["val/fid_ddim5"]) == float(trainer.callback_metrics["val/fid"])


@pytest.mark.integration
def test_fid_is_logged_every_n_steps_for_checkpoint_monitoring(tmp_path: Path) -> None:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/fid", every_n_train_steps=2, save_top_k=1
    )
    callback = fid_callback(tmp_path / "cache", every_n_steps=2, on_fit_end=False)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        callbacks=[callback, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Replay(shift=0.3), datamodule=TinyImages())
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(float(trainer.callback_metrics["val/fid"]))


@pytest.mark.integration
def test_real_statistics_are_cached_and_reused(tmp_path: Path) -> None:
    first = fid_callback(tmp_path / "cache")
    fid1 = float(fit(Replay(shift=0.3), first, tmp_path).callback_metrics["val/fid"])
    assert not first.real_stats_from_cache and first.real_stats_path.is_file()
    mtime = first.real_stats_path.stat().st_mtime_ns

    second = fid_callback(tmp_path / "cache")
    fid2 = float(fit(Replay(shift=0.3), second, tmp_path).callback_metrics["val/fid"])
    assert second.real_stats_from_cache and second.real_stats_path == first.real_stats_path
    assert second.real_stats_path.stat().st_mtime_ns == mtime
    assert fid2 == pytest.approx(fid1, rel=1e-9)


def test_computing_the_real_statistics_draws_nothing_from_the_global_rng(tmp_path: Path) -> None:
    # the training noise after fit starts must not depend on whether the statistics were cached (exact resume)
    callback = fid_callback(tmp_path)
    callback.extractor, callback._num_features = TinyExtractor(), TinyExtractor.num_features
    trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace(reduce=lambda x, reduce_op: x))
    state = torch.get_rng_state()
    stats = callback._compute_real_stats(trainer, SimpleNamespace(device="cpu"), TinyImages().real_images_dataset(), 8)
    assert stats["num_samples"] == 8
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.integration
def test_real_statistics_cache_is_keyed_by_the_number_of_images(tmp_path: Path) -> None:
    all_images = fid_callback(tmp_path / "cache")
    fit(Replay(shift=0.3), all_images, tmp_path)
    fewer = fid_callback(tmp_path / "cache", num_real=20)
    fit(Replay(shift=0.3), fewer, tmp_path)
    assert not fewer.real_stats_from_cache and fewer.real_stats_path != all_images.real_stats_path


@pytest.mark.integration
def test_kid_matches_the_unbiased_polynomial_mmd_and_is_is_at_least_one(tmp_path: Path) -> None:
    callback = fid_callback(tmp_path / "cache", kid=True, kid_subset_size=NUM_REAL, inception_score=True)
    trainer = fit(Replay(shift=0.3), callback, tmp_path)
    real = real_images()
    x, y = tiny_features(real), tiny_features((real + 0.3).clamp(-1, 1))
    d = x.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1) ** 3  # KID's polynomial kernel (Binkowski et al. 2018)

    def off_diagonal_mean(k: np.ndarray) -> float:
        return float((k.sum() - np.trace(k)) / (len(k) * (len(k) - 1)))

    # with subsets of all images the unbiased MMD^2 no longer depends on the random subsets
    mmd2 = off_diagonal_mean(kernel(x, x)) + off_diagonal_mean(kernel(y, y)) - 2 * float(kernel(x, y).mean())
    assert float(trainer.callback_metrics["val/kid"]) == pytest.approx(mmd2, rel=1e-4)
    assert float(trainer.callback_metrics["val/is"]) >= 1.0


@pytest.mark.integration
def test_checkpoint_holds_no_feature_extractor_weights(tmp_path: Path) -> None:
    module = tiny_diffusion()
    trainer = fit(module, fid_callback(tmp_path / "cache", num_samples=4), tmp_path)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())
    proj = TinyExtractor().proj
    assert not any(t.shape == proj.shape and torch.equal(t, proj) for t in checkpoint["state_dict"].values())
    assert all(not state for key, state in checkpoint["callbacks"].items() if "FIDCallback" in key)


@pytest.mark.integration
def test_two_fits_in_one_process_give_the_same_fid(tmp_path: Path) -> None:
    callback = fid_callback(tmp_path / "cache", num_samples=6, every_n_steps=1)
    fid1 = float(fit(tiny_diffusion(), callback, tmp_path).callback_metrics["val/fid"])
    fid2 = float(fit(tiny_diffusion(), callback, tmp_path).callback_metrics["val/fid"])
    assert fid1 == pytest.approx(fid2, rel=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, "num_samples"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"sampler": "euler"}, "unknown sampler 'euler'; allowed: ddpm, ddim, dpmpp_2m"),
        ({"sampler": {"name": "dpmpp_2m", "steps": 0}}, "steps must be a positive number"),
        pytest.param(  # the deprecated spelling
            {"sampler": "dpmpp_2m", "num_steps": 0},
            "steps must be a positive number",
            marks=pytest.mark.filterwarnings(r"ignore:FIDCallback\(num_steps=\.\.\.\) is deprecated"),
        ),
        ({"sampler": {"name": "ddim", "spacing": "log"}}, "unknown spacing 'log'; allowed: uniform, quadratic"),
        ({"real_split": "holdout"}, "real_split='holdout'"),
    ],
)
def test_bad_settings_raise_at_construction(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fid_callback(tmp_path, **kwargs)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sampler", "label"),
    [
        (SamplerConfig("ddpm"), "ddpm20"),  # T = 20: the full chain
        (SamplerConfig("ddpm", 20), "ddpm20"),
        (SamplerConfig("ddpm", 10), "ddpm10"),
        (SamplerConfig("ddim", 5), "ddim5"),
        (SamplerConfig("ddim", 5, spacing="quadratic"), "ddim5_quad"),
        (SamplerConfig("dpmpp_2m", 8), "dpmpp_2m8"),
    ],
)
def test_label_names_the_sampler_and_its_network_evaluations(
    tmp_path: Path, sampler: SamplerConfig, label: str
) -> None:
    callback = fid_callback(tmp_path, sampler=sampler)
    callback.setup(mock.Mock(), tiny_diffusion(), "validate")
    assert callback.label == label


@pytest.mark.unit
def test_more_steps_than_the_model_has_fail_at_setup(tmp_path: Path) -> None:
    callback = fid_callback(tmp_path, sampler=SamplerConfig("dpmpp_2m", 21))
    with pytest.raises(ValueError, match=r"steps must be in \[1, 20\]"):
        callback.setup(mock.Mock(), tiny_diffusion(), "fit")


@pytest.mark.unit
def test_missing_weights_file_raises_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ddpm fid-weights"):
        FIDCallback(feature_extractor_weights_path=str(tmp_path / "missing.pth"))
