"""A config typo or a failed data module is one line naming the key, the file and the closest valid keys."""

from pathlib import Path

import pytest
from helpers import one_line_cli_error

from ddpm_lightning.cli import main
from ddpm_lightning.cli.config_errors import closest_keys, one_line, shorten_known_subclasses

pytestmark = pytest.mark.integration


def test_a_typo_in_a_yaml_key_names_the_key_the_file_and_the_closest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  lrr: 1.0e-3\n")
    err = one_line_cli_error(["fit", "-c", "configs/demo.yaml", "-c", str(config)], capsys)
    assert err == f"ddpm: error: model.lrr in {config} is not an option of `ddpm fit`: did you mean model.lr?"


def test_a_typo_on_the_command_line_names_the_option_and_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_cli_error(["fit", "-c", "configs/demo.yaml", "--model.lrr", "1e-3"], capsys)
    assert err == "ddpm: error: --model.lrr is not an option of `ddpm fit`: did you mean --model.lr?"
    err = one_line_cli_error(["fit", "-c", "configs/demo.yaml", "--trainer.max_stepz=3"], capsys)
    assert err.startswith("ddpm: error: --trainer.max_stepz is not an option") and "--trainer.max_steps" in err


def test_a_missing_image_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none"
    argv = ["fit", "-c", "configs/demo.yaml", "--data", "ddpm_lightning.data.ImageFolderDataModule",
            f"--data.root={missing}", "--data.image_size=28", "--data.channels=1"]  # fmt: skip
    err = one_line_cli_error(argv, capsys)
    assert err == f"ddpm: error: image folder {missing} does not exist or is not a folder"


def test_a_union_dump_becomes_its_one_reason_and_suggestions_stay_close() -> None:
    dump = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'ddpm_lightning.data.EmbeddedDigitsDataModule':
        Option 'root' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>"""
    assert one_line(dump) == "data: Option 'root' is not accepted (by ddpm_lightning.data.EmbeddedDigitsDataModule)"
    assert one_line("plain message") == "plain message"
    assert closest_keys("model.lrr", ["model.lr", "model.ch", "model.sampler", "trainer.lr"]) == ["model.lr"]
    assert closest_keys("model.zzzzz", ["model.lr", "trainer.max_steps"]) == []
    assert closest_keys("modle.lr", ["model.lr", "model.ch", "trainer.max_steps"]) == ["model.lr"]


def test_fit_help_lists_a_few_networks_not_every_importable_module(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 800  # 1,388 lines when every importable nn.Module was listed
    net = text[text.index("  --model.net NET") : text.index("  --model.image_size")]
    assert "ddpm_lightning.models.UNet" in net and "torch.ao" not in net and "importable ones" in net
    assert "configs/model/" in net


def test_shorten_known_subclasses_keeps_the_package_s_networks_first() -> None:
    paths = [f"torch.nn.M{i}" for i in range(20)] + ["ddpm_lightning.guard.G", "ddpm_lightning.models.UNet"]
    short = shorten_known_subclasses(f"(type: Module, known subclasses: {', '.join(paths)})", limit=3)
    assert short == (
        "(type: Module, known subclasses: ddpm_lightning.models.UNet, ddpm_lightning.guard.G, torch.nn.M0 "
        "and 19 more importable ones)"
    )
    assert shorten_known_subclasses("known subclasses: a.B, c.D)") == "known subclasses: a.B, c.D)"
