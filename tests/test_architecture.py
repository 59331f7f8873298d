"""The module's seams: an injected network (in Python and in YAML), the one image shape, every trainable parameter
under the optimizer and the non-finite guard, checkpoints of earlier versions, and no import cycle."""

import ast
import inspect
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from ddpm_lightning.callbacks import default_callbacks
from ddpm_lightning.cli import main
from ddpm_lightning.cli.fit import DDPMCLI, data_shape, shape_from_data
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.legacy import FLAT_MODEL_SETTINGS, upgrade_hyperparameters
from ddpm_lightning.legacy import UNET_LEGACY_SETTINGS as LEGACY
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.optim import LRSchedule
from ddpm_lightning.sampling import load_module

FIXTURES = Path(__file__).parent / "fixtures"
PACKAGE = Path(__file__).parents[1] / "src" / "ddpm_lightning"
REPO = Path(__file__).parents[1]


class ConvStack(nn.Module):
    """A network that is not the template's: three convolutions that ignore t."""

    def __init__(self, channels: int = 1, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(x_t)


def _trainer(tmp_path: Path, max_steps: int = 3) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=default_callbacks(0.0, progress_bar=False),  # no EMA
    )


# ------------------------------------------------------------------------------------------------ the network
@pytest.mark.unit
def test_the_default_network_is_the_papers_unet():
    module = DiffusionModule()
    assert isinstance(module.net, UNet) and module.image_shape == (3, 32, 32)
    assert sum(p.numel() for p in module.net.parameters()) == 35_746_307
    assert module.hparams.net["class_path"] == "ddpm_lightning.models.unet.UNet"


@pytest.mark.unit
def test_an_injected_network_gets_its_shape_from_the_module_and_is_checked_by_a_dummy_forward():
    module = DiffusionModule(net=ConvStack(1), image_size=8, in_channels=1, num_timesteps=10, schedule="cosine")
    assert module.image_shape == (1, 8, 8)
    assert module.sample(2, SamplerConfig("ddim", 3)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"ConvStack fails on x_t of shape \(1, 3, 8, 8\)"):
        DiffusionModule(net=ConvStack(1), image_size=8, in_channels=3, num_timesteps=10, schedule="cosine")

    class FirstChannel(nn.Module):
        def forward(self, x_t, t):
            return x_t[:, :1]

    with pytest.raises(ValueError, match=r"returns \(1, 1, 8, 8\) for x_t of shape \(1, 3, 8, 8\)"):
        DiffusionModule(net=FirstChannel(), image_size=8, in_channels=3, num_timesteps=10, schedule="cosine")
    with pytest.raises(ValueError, match="set model.image_size"):
        DiffusionModule(net=ConvStack(1), in_channels=1)
    ConvStack.in_channels = 1  # a network that says its channels: the module's must agree
    try:
        with pytest.raises(ValueError, match="model.in_channels=3 but the network ConvStack has in_channels=1"):
            DiffusionModule(net=ConvStack(1), image_size=8, in_channels=3)
    finally:
        del ConvStack.in_channels


@pytest.mark.unit
def test_the_flat_shape_composes_over_a_unet_preset():
    preset = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16)
    module = DiffusionModule(net=preset, image_size=8, num_timesteps=100)
    assert module.net.init_args["image_size"] == 8 and module.image_shape == (1, 8, 8)
    assert module.hparams.net["init_args"]["image_size"] == 8


