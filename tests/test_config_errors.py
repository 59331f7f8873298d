"""A config typo or a failed data module is one line naming the key, the file and the closest valid keys."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_line_cli_error

from ddpm_lightning.cli import is_first_process, main
from ddpm_lightning.cli.config_errors import allowed_values, closest_keys, one_line, shorten_known_subclasses

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


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


def test_bad_values_and_config_files_are_one_line_naming_the_value_the_file_and_what_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "tab.yaml").write_text("model:\n\tlr: 1.0e-3\n")
    (tmp_path / "mine.yaml").write_text("model:\n  objective: foo\n")
    (tmp_path / "sampler.yaml").write_text("model:\n  sampler:\n    name: fast\n")
    monkeypatch.chdir(tmp_path)
    demo = ["fit", "-c", "configs/demo.yaml", "--trainer.default_root_dir=run"]
    cases = {
        (*demo, "--model.objective=foo"): "--model.objective foo is not one of eps, x0, v",
        (*demo, "--trainer.max_steps=abc"): "--trainer.max_steps abc is not an integer",
        (*demo, "-c", "tab.yaml"): "tab.yaml line 2, column 1: a tab indents this line; YAML indents with spaces",
        (*demo, "-c", "mine.yaml"): "model.objective: foo in mine.yaml is not one of eps, x0, v",
        # the sampler setting is a mapping checked by SamplerConfig (each sampler's own options), not by the parser
        (*demo, "-c", "sampler.yaml"): "unknown sampler 'fast'; allowed: ddpm, ddim, dpmpp_2m, heun",
        (*demo, "--trainer.enable_progress_bar=maybe"): "--trainer.enable_progress_bar maybe is not true or false or"
                                                        " null",
        (*demo, "extra"): "unrecognized arguments: extra (`ddpm fit --help` lists the options)",
    }  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, expected in cases.items():
        assert one_line_cli_error(list(argv), capsys) == f"ddpm: error: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_config_file_that_does_not_exist_is_one_line_from_the_command(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    done = subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", "fit", "-c", "configs/dmeo.yaml"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    expected = "ddpm: error: config file configs/dmeo.yaml does not exist: did you mean configs/demo.yaml?"
    assert done.stderr.splitlines() == [expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]


def test_allowed_values_in_words() -> None:
    assert allowed_values("typing.Literal['eps', 'x0', 'v']") == "one of eps, x0, v"
    assert allowed_values("<class 'int'>") == "an integer" and allowed_values("<class 'float'>") == "a number"
    assert allowed_values("list[int]") == "list[int]"


def test_more_cpu_processes_than_cores_are_said_once_and_a_batch_they_cannot_share_before_they_start(
    tmp_path: Path,
) -> None:
    cores = os.cpu_count() or 1
    devices = next(d for d in range(cores + 1, cores + 33) if 32 % d)  # more than the cores; does not divide 32
    done = subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", "fit", "-c", str(REPO / "configs" / "demo.yaml"),
         "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.default_root_dir=run"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 2 and len(lines) <= 3, lines
    assert f"warning: trainer.devices={devices} starts {devices} processes on a CPU of {cores} cores" in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"ddpm: error: batch_size=32 is the global batch size and must be divisible by the world size ({devices} "
    )
    assert list(tmp_path.iterdir()) == []  # no process started, nothing written


def test_an_error_is_printed_by_the_first_process_of_a_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "samples")]
    assert "none.ckpt" in one_line_cli_error(argv, capsys)
    for name, rank in (("LOCAL_RANK", "1"), ("RANK", "2"), ("NODE_RANK", "1"), ("SLURM_PROCID", "3")):
        with monkeypatch.context() as env:
            env.setenv(name, rank)
            assert not is_first_process()
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("SLURM_PROCID", "0")  # one task of a SLURM job
    assert is_first_process()
