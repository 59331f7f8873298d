"""Autoguidance through the module: a guide checkpoint kept by a run, guided sampling, and guides that do not fit."""

from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch

from ddpm_lightning.callbacks import GuideCheckpoint
from ddpm_lightning.cli import main
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.sampling import load_module


def _module(num_timesteps: int = 20, image_size: int = 8, schedule: str = "cosine", **kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
    return DiffusionModule(net, image_size=image_size, in_channels=1, num_timesteps=num_timesteps, schedule=schedule,
                           **kwargs)  # fmt: skip


@pytest.mark.integration
def test_a_run_keeps_its_guide_checkpoint_and_samples_guided_by_it(tmp_path: Path, capsys):
    module = _module(image_size=28, lr=1e-2, lr_schedule={"warmup_steps": 0})
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[GuideCheckpoint(at_fraction=0.5)])  # fmt: skip
    trainer.fit(module, EmbeddedDigitsDataModule(batch_size=4, num_workers=0, image_size=28))
    path = tmp_path / "checkpoints" / "guide.ckpt"
    assert torch.load(path, weights_only=False)["global_step"] == 2
    guide = load_module(path, "cpu")
    params = zip(guide.net.parameters(), module.net.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in params)  # the main model trained two steps more
    config = SamplerConfig("dpmpp_2m", 4)
    plain = module.sample(3, config, seed=1)
    assert torch.equal(module.sample(3, config, seed=1, guide=guide), plain)  # w = 1: the main model alone
    guided = module.sample(3, SamplerConfig("dpmpp_2m", 4, autoguidance_scale=2.0), seed=1, guide=guide)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    torch.testing.assert_close(
        module.sample(3, SamplerConfig("dpmpp_2m", 4, autoguidance_scale=3.0), seed=1, guide=module), plain,
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    # the command line: ddpm sample --guide-ckpt PATH --autoguidance-scale w
    args = ["sample", "--ckpt", str(path), "--num", "2", "--sampler", "ddim", "--steps", "2", "--out"]
    with pytest.raises(SystemExit) as done:
        main([*args, str(tmp_path / "s"), "--guide-ckpt", str(path), "--autoguidance-scale", "2"])
    assert done.value.code == 0 and (tmp_path / "s" / "grid.png").is_file()
    with pytest.raises(SystemExit) as done:
        main([*args, str(tmp_path / "t"), "--autoguidance-scale", "2"])
    assert done.value.code == 2 and "needs --guide-ckpt" in capsys.readouterr().err


@pytest.mark.unit
def test_guides_of_another_shape_process_or_classes_are_refused():
    main = _module()
    config = SamplerConfig("ddim", 3, autoguidance_scale=2.0)
    cases = [
        (_module(image_size=16), r"guide draws images of shape \(1, 16, 16\), this model \(1, 8, 8\)"),
        (_module(num_timesteps=10), "guide has T = 10, the model T = 20"),
        (_module(schedule={"name": "linear", "beta_end": 0.01}), "another noise schedule"),
        (_module(num_classes=3), "conditional on 3 classes and this model on None"),
    ]
    for guide, message in cases:
        with pytest.raises(ValueError, match=message):
            main.sample(2, config, guide=guide)
    with pytest.raises(ValueError, match="autoguidance_scale=2 needs a guide model"):
        main.sample(2, config)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give at_step, at_fraction or both"),
        ({"at_step": 0}, "at_step must be a positive"),
        ({"at_fraction": 1.0}, r"at_fraction must lie in \(0, 1\)"),
        ({"at_step": 5, "filename": "x/guide.pt"}, "filename must be a file name ending in .ckpt"),
    ],
)
def test_guide_checkpoint_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuideCheckpoint(**kwargs)


@pytest.mark.unit
def test_guide_checkpoint_takes_the_fraction_of_max_steps_and_at_step_without_one():
    both = GuideCheckpoint(at_step=330, at_fraction=0.3)
    assert both.step(mock.Mock(max_steps=2000)) == 600
    assert both.step(mock.Mock(max_steps=-1)) == 330  # a run bounded by max_time
    with pytest.raises(ValueError, match="needs trainer.max_steps"):
        GuideCheckpoint(at_fraction=0.3).step(mock.Mock(max_steps=-1))
