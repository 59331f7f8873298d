"""Each private Lightning / torch / torchmetrics API of ``ddpm_lightning.compat`` still exists and behaves as used.

A failure here means a new library release changed an internal this package relies on: update compat.py and the
pins in pyproject.toml together.
"""

import inspect
import re
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loops import _TrainingEpochLoop
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm_lightning import compat
from ddpm_lightning.callbacks import EMA

pytestmark = pytest.mark.unit
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def boring_fit(tmp_path: Path, callbacks: list[L.Callback], max_steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(BoringModel())
    return trainer


@pytest.mark.parametrize("library", sorted(compat.VERIFIED))
def test_installed_versions_are_the_verified_ones_and_pyproject_pins_them(library: str) -> None:
    assert SpecifierSet(compat.VERIFIED[library]).contains(metadata.version(library))
    quoted = re.findall(r'^\s*"([^"]+)",?\s*$', PYPROJECT.read_text(), flags=re.MULTILINE)  # the dependency lists
    pins = [Requirement(q) for q in quoted if re.match(r"[A-Za-z0-9_.\[\]-]+\s*([<>=!~]|$)", q)]
    assert SpecifierSet(compat.VERIFIED[library]) in [p.specifier for p in pins if p.name == library]


def test_a_missing_private_attribute_is_a_loud_error_naming_the_version() -> None:
    with pytest.raises(compat.CompatError, match=rf"lightning {metadata.version('lightning')} has no .*_average_model"):
        compat.averaged_model(SimpleNamespace())


# ------------------------------------------------------------------------------------------------ Lightning
def test_sigterm_broadcast_is_called_by_the_training_loop_and_switched_off(tmp_path: Path) -> None:
    # the loop calls this method before every step under DDP; GracefulStop replaces it on the instance
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    loop = trainer.fit_loop.epoch_loop
    compat.disable_sigterm_broadcast(trainer)
    assert loop._broadcast_sigterm_tensor() is None  # the stand-in: no collective
    compat.restore_sigterm_broadcast(trainer)
    assert loop._broadcast_sigterm_tensor.__func__ is _TrainingEpochLoop._broadcast_sigterm_tensor


def test_model_checkpoint_saved_step_and_last_checkpoint(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=0)
    trainer = boring_fit(tmp_path, [checkpoint], max_steps=3)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert compat.checkpoint_saved_step(checkpoint) == 2  # the periodic save; step 3 was not saved
    assert torch.load(last, weights_only=True)["global_step"] == 2
    compat.save_last_checkpoint(checkpoint, trainer)
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert compat.checkpoint_saved_step(checkpoint) == 3
    assert checkpoint.last_model_path == str(last)


def test_weight_averaging_internals_hold_the_average_its_step_and_device(tmp_path: Path) -> None:
    ema = EMA(0.5)
    assert compat.averaged_model(ema) is None and compat.ema_last_update_step(ema) == 0
    compat.set_ema_device(ema, torch.device("cpu"))
    assert ema._device == torch.device("cpu")
    compat.set_ema_device(ema, torch.device("meta"))  # a device already chosen is kept
    assert ema._device == torch.device("cpu")
    trainer = boring_fit(tmp_path, [ema], max_steps=3)
    model = compat.averaged_model(ema)
    assert isinstance(model, AveragedModel) and int(model.n_averaged) == 3
    assert compat.ema_last_update_step(ema) == trainer.global_step == 3
    compat.set_ema_last_update_step(ema, 7)
    assert ema.state_dict() == {"latest_update_step": 7}  # what the checkpoint stores and resume reads


# ------------------------------------------------------------------------------------------------ torch
def test_is_compiled_reads_the_compiled_forward() -> None:
    module = nn.Linear(2, 2)
    assert not compat.is_compiled(module)
    module.compile()  # lazy: nothing is compiled until the first call
    assert compat.is_compiled(module)


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_fused_adam_skips_its_update_when_found_inf_is_set(found_inf: float) -> None:
    weight = nn.Parameter(torch.ones(4))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    weight.grad = torch.full((4,), 0.5)
    assert compat.set_found_inf(optimizer, torch.tensor(found_inf))
    optimizer.step()
    compat.clear_found_inf(optimizer)
    assert "found_inf" not in vars(optimizer)
    state = optimizer.state[weight]
    if found_inf:  # weights and moments untouched, the step not counted
        assert torch.equal(weight.detach(), torch.ones(4))
        assert torch.equal(state["exp_avg"], torch.zeros(4)) and float(state["step"]) == 0
    else:
        assert torch.allclose(weight.detach(), torch.full((4,), 0.9)) and float(state["step"]) == 1


def test_an_optimizer_that_reads_no_flag_is_told_apart() -> None:
    optimizer = torch.optim.Adam([nn.Parameter(torch.ones(2))], fused=False)
    assert not compat.set_found_inf(optimizer, torch.tensor(1.0))
    assert "found_inf" not in vars(optimizer)


def test_foreach_lerp_and_copy_match_their_formulas() -> None:
    targets, ends = [torch.zeros(3), torch.ones(2)], [torch.full((3,), 2.0), torch.full((2,), 3.0)]
    compat.foreach_lerp_(targets, ends, 0.25)  # t + w (e - t)
    assert torch.allclose(targets[0], torch.full((3,), 0.5)) and torch.allclose(targets[1], torch.full((2,), 1.5))
    compat.foreach_copy_(targets, ends)
    assert all(torch.equal(t, e) for t, e in zip(targets, ends, strict=True))


# ------------------------------------------------------------------------------------------------ torchmetrics
class Identity(nn.Module):
    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fid_real_statistics_load_by_state_name() -> None:
    features = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fid = FrechetInceptionDistance(feature=Identity(), reset_real_features=False)
    real = {
        "real_features_sum": features.sum(0),
        "real_features_cov_sum": features.T @ features,
        "real_features_num_samples": torch.tensor(len(features)),
    }
    compat.load_metric_states(fid, real)
    fid.update(features.float(), real=False)
    assert abs(float(fid.compute())) < 1e-4  # the same set on both sides
    fid.reset()  # the real statistics survive a reset: only the generated ones are cleared
    assert torch.equal(fid.real_features_sum, real["real_features_sum"])
    with pytest.raises(compat.CompatError, match="no state 'real_features_mean'"):
        compat.load_metric_states(fid, {"real_features_mean": features.mean(0)})


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all")  # its note on memory
def test_kid_real_features_load_by_state_name() -> None:
    kid = KernelInceptionDistance(feature=Identity(), subsets=2, subset_size=10, reset_real_features=False)
    features = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    compat.load_metric_states(kid, {"real_features": [features]})
    kid.update(features + 1.0, real=False)
    assert float(kid.compute()[0]) > 0
    assert torch.equal(torch.cat(kid.real_features), features)


@pytest.mark.unit
def test_attached_trainer_is_none_before_a_trainer_and_the_trainer_after(tmp_path: Path) -> None:
    model = BoringModel()
    assert compat.attached_trainer(model) is None
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model)
    assert compat.attached_trainer(model) is trainer