@pytest.mark.unit
def test_the_deprecated_flat_settings_are_mapped_where_settings_are_read_not_by_the_module():
    assert not set(inspect.signature(DiffusionModule).parameters) & set(FLAT_MODEL_SETTINGS)
    preset = {"class_path": "ddpm_lightning.models.UNet", "init_args": {"ch": 32, "ch_mult": [1, 2]}}
    upgraded = upgrade_hyperparameters({"net": preset, "ch": 64, "image_size": 8, "sampler": "ddim", "sample_steps": 5})
    assert upgraded["net"]["init_args"] == {"ch": 64, "ch_mult": [1, 2], "image_size": 8} | LEGACY
    assert upgraded["sampler"] == SamplerConfig("ddim", 5).to_dict() and not {"ch", "sample_steps"} & set(upgraded)
    # without a network: the U-Net of those versions (symmetric padding, GroupNorm eps 1e-5)
    assert upgrade_hyperparameters({"dropout": 0.0})["net"]["init_args"] == {"dropout": 0.0} | LEGACY
    with pytest.raises(ValueError, match="model.ch is a setting of the default U-Net, but model.net is ConvStack"):
        upgrade_hyperparameters({"net": ConvStack(1), "ch": 64})
    with pytest.raises(ValueError, match="model.ch_mult is a setting of the default U-Net, but model.net is a.Net"):
        upgrade_hyperparameters({"net": {"class_path": "a.Net", "init_args": {}}, "ch_mult": [1]})


@pytest.mark.unit
def test_the_deprecated_flat_settings_work_from_yaml_and_the_command_line_with_a_warning(tmp_path):
    (tmp_path / "old.yaml").write_text("model:\n  ch: 32\n  sample_steps: 5\n")
    args = ["-c", str(tmp_path / "old.yaml"), "--model.ch_mult=[1]", "--model.attn_resolutions=[]",
            "--model.sampler=ddim", "--data.class_path=ddpm_lightning.data.EmbeddedDigitsDataModule",
            "--data.init_args.image_size=8", "--trainer.logger=false", "--seed_everything=0"]  # fmt: skip
    warning = (r"model.ch=32, model.ch_mult=\[1\], model.attn_resolutions=\[\], model.sample_steps=5: deprecated, set "
               "model.net.init_args.ch, model.net.init_args.ch_mult, model.net.init_args.attn_resolutions, "
               "model.sampler.steps instead")  # fmt: skip
    with pytest.warns(FutureWarning, match=warning):
        cli = DDPMCLI(DiffusionModule, L.LightningDataModule, subclass_mode_data=True, args=args, run=False,
                      auto_configure_optimizers=False)  # fmt: skip
    init_args = cli.model.net.init_args
    assert {k: init_args[k] for k in ("ch", "ch_mult", "attn_resolutions", "image_size", "in_channels")} == {
        "ch": 32, "ch_mult": [1], "attn_resolutions": [], "image_size": 8, "in_channels": 1}  # fmt: skip
    assert init_args | LEGACY == init_args  # the U-Net of the versions that had the flat keys
    assert cli.model.sampler_config == SamplerConfig("ddim", 5) and "ch" not in cli.config.model


@pytest.mark.unit
def test_the_flat_settings_of_earlier_versions_are_set_in_their_grouped_settings():
    old = {"schedule": "linear", "beta_start": 2e-4, "beta_end": 0.01, "loss_weighting": "min_snr",
           "min_snr_gamma": 3.0, "warmup_steps": 7, "lr_schedule": "cosine", "adam_betas": [0.9, 0.99],
           "weight_decay": 0.1, "compile": False, "channels_last": False, "matmul_precision": "high",
           "nonfinite_loss": "skip", "ema_decay": 0.9}  # fmt: skip
    upgraded = upgrade_hyperparameters(old)
    assert upgraded == {  # the EMA's decay is its callback's (ddpm fit), not the module's
        "schedule": {"name": "linear", "beta_start": 2e-4, "beta_end": 0.01, "cosine_s": 0.008},
        "loss_weighting": {"name": "min_snr", "gamma": 3.0},
        "lr_schedule": LRSchedule("cosine", warmup_steps=7).to_dict(),
        "optimizer": {"betas": [0.9, 0.99], "weight_decay": 0.1},
        "runtime": {"compile": False, "channels_last": False, "matmul_precision": "high", "nonfinite_loss": "skip"},
    }
    module = DiffusionModule(net=ConvStack(1), image_size=8, in_channels=1, num_timesteps=100, **upgraded)
    assert module.adam.betas == (0.9, 0.99) and module.guard.mode == "skip" and module.diffusion.min_snr_gamma == 3.0
    assert module.diffusion.betas[-1].item() == pytest.approx(0.01 * 1000 / 100)  # rescaled by 1000 / T


