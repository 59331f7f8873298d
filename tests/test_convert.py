"""``ddpm convert``: diffusers' UNet2DModel + DDPMScheduler to and from checkpoints, the DiffusersUNet adapter and
``ddpm fit --init_from``. The diffusers models are built from configs with random weights and saved locally."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from ddpm_lightning.checkpoint import CheckpointError
from ddpm_lightning.cli import main
from ddpm_lightning.cli.fit import init_from
from ddpm_lightning.diffusion import samplers
from ddpm_lightning.interop.diffusers import LayoutError, from_diffusers, to_diffusers, unet_from_config
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import DiffusersUNet, UNet
from ddpm_lightning.sampling import load_module

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's UNet2DModel config (the paper's CIFAR-10 network) and google/ddpm-celebahq-256's
CIFAR10_32 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None, "norm_eps": 1e-6, "norm_num_groups": 32, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "act_fn": "silu", "center_input_sample": False,
    "mid_block_scale_factor": 1, "time_embedding_type": "positional",
}  # fmt: skip
CELEBAHQ_256 = CIFAR10_32 | {
    "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}  # fmt: skip
# a tiny network of the same layout: attention at the second level (16x16 of 32x32)
TINY = CIFAR10_32 | {
    "layers_per_block": 1, "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip


def _unet2d(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A UNet2DModel with every parameter random (norms and zero-initialised layers included), in eval mode."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if dtype != torch.float32:
        model = model.to(dtype)
    return model


def _pipeline_folder(path: Path, config: dict, **scheduler: object) -> Path:
    diffusers.DDPMPipeline(unet=_unet2d(config), scheduler=diffusers.DDPMScheduler(**scheduler)).save_pretrained(path)
    return path


def _ours(model: nn.Module) -> UNet:
    from ddpm_lightning.interop.diffusers import unet_state_dict

    net = unet_from_config(model.config).to(next(model.parameters()).dtype)
    net.load_state_dict(unet_state_dict(net, model.state_dict()))
    return net.eval()


def _randomised(module: DiffusionModule, seed: int = 1) -> DiffusionModule:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _save(module: DiffusionModule, path: Path) -> Path:
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, path)
    return path


def _tiny_module(**settings: object) -> DiffusionModule:
    net = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)
    return _randomised(DiffusionModule(net, **settings))


# ------------------------------------------------------------------------------------------------ the network
@pytest.mark.unit
def test_the_32x32_layout_computes_unet2dmodels_function():
    model = _unet2d(CIFAR10_32)
    net = _ours(model)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    assert (net.init_args["downsample_padding"], net.init_args["norm_eps"]) == ("same", 1e-6)
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0, 1, 250, 999):
            timesteps = torch.full((2,), t)
            torch.testing.assert_close(net(x_t, timesteps), model(x_t, timesteps).sample, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_256x256_layout_computes_unet2dmodels_function_in_float64():
    model = _unet2d(CELEBAHQ_256, dtype=torch.float64)
    net = _ours(model)
    assert sum(p.numel() for p in net.parameters()) == 113_673_219
    x_t = torch.randn(1, 3, 256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0, 999):
            timesteps = torch.full((1,), t)
            torch.testing.assert_close(net(x_t, timesteps), model(x_t, timesteps).sample, rtol=1e-9, atol=1e-9)


@pytest.mark.unit
def test_symmetric_padding_maps_to_downsample_padding_1():
    model = _unet2d(TINY | {"downsample_padding": 1, "norm_eps": 1e-5})
    net = _ours(model)
    assert (net.init_args["downsample_padding"], net.init_args["norm_eps"]) == ("symmetric", 1e-5)
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(net(x_t, t), model(x_t, t).sample, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_scale_shift_maps_to_resnet_time_scale_shift_and_computes_unet2dmodels_function():
    model = _unet2d(TINY | {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32})
    net = _ours(model)
    assert net.init_args["time_conditioning"] == "scale_shift"
    x_t, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(net(x_t, t), model(x_t, t).sample, rtol=0, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift='spatial' does not map"),
        ({"resnet_time_scale_shift": "scale_shift"}, "needs attn_norm_num_groups=32"),
        ({"attention_head_dim": 8}, "attention_head_dim=8"),
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos=True"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "do not mirror"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types[1]='CrossAttnDownBlock2D'"),
    ],
)
def test_a_config_that_does_not_map_is_refused_naming_the_setting(change, named):
    with pytest.raises(LayoutError) as error:
        unet_from_config(TINY | change)
    assert named in str(error.value)


@pytest.mark.unit
def test_weights_that_do_not_fit_are_refused_naming_the_first_parameter():
    from ddpm_lightning.interop.diffusers import unet_state_dict

    net = unet_from_config(TINY)
    weights = _unet2d(TINY).state_dict()
    with pytest.raises(LayoutError, match=r"down_blocks\.0\.resnets\.0\.conv1\.weight has shape \(32, 32, 3, 1\)"):
        unet_state_dict(net, weights | {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 1)})
    with pytest.raises(LayoutError, match=r"parameter mid_block\.extra\.weight has no counterpart"):
        unet_state_dict(net, weights | {"mid_block.extra.weight": torch.zeros(1)})
    missing = dict(weights)
    del missing["up_blocks.0.attentions.0.to_k.bias"]
    with pytest.raises(LayoutError, match=r"no parameter up_blocks\.0\.attentions\.0\.to_k\.bias"):
        unet_state_dict(net, missing)


# ------------------------------------------------------------------------------------------------ the schedule
@pytest.mark.unit
@pytest.mark.parametrize(
    "scheduler",
    [
        {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        {"beta_schedule": "linear", "num_train_timesteps": 200, "beta_start": 1e-3, "beta_end": 0.05},
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
    ],
)
def test_our_schedule_equals_the_schedulers_betas(tmp_path, scheduler):
    from_diffusers(_pipeline_folder(tmp_path / "pipe", TINY, **scheduler), tmp_path / "m.ckpt")
    module = load_module(tmp_path / "m.ckpt", "cpu")
    expected = diffusers.DDPMScheduler(**scheduler).betas.double()  # float32
    torch.testing.assert_close(module.diffusion.betas.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("variance", "objective", "out"),
    [("fixed_large", "eps", 1), ("fixed_small", "v", 1), ("learned_range", "eps", 2), ("fixed_small", "x0", 1)],
)
def test_one_ancestral_step_agrees_with_ddpm_scheduler_step(variance, objective, out):
    module = DiffusionModule(UNet(ch=32, ch_mult=(1,), attn_resolutions=(), image_size=8), variance=variance,
                             objective=objective)  # fmt: skip
    diffusion = module.diffusion.double()
    names = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
    scheduler = diffusers.DDPMScheduler(variance_type=variance, prediction_type=names[objective], clip_sample=True)
    # the scheduler's tables from its own formula in float64, so that what is compared is the step, not float32
    # rounding (which the scheduler's float32 cumulative product amplifies near t = T)
    scheduler.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    output = torch.randn(2, 3 * out, 8, 8, generator=generator, dtype=torch.float64)
    for t in (999, 500, 3, 0):
        expected = scheduler.step(output, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        # the noise the scheduler draws
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        timesteps = torch.full((2,), t)
        mean_output, var_values = diffusion.split_output(output)
        eps = diffusion.model_output_to_eps(mean_output, x_t, timesteps)
        ours = samplers.ddpm_step(diffusion, eps, x_t, timesteps, noise, clip_denoised=True, var_values=var_values)
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ conversions
@pytest.mark.integration
def test_a_converted_pipeline_folder_samples_with_the_commands(tmp_path, capsys):
    folder = _pipeline_folder(tmp_path / "pipe", TINY, variance_type="fixed_small", prediction_type="v_prediction")
    with pytest.raises(SystemExit) as status:
        main(["convert", "--from-diffusers", str(folder), "--out", str(tmp_path / "m.ckpt"), "--sampler", "ddim"])
    assert status.value.code == 0
    assert "variance fixed_small, objective v" in capsys.readouterr().out
    module = load_module(tmp_path / "m.ckpt", "cpu")
    assert (module.hparams.variance, module.hparams.objective, module.sampler_config.name) == (
        "fixed_small",
        "v",
        "ddim",
    )
    model = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(module.net(x_t, t), model(x_t, t).sample, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit) as status:
        main(["sample", "--ckpt", str(tmp_path / "m.ckpt"), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s")])
    assert status.value.code == 0 and len(list((tmp_path / "s").glob("0*.png"))) == 2


@pytest.mark.unit
def test_the_fixed_variance_can_be_chosen_when_converting(tmp_path):
    folder = _pipeline_folder(tmp_path / "pipe", TINY, variance_type="fixed_small")
    assert from_diffusers(folder, tmp_path / "a.ckpt", variance="fixed_large").hparams.variance == "fixed_large"
    learned = _pipeline_folder(tmp_path / "learned", TINY | {"out_channels": 6}, variance_type="learned_range")
    with pytest.raises(LayoutError, match="the scheduler's is 'learned_range'"):
        from_diffusers(learned, tmp_path / "b.ckpt", variance="fixed_large")


@pytest.mark.integration
def test_ours_to_diffusers_and_back_is_bit_identical(tmp_path):
    module = _tiny_module(schedule="cosine", objective="v", variance="learned_range")
    _save(module, tmp_path / "ours.ckpt")
    to_diffusers(tmp_path / "ours.ckpt", tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["prediction_type"], scheduler["variance_type"]) == (
        "squaredcos_cap_v2", "v_prediction", "learned_range")  # fmt: skip
    back = from_diffusers(tmp_path / "pipe", tmp_path / "back.ckpt")
    assert back.net.init_args == module.net.init_args
    theirs, ours = back.net.state_dict(), module.net.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert (back.schedule.name, back.hparams.objective, back.hparams.variance) == ("cosine", "v", "learned_range")


@pytest.mark.integration
def test_a_scale_shift_network_converts_to_diffusers_and_back_with_the_same_function(tmp_path):
    net = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
               time_conditioning="scale_shift")  # fmt: skip
    module = _randomised(DiffusionModule(net))
    _save(module, tmp_path / "ours.ckpt")
    to_diffusers(tmp_path / "ours.ckpt", tmp_path / "pipe")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    assert theirs.config.resnet_time_scale_shift == "scale_shift"
    x_t, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x_t, t).sample, module.net.eval()(x_t, t), rtol=0, atol=1e-5)
    back = from_diffusers(tmp_path / "pipe", tmp_path / "back.ckpt")
    assert back.net.init_args == module.net.init_args
    ours, again = module.net.state_dict(), back.net.state_dict()
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


@pytest.mark.integration
def test_the_written_folder_runs_as_a_ddpm_pipeline(tmp_path):
    _save(_tiny_module(), tmp_path / "ours.ckpt")
    with pytest.raises(SystemExit) as status:
        main(["convert", "--to-diffusers", str(tmp_path / "ours.ckpt"), "--out", str(tmp_path / "pipe")])
    assert status.value.code == 0
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and ((images >= 0) & (images <= 1)).all()
    assert not list(tmp_path.glob(".pipe*"))  # the temporary folder is gone


class _NotAUNet(nn.Module):
    image_size, in_channels = 8, 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x_t)


@pytest.mark.integration
def test_what_diffusers_cannot_express_is_refused(tmp_path):
    _save(_tiny_module(variance="learned"), tmp_path / "learned.ckpt")
    with pytest.raises(LayoutError, match="variance='learned' has no DDPMScheduler variance_type"):
        to_diffusers(tmp_path / "learned.ckpt", tmp_path / "a")
    module = DiffusionModule(_NotAUNet(), num_timesteps=10, schedule={"name": "linear", "beta_end": 0.002})
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, tmp_path / "other.ckpt")
    with pytest.raises(LayoutError, match="_NotAUNet has no UNet2DModel counterpart"):
        to_diffusers(tmp_path / "other.ckpt", tmp_path / "b", net=_NotAUNet())
    _save(_tiny_module(num_classes=10, p_uncond=0.1), tmp_path / "conditional.ckpt")
    with pytest.raises(LayoutError, match="class-conditional \\(num_classes=10\\).*not written"):
        to_diffusers(tmp_path / "conditional.ckpt", tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


# ------------------------------------------------------------------------------------------------ the adapter
@pytest.mark.integration
def test_a_diffusers_unet_is_an_injected_network_that_checkpoints_rebuild(tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(DiffusersUNet(TINY), num_timesteps=100)
    assert module.image_shape == (3, 32, 32)
    loaded = load_module(_save(_randomised(module), tmp_path / "m.ckpt"), "cpu")
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 99])
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x_t, t), module.net.eval()(x_t, t), rtol=0, atol=0)
    assert loaded.sample(1, "ddim", seed=0).shape == (1, 3, 32, 32)
    to_diffusers(tmp_path / "m.ckpt", tmp_path / "pipe")  # its UNet2DModel as it is
    exported = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    assert all(torch.equal(v, loaded.net.unet.state_dict()[k]) for k, v in exported.state_dict().items())


@pytest.mark.unit
def test_the_adapter_loads_a_saved_unet2dmodel(tmp_path):
    model = _unet2d(TINY)
    model.save_pretrained(tmp_path / "unet")
    net = DiffusersUNet.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in net.unet.state_dict().items())
    assert net.init_args["config"]["block_out_channels"] == [32, 64] and net.image_size == 32
    # a bare UNet2DModel folder has no schedule to convert
    with pytest.raises(FileNotFoundError, match="cannot read a diffusers DDPMScheduler from .*unet, a local folder"):
        from_diffusers(tmp_path / "unet", tmp_path / "m.ckpt")


@pytest.mark.unit
def test_the_adapter_passes_labels_as_class_labels():
    torch.manual_seed(0)
    net = DiffusersUNet(TINY | {"num_class_embeds": 3}).eval()
    x_t, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 5]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(net(x_t, t, y=y), net.unet(x_t, t, class_labels=y).sample, rtol=0, atol=0)
        assert not torch.allclose(net(x_t, t, y=y), net(x_t, t, y=torch.tensor([1, 1])))


@pytest.mark.unit
def test_the_package_runs_without_diffusers_and_converting_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import ddpm_lightning.cli, ddpm_lightning.models, ddpm_lightning.interop.diffusers\n"
        "from ddpm_lightning.cli.convert import main\n"
        f"sys.exit(main(['--from-diffusers', {str(tmp_path)!r}, '--out', {str(tmp_path / 'm.ckpt')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install diffusers" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ fit --init_from
@pytest.mark.unit
def test_init_from_loads_the_weights_and_their_ema_and_names_a_parameter_that_does_not_fit(tmp_path):
    from ddpm_lightning.callbacks import EMA

    source = _tiny_module()
    checkpoint = {"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}
    averaged = {k: v + 1.0 for k, v in checkpoint["state_dict"].items()}  # as the EMA callback writes them
    checkpoint = checkpoint | {"current_model_state": checkpoint["state_dict"], "state_dict": averaged}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, tmp_path / "ema.ckpt")
    target = DiffusionModule(UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,)))
    trainer = L.Trainer(callbacks=[EMA(0.9)], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    message = init_from(target, trainer, tmp_path / "ema.ckpt")
    assert "and their EMA" in message and "dropout: checkpoint 0.0, this run 0.1" in message
    assert all(torch.equal(v, source.net.state_dict()[k]) for k, v in target.net.state_dict().items())
    ema = trainer.callbacks[0]
    ema.setup(trainer, target, "fit")
    average = ema.average_module().net.state_dict()
    assert all(torch.equal(v, averaged[f"net.{k}"]) for k, v in average.items())

    other = DiffusionModule(UNet(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,)))
    with pytest.raises(CheckpointError, match=r"temb\.0\.weight has shape \(128, 32\) there but \(256, 64\)"):
        init_from(other, trainer, tmp_path / "ema.ckpt")


@pytest.mark.integration
def test_fit_init_from_a_converted_checkpoint_trains_from_its_weights(tmp_path, capsys):
    folder = _pipeline_folder(tmp_path / "pipe", TINY | {"in_channels": 1, "out_channels": 1, "sample_size": 8})
    module = from_diffusers(folder, tmp_path / "m.ckpt")
    (tmp_path / "net.yaml").write_text(json.dumps(module.hparams["net"]))
    run = tmp_path / "run"
    args = ["fit", "--seed_everything=0", f"--model.net={tmp_path / 'net.yaml'}", "--model.lr_schedule.warmup_steps=1",
            "--model.lr=1e-12", "--data.class_path=ddpm_lightning.data.EmbeddedDigitsDataModule",
            "--data.init_args.batch_size=4",
            "--data.init_args.image_size=8", "--trainer.accelerator=cpu", "--trainer.max_steps=1",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={run}", f"--init_from={tmp_path / 'm.ckpt'}"]  # fmt: skip
    main(args)
    assert f"starting from the network weights of {tmp_path / 'm.ckpt'}" in capsys.readouterr().out
    final = load_module(next(run.rglob("*.ckpt")), "cpu")
    converted = module.net.state_dict()
    # one step at a learning rate of 1e-12: the weights are the converted ones up to that step
    assert all(torch.allclose(v, converted[k], rtol=0, atol=1e-9) for k, v in final.net.state_dict().items())
    with pytest.raises(SystemExit) as status:
        main([*args, f"--ckpt_path={tmp_path / 'm.ckpt'}"])
    assert status.value.code == 2 and "give one of them" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ online
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DDPM_ONLINE_TESTS") != "1", reason="fetches google/ddpm-cifar10-32: set "
                    "DDPM_ONLINE_TESTS=1 on a machine that is online")  # fmt: skip
def test_the_papers_cifar10_weights_convert_and_sample(tmp_path):
    module = from_diffusers("google/ddpm-cifar10-32", tmp_path / "cifar10.ckpt")
    assert sum(p.numel() for p in module.net.parameters()) == 35_746_307
    assert (module.schedule.name, module.hparams.num_timesteps, module.hparams.objective) == ("linear", 1000, "eps")
    loaded = load_module(tmp_path / "cifar10.ckpt", "cpu")
    images = loaded.sample(4, {"name": "ddim", "steps": 20}, seed=0)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    assert images.std() > 0.2  # images, not a constant


def test_a_hub_id_that_cannot_be_fetched_offline_says_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm_lightning.interop import diffusers as interop

    class LocalEntryNotFoundError(Exception):  # huggingface_hub's, by name
        pass

    class Unreachable:
        @classmethod
        def from_pretrained(cls, source: str, **options: object) -> None:
            try:
                raise LocalEntryNotFoundError("cannot find the requested files in the disk cache")
            except LocalEntryNotFoundError as err:
                raise OSError(f"{source} does not appear to have a file named config.json.") from err

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="this machine is offline .* or pass a local folder"):
        interop._pretrained(Unreachable, "google/ddpm-cifar10-32", "unet")
    monkeypatch.setattr(interop, "_OFFLINE_ERRORS", ())
    with pytest.raises(FileNotFoundError, match=r"a hub id \(fetched only when online\)"):
        interop._pretrained(Unreachable, "google/ddpm-cifar10-32", "unet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="this machine is offline"):
        interop._pretrained(Unreachable, "google/ddpm-cifar10-32", "unet")


def test_a_hub_id_on_a_machine_without_network_fails_at_once_in_one_line(tmp_path: Path) -> None:
    # the hub's address is a local port where nothing listens: no network is touched, and the connection is refused
    # as on an offline machine (huggingface_hub alone would retry each file for about a minute)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", "convert", "--from-diffusers", "google/ddpm-cifar10-32",
         "--out", str(tmp_path / "cifar10.ckpt")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("ddpm: error: cannot read a diffusers UNet2DModel from google/ddpm-cifar10-32, a hub id, ")
    assert "this machine is offline" in line and line.endswith("or pass a local folder")
    assert "Retrying" not in done.stderr and not (tmp_path / "cifar10.ckpt").exists()


def test_the_hub_is_unreachable_where_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm_lightning.interop.diffusers import hub_reachable

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hub_reachable(timeout=1)


@pytest.mark.unit
def test_the_deprecated_ema_decay_of_convert_is_dropped_with_a_warning():
    from ddpm_lightning.legacy import upgrade_convert_argv

    argv = ["--to-diffusers", "a.ckpt", "--ema-decay", "0.9", "--out", "b", "--ema-decay=0.5"]
    with pytest.warns(FutureWarning, match="--ema-decay is deprecated and ignored"):
        assert upgrade_convert_argv(argv) == ["--to-diffusers", "a.ckpt", "--out", "b"]
    assert upgrade_convert_argv(["--to-diffusers", "a.ckpt", "--out", "b"]) == [
        "--to-diffusers",
        "a.ckpt",
        "--out",
        "b",
    ]
