"""Performance options apply to the trained network and its EMA copy, which stay separate."""

import lightning as L
import pytest
import torch
from helpers import unet_spec

from ddpm_lightning.callbacks import default_callbacks
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.integration

TINY = {"in_channels": 1, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "image_size": 16, "attn_resolutions": (8,)}


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_applies_to_the_trained_network_and_its_ema_copy(tmp_path, channels_last):
    module = DiffusionModule(
        net=unet_spec(**TINY),
        num_timesteps=50,
        lr_schedule={"warmup_steps": 1},
        runtime={"channels_last": channels_last},
    )
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=default_callbacks(0.5, progress_bar=False),
    )
    trainer.fit(module, EmbeddedDigitsDataModule(batch_size=4, image_size=16))
    raw_conv = module.net.down[0][0].conv1.weight
    ema_conv = module.sampling_module().net.down[0][0].conv1.weight
    assert module.sampling_module() is not module
    for weight in (raw_conv, ema_conv):
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert weight.is_contiguous() != channels_last
    # the EMA copy is an independent module that averages, not an alias of the trained weights
    assert ema_conv.data_ptr() != raw_conv.data_ptr()
    assert not torch.equal(raw_conv, ema_conv)


@pytest.mark.slow
def test_the_gpu_speed_options_together_train_and_give_a_loadable_checkpoint(tmp_path):
    """README's GPU options (compile, bf16-mixed, TF32, gradient clipping with fused Adam) in one run, on the CPU."""
    from helpers import fit_args

    from ddpm_lightning.checkpoint import read_checkpoint
    from ddpm_lightning.cli import main
    from ddpm_lightning.sampling import load_module

    options = (
        "--model.runtime.compile=true",
        "--trainer.precision=bf16-mixed",
        "--model.runtime.matmul_precision=high",
    )
    main(fit_args(tmp_path, 4, *options, "--trainer.gradient_clip_val=1.0"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 4
    module = load_module(last)  # an eager module: the compiled run's names carry no prefix
    images = module.sample(2, SamplerConfig("ddim", 3))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