@pytest.mark.unit
def test_the_flat_settings_of_earlier_versions_work_from_yaml_with_a_warning_naming_the_new_key(tmp_path):
    (tmp_path / "old.yaml").write_text("model:\n  beta_end: 0.01\n  warmup_steps: 7\n  adam_betas: [0.9, 0.99]\n")
    args = ["-c", str(tmp_path / "old.yaml"), "--model.compile=false",
            f"--model.net={REPO}/configs/model/unet_digits28_tiny.yaml",
            "--data.class_path=ddpm_lightning.data.EmbeddedDigitsDataModule", "--data.init_args.image_size=8",
            "--trainer.logger=false", "--seed_everything=0"]  # fmt: skip
    warning = (r"model.beta_end=0.01, model.warmup_steps=7, model.adam_betas=.*, model.compile=False: deprecated, set "
               "model.schedule.beta_end, model.lr_schedule.warmup_steps, model.optimizer.betas, model.runtime.compile "
               "instead")  # fmt: skip
    with pytest.warns(FutureWarning, match=warning):
        cli = DDPMCLI(DiffusionModule, L.LightningDataModule, subclass_mode_data=True, args=args, run=False,
                      auto_configure_optimizers=False)  # fmt: skip
    assert (cli.model.schedule.beta_end, cli.model.lr_schedule.warmup_steps, cli.model.adam.betas) == (
        0.01,
        7,
        (0.9, 0.99),
    )
    assert not {"beta_end", "warmup_steps", "adam_betas", "compile"} & set(vars(cli.config.model))


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:.* skipped for non-finite gradients so far")  # provoked: the guard's own report
def test_the_optimizer_and_the_nonfinite_guard_cover_every_trainable_parameter(tmp_path):
    class WithExtra(DiffusionModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = nn.Linear(1, 1)  # a trainable submodule beside the network

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + 0.0 * self.extra(torch.ones(1, 1)).sum()

    module = WithExtra(net=ConvStack(1), image_size=16, in_channels=1, num_timesteps=100,
                       runtime={"nonfinite_loss": "skip"}, lr_schedule={"warmup_steps": 0})  # fmt: skip
    optimizer = module.configure_optimizers()["optimizer"]
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in module.parameters()}
    # NaN gradients in the extra parameter alone, on every step: the guard must skip those updates
    module.extra.weight.register_hook(lambda grad: grad * math.nan)
    before = module.extra.weight.detach().clone()
    _trainer(tmp_path).fit(module, EmbeddedDigitsDataModule(batch_size=4, image_size=16))
    assert module.nonfinite_skips == 3
    assert torch.equal(module.extra.weight, before)


def _outside_yaml(tmp_path: Path, channels: int) -> Path:
    """A config that sets only ``model.net``: a network the package does not know, which does not say its shape."""
    net = {"class_path": f"{ConvStack.__module__}.ConvStack", "init_args": {"channels": channels, "width": 8}}
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump({"model": {"net": net}}))
    return tmp_path / "outside.yaml"


_FAST = ["--trainer.max_time=null", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
         '--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
         '"init_args": {"save_last": true}}']  # fmt: skip