@pytest.mark.unit
def test_given_hyperparameters_are_the_settings_lightningcli_instantiates_a_module_with() -> None:
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    assert compat.given_hyperparameters() == {}
    given = {"lr": 1.0, "net": {"class_path": "a.B", "init_args": {"width": 8}}}
    with _given_hyperparameters_context(given, "lightning.pytorch.cli.instantiate_module"):
        inside = compat.given_hyperparameters()
    assert inside["net"] == given["net"] and inside["lr"] == 1.0
    assert compat.given_hyperparameters() == {}


@pytest.mark.unit
def test_drop_cli_keys_removes_lightningclis_keys_and_returns_the_class_path() -> None:
    hparams = {"_instantiator": "lightning.pytorch.cli.instantiate_module", "_class_path": "a.B", "lr": 1.0}
    assert compat.drop_cli_keys(hparams) == "a.B" and hparams == {"lr": 1.0}
    assert compat.drop_cli_keys(hparams) == "" and hparams == {"lr": 1.0}


@pytest.mark.unit
def test_fan_in_and_fan_out_of_a_convolution_weight() -> None:
    weight = torch.empty(8, 4, 3, 3)  # (out, in, kh, kw)
    assert compat.fan_in_and_fan_out(weight) == (4 * 3 * 3, 8 * 3 * 3)
