"""The flat sampler arguments of the sampling callbacks of earlier versions (``num_steps``, ``eta``, ``spacing``):
read from a config of ``ddpm fit`` into their ``sampler`` with a warning (:mod:`ddpm_lightning.legacy`), refused in
Python."""

import warnings
from pathlib import Path

import lightning as L
import pytest

from ddpm_lightning.callbacks import DemoReport, FIDCallback, SamplingCallback
from ddpm_lightning.cli import main
from ddpm_lightning.cli.fit import DDPMCLI
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.legacy import upgrade_callback_configs
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.unit

CONFIG = """
model:
  net:
    class_path: ddpm_lightning.models.UNet
    init_args: {ch: 32, ch_mult: [1], num_res_blocks: 1, attn_resolutions: []}
  num_timesteps: 50
data:
  class_path: ddpm_lightning.data.EmbeddedDigitsDataModule
  init_args: {batch_size: 4, image_size: 16}
trainer:
  accelerator: cpu
  logger: false
  callbacks:
    - class_path: ddpm_lightning.callbacks.SamplingCallback
      init_args: {every_n_steps: 100, num_steps: 20, spacing: quadratic}
    - class_path: DemoReport
      init_args: {sampler: dpmpp_2m, eta: 0.0}
"""


def test_a_config_s_flat_callback_arguments_set_its_sampler_with_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(CONFIG)
    fid = '{"class_path": "FIDCallback", "init_args": {"num_steps": 10, "eta": 1.0, "feature_extractor": null}}'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = DDPMCLI(
            DiffusionModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            args=["-c", str(config), f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks+={fid}"],
            auto_configure_optimizers=False,
            run=False,
        )
    deprecations = sorted(str(w.message) for w in caught if issubclass(w.category, FutureWarning))
    assert [m for m in deprecations if "init_args.sampler" in m] == [
        "DemoReport: init_args.eta=0.0: deprecated, set init_args.sampler.eta instead",
        "FIDCallback: init_args.num_steps=10, init_args.eta=1.0: deprecated, set init_args.sampler.steps, "
        "init_args.sampler.eta instead",
        "ddpm_lightning.callbacks.SamplingCallback: init_args.num_steps=20, init_args.spacing='quadratic': "
        "deprecated, set init_args.sampler.steps, init_args.sampler.spacing instead",
    ]
    kinds = (SamplingCallback, DemoReport, FIDCallback)
    samplers = {type(c): c.sampler for c in cli.trainer.callbacks if isinstance(c, kinds)}
    assert samplers == {
        SamplingCallback: SamplerConfig("ddim", 20, spacing="quadratic"),
        DemoReport: SamplerConfig("dpmpp_2m", 25),  # a bare name: the report's former 25 steps
        FIDCallback: SamplerConfig("ddim", 10, eta=1.0),
    }


def test_the_saved_config_shows_the_sampler_and_no_flat_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(CONFIG)
    with pytest.warns(FutureWarning, match="deprecated"), pytest.raises(SystemExit):
        main(["fit", "-c", str(config), "--print_config"])
    printed = capsys.readouterr().out
    assert "num_steps" not in printed and "spacing: quadratic" in printed and "name: dpmpp_2m" in printed


def test_a_bad_flat_value_names_the_callback() -> None:
    entry = {"class_path": "ddpm_lightning.callbacks.FIDCallback", "init_args": {"spacing": "log"}}
    with pytest.raises(ValueError, match=r"FIDCallback: unknown spacing 'log'; allowed: uniform, quadratic"):
        upgrade_callback_configs([entry])


def test_other_entries_and_today_s_sampler_are_left_as_they_are() -> None:
    config = {
        "trainer": {
            "callbacks": [
                {"class_path": "ddpm_lightning.callbacks.SamplingCallback", "init_args": {"sampler": "ddim"}},
                {"class_path": "my.Callback", "init_args": {"num_steps": 3}},
            ]
        },
        "model": {"sampler": {"name": "ddim", "eta": 1.0}},
    }
    assert upgrade_callback_configs(config) == (config, [])


@pytest.mark.parametrize("cls", [SamplingCallback, FIDCallback, DemoReport])
@pytest.mark.parametrize("argument", ["num_steps", "eta", "spacing"])
def test_python_callers_of_a_flat_argument_get_a_type_error(cls: type, argument: str) -> None:
    with pytest.raises(TypeError, match=argument):
        cls(**{argument: 1})