@pytest.mark.integration
def test_a_network_from_outside_the_package_given_only_as_model_net_trains_on_the_demo_config_and_samples_back(
    tmp_path,
):
    main(["fit", "-c", str(REPO / "configs/demo.yaml"), "-c", str(_outside_yaml(tmp_path, 1)), *_FAST,
          "--trainer.max_steps=3", "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = load_module(last)
    assert type(module.net).__name__ == "ConvStack" and module.hparams.net["init_args"] == {"channels": 1, "width": 8}
    assert module.image_shape == (1, 28, 28)  # the demo data's, written once in configs/demo.yaml
    with pytest.raises(SystemExit) as status:
        main(["sample", "--ckpt", str(last), "--num", "3", "--out", str(tmp_path / "samples"), "--steps", "2"])
    assert status.value.code == 0
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 3


@pytest.mark.integration
def test_a_network_from_outside_the_package_given_only_as_model_net_trains_on_the_cifar10_config(tmp_path, cifar10_dir):
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs/cifar10.yaml"),
            "-c",
            str(_outside_yaml(tmp_path, 3)),
            *_FAST,
            "--trainer.logger=true",
            "--trainer.max_steps=2",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            f"--data.init_args.data_dir={cifar10_dir}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
        ]
    )  # fmt: skip  (a logger: the config's LearningRateMonitor needs one)
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert type(module.net).__name__ == "ConvStack" and module.image_shape == (3, 32, 32)  # CIFAR10DataModule's


@pytest.mark.unit
def test_the_shape_comes_from_the_data_only_where_neither_the_config_nor_the_network_gives_it():
    from jsonargparse import Namespace

    cifar = Namespace(class_path="ddpm_lightning.data.CIFAR10DataModule", init_args=Namespace(batch_size=4))
    assert data_shape(cifar) == (32, 3)  # class attributes
    digits = Namespace(class_path="ddpm_lightning.data.EmbeddedDigitsDataModule", init_args=Namespace(image_size=28))
    assert data_shape(digits) == (28, 1)
    preset = Namespace(class_path="ddpm_lightning.models.UNet", init_args=Namespace(ch=16, image_size=None))
    config = Namespace(model=Namespace(net=preset, image_size=None, in_channels=None), data=digits)
    assert shape_from_data(config) == {"image_size": 28, "in_channels": 1}
    assert preset.init_args.image_size == 28 and "in_channels" not in preset.init_args  # an argument left at None
    said = Namespace(class_path="a.Net", init_args=Namespace(image_size=16, in_channels=None))
    config = Namespace(model=Namespace(net=said, image_size=None, in_channels=3), data=digits)
    assert shape_from_data(config) == {}  # the network's image_size and the config's in_channels stay
    assert said.init_args.in_channels == 3 and config.model.image_size is None  # the config's, for the network too


@pytest.mark.integration
def test_an_explicit_shape_that_conflicts_with_the_datas_is_an_error_naming_both(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(REPO / "configs/demo.yaml"), *_FAST, "--model.image_size=16", "--trainer.max_steps=1",
              "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    assert (
        "the data (EmbeddedDigitsDataModule) has 1x28x28 images but the model expects 1x16x16: set model.image_size=28"
        in capsys.readouterr().err
    )


# ------------------------------------------------------------------------------------------------ old checkpoints
@pytest.mark.unit
def test_a_checkpoint_written_before_the_network_was_injected_samples_the_same_images():
    # written by `ddpm fit` at commit d7184d8 (flat U-Net hyper-parameters, `unet.*` weights, sampler "ddim" with
    # sample_steps 10); the samples were drawn from it with that version on an AVX-512 CPU. Other CPUs (AVX2, and
    # AVX-512 machines of another generation, whose oneDNN kernels sum in another order) round differently, so the
    # images must agree to float32 rounding: a wrong network or sampler moves them by far more
    module = load_module(FIXTURES / "legacy_digits8.ckpt", "cpu")
    expected = torch.load(FIXTURES / "legacy_digits8_samples.pt", weights_only=True)
    tolerance = 1e-4
    assert module.sampler_config == SamplerConfig("ddim", 10)
    for key, sampler, seeds in [("ddim10_seeds0-3", None, [0, 1, 2, 3]), ("ddpm100_seeds5-6", SamplerConfig("ddpm"),
                                [5, 6]), ("dpmpp_2m5_seeds7-8", SamplerConfig("dpmpp_2m", 5), [7, 8])]:  # fmt: skip
        torch.testing.assert_close(module.sample(len(seeds), sampler, seeds=seeds), expected[key], rtol=0,
                                   atol=tolerance)  # fmt: skip


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the old checkpoint was written in another folder
@pytest.mark.filterwarnings("ignore:model.ema_decay=0.9 is deprecated")  # the old checkpoint's setting
def test_a_checkpoint_written_before_the_network_was_injected_resumes_training(tmp_path):
    run = tmp_path / "run"
    main(["fit", "--seed_everything=0", "--data.class_path=ddpm_lightning.data.EmbeddedDigitsDataModule",
          "--data.init_args.batch_size=8", "--data.init_args.image_size=8", "--trainer.accelerator=cpu",
          "--trainer.max_steps=5", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={run}",
          '--trainer.callbacks=[{"class_path": "ddpm_lightning.callbacks.EMA", "init_args": {"decay": 0.9}},'
          ' {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}]',
          f"--ckpt_path={FIXTURES / 'legacy_digits8.ckpt'}"])  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5
    assert all(key.startswith(("net.", "diffusion.")) for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["net"]["init_args"]["ch_mult"] == [1]
    # the U-Net of that version: symmetric down-sampling padding and torch's GroupNorm eps, now recorded
    assert (
        checkpoint["hyper_parameters"]["net"]["init_args"] | LEGACY
        == checkpoint["hyper_parameters"]["net"]["init_args"]
    )


def _unet_checkpoint(path: Path, drop: tuple[str, ...] = ()) -> DiffusionModule:
    """A checkpoint of a small U-Net (paper settings) whose stored init_args lack ``drop``, as earlier versions
    wrote them."""
    torch.manual_seed(0)
    module = DiffusionModule(UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                  image_size=8), num_timesteps=100)  # fmt: skip
    hparams = dict(module.hparams)
    init_args = {k: v for k, v in hparams["net"]["init_args"].items() if k not in drop}
    hparams["net"] = {**hparams["net"], "init_args": init_args}
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": hparams}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, path)
    return module


@pytest.mark.unit
def test_a_checkpoint_whose_unet_does_not_record_padding_and_eps_loads_with_the_old_ones(tmp_path):
    _unet_checkpoint(tmp_path / "old.ckpt", drop=tuple(LEGACY))
    module = load_module(tmp_path / "old.ckpt", "cpu")
    assert module.net.init_args | LEGACY == module.net.init_args
    assert {m.eps for m in module.net.modules() if isinstance(m, nn.GroupNorm)} == {1e-5}
    # the function of that version: a stride-2 convolution padded by one pixel on every side
    down = module.net.down[1][0]
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(down(x), torch.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
    assert module.hparams["net"]["init_args"]["norm_eps"] == 1e-5  # a checkpoint written now records them


@pytest.mark.unit
def test_a_checkpoint_that_records_padding_and_eps_loads_with_them(tmp_path):
    written = _unet_checkpoint(tmp_path / "new.ckpt")
    stored = torch.load(tmp_path / "new.ckpt", weights_only=True)["hyper_parameters"]["net"]["init_args"]
    assert (stored["downsample_padding"], stored["norm_eps"]) == ("same", 1e-6)
    module = load_module(tmp_path / "new.ckpt", "cpu")
    assert {m.eps for m in module.net.modules() if isinstance(m, nn.GroupNorm)} == {1e-6}
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 99])
    torch.testing.assert_close(module.net(x_t, t), written.net.eval()(x_t, t), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ imports
def _imports(path: Path, module: str, type_checking: bool = False) -> set[str]:
    """Every ddpm_lightning module that importing ``module`` runs (imports inside functions included, those under
    ``if TYPE_CHECKING:`` only with ``type_checking``), with the packages whose ``__init__`` runs on the way."""
    tree = ast.parse(path.read_text())
    skip = {
        id(node)
        for block in ast.walk(tree)
        if not type_checking and isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    found = set()
    parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # the packages on the way run their __init__ too
            candidate = ".".join(parts[:i])
            # the importer's own packages are already (partly) imported when it runs: not an edge
            if candidate in MODULES and candidate != module and candidate not in parents:
                found.add(candidate)
    return found


MODULES = {
    ".".join(("ddpm_lightning", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
    for p in PACKAGE.rglob("*.py")
}


@pytest.mark.unit
def test_the_package_has_no_import_cycle():
    graph = {name: _imports(path, name) for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.unit
def test_the_import_cycle_check_finds_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from ddpm_lightning.cli import main\n")
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ddpm_lightning.cli import main\n")
    assert _imports(a, "x") == {"ddpm_lightning.cli"}
    assert _imports(b, "x") == set()


# ------------------------------------------------------------------------------------------------ floors
def contributing_floors(text: str) -> dict[str, int]:
    """CONTRIBUTING's floors table: each `file.py` or `folder/` it names, with its floor."""
    section = text.split("## The floors", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for row in re.findall(r"^\| (\d+) \|(.*)\|$", section, flags=re.M):
        for name in re.findall(r"`([\w/.]+)`", row[1]):
            if name.endswith((".py", "/")):
                floors[name] = int(row[0])
    return floors


FLOORS = contributing_floors((REPO / "CONTRIBUTING.md").read_text())


def floor_of(module: str, floors: dict[str, int] = FLOORS) -> int | None:
    """The floor of ``ddpm_lightning.x.y``: that of `x/` for a module of the package x, of `x.py` for a module x."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return floors.get(f"{parts[0]}/" if len(parts) > 1 or f"{parts[0]}/" in floors else f"{parts[0]}.py")


def floor_violations(modules: dict[str, Path], floors: dict[str, int] = FLOORS) -> list[str]:
    """Each import of a higher floor (imports inside functions and under TYPE_CHECKING included)."""
    found = []
    for name, path in sorted(modules.items()):
        floor = floor_of(name, floors)
        for imported in sorted(_imports(path, name, type_checking=True)):
            other = floor_of(imported, floors)
            if floor is not None and other is not None and other > floor:
                found.append(f"{name} (floor {floor}) imports {imported} (floor {other})")
    return found


@pytest.mark.unit
def test_contributing_names_a_floor_for_every_module_of_the_package():
    assert {"io.py": 0, "compat.py": 0, "diffusion/": 1, "cli/": 5}.items() <= FLOORS.items()
    assert [name for name in MODULES if name != "ddpm_lightning" and floor_of(name) is None] == []


@pytest.mark.unit
def test_a_module_imports_only_its_floor_or_lower_ones():
    assert floor_violations(MODULES) == []


@pytest.mark.unit
def test_the_floor_check_finds_an_import_from_a_higher_floor(tmp_path):
    floors = {"io.py": 0, "diffusion/": 1, "cli/": 5}
    lazy, typed, fine = tmp_path / "lazy.py", tmp_path / "typed.py", tmp_path / "fine.py"
    lazy.write_text("def f():\n    from ddpm_lightning.diffusion import samplers\n")
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ddpm_lightning.cli import main\n")
    fine.write_text("from ddpm_lightning.io import atomic_write\n")
    modules = {"ddpm_lightning.io": lazy, "ddpm_lightning.diffusion.gaussian": typed, "ddpm_lightning.cli.x": fine}
    assert floor_violations(modules, floors) == [
        "ddpm_lightning.diffusion.gaussian (floor 1) imports ddpm_lightning.cli (floor 5)",
        "ddpm_lightning.io (floor 0) imports ddpm_lightning.diffusion (floor 1)",
        "ddpm_lightning.io (floor 0) imports ddpm_lightning.diffusion.samplers (floor 1)",
    ]


# ------------------------------------------------------------------------------------------------ private APIs
#: Calls whose first argument is a key, and the builtins whose second argument is an attribute name.
KEY_METHODS = {"get", "pop", "setdefault"}
ATTR_BUILTINS = {"getattr", "hasattr", "setattr", "delattr"}


def _private(name: object) -> bool:
    return isinstance(name, str) and name.startswith("_") and not name.startswith("__")


def own_names(trees: list[ast.AST]) -> set[str]:
    """Every name the package itself defines: functions, classes, assigned names and attributes, arguments, imports."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[-1])
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def private_uses(tree: ast.AST, own: set[str]) -> list[str]:
    """Each use of a library's private attribute or key in ``tree``: ``x._name`` (``self._name`` included), a key
    ``"_name"`` (subscript, ``.get``/``.pop``/``.setdefault``, ``in``) or ``getattr(x, "_name")``, where the package
    defines no ``_name`` of its own."""

    def foreign(name: object) -> bool:
        return _private(name) and name not in own

    found = []
    for node in ast.walk(tree):
        keys: list[ast.AST] = []
        if isinstance(node, ast.Attribute) and foreign(node.attr):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Subscript):
            keys = [node.slice]
        elif isinstance(node, ast.Call) and node.args:
            if isinstance(node.func, ast.Attribute) and node.func.attr in KEY_METHODS:
                keys = node.args[:1]
            elif isinstance(node.func, ast.Name) and node.func.id in ATTR_BUILTINS and len(node.args) > 1:
                keys = node.args[1:2]
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            keys = [node.left]
        found += [
            (key.lineno, ast.unparse(node)) for key in keys if isinstance(key, ast.Constant) and foreign(key.value)
        ]
    return [f"line {line}: {what}" for line, what in sorted(found)]


@pytest.mark.unit
def test_private_library_attributes_are_touched_in_compat_only():
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    own = own_names(list(trees.values()))
    found = {name: private_uses(tree, own) for name, tree in trees.items() if name != "ddpm_lightning.compat"}
    assert {name: uses for name, uses in found.items() if uses} == {}


@pytest.mark.unit
def test_the_private_attribute_check_finds_library_internals_and_passes_our_own():
    source = """
class Module(L.LightningModule):
    def __init__(self):
        self._mine = 1

    def f(self, w, hparams):
        fan = nn.init._calculate_fan_in_and_fan_out(w)
        if self._trainer is not None and self._mine:
            hparams.pop("_instantiator", None)
        return getattr(self, "_mine"), "_instantiator" in hparams, hparams["_class_path"]
"""
    tree = ast.parse(source)
    assert private_uses(tree, own_names([tree])) == [
        "line 7: nn.init._calculate_fan_in_and_fan_out",
        "line 8: self._trainer",
        "line 9: hparams.pop('_instantiator', None)",
        "line 10: '_instantiator' in hparams",
        "line 10: hparams['_class_path']",
    ]


# ------------------------------------------------------------------------------------------------ diffusion/
#: What ``diffusion/`` may not use: it is pure torch, without Lightning, progress bars or files.
IMPURE_MODULES = ("lightning", "pytorch_lightning", "tqdm", "PIL", "logging")
IMPURE_CALLS = {"open", "print", "torch.save", "torch.load", "np.save", "numpy.save"}
IMPURE_METHODS = {"write_text", "write_bytes", "read_text", "read_bytes", "mkdir", "open", "unlink"}


def impurities(tree: ast.AST) -> list[str]:
    """Imports of Lightning, progress bars or file helpers, and file I/O calls, in ``tree``."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] in IMPURE_MODULES]
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in IMPURE_CALLS or (isinstance(node.func, ast.Attribute) and node.func.attr in IMPURE_METHODS):
                found.append((node.lineno, f"{func}()"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


@pytest.mark.unit
def test_diffusion_has_no_lightning_progress_bar_or_file_io():
    found = {
        name: impurities(ast.parse(path.read_text()))
        for name, path in MODULES.items()
        if name.startswith("ddpm_lightning.diffusion")
    }
    assert {name: lines for name, lines in found.items() if lines} == {}


@pytest.mark.unit
def test_the_purity_check_finds_a_progress_bar_and_file_io():
    source = (
        "from tqdm.auto import tqdm\nimport torch\ntorch.save(x, 'a.pt')\nPath('b').write_text('c')\ntorch.randn(3)\n"
    )
    assert impurities(ast.parse(source)) == [
        "line 1: import tqdm.auto",
        "line 3: torch.save()",
        "line 4: Path('b').write_text()",
    ]
