"""The torch-free choices of the command lines match the library's names, and a command's --help imports no torch."""

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from ddpm_lightning import choices
from ddpm_lightning.cli import COMMANDS

pytestmark = pytest.mark.unit


def test_choices_match_the_library_names() -> None:
    from ddpm_lightning import diffusion
    from ddpm_lightning.diffusion.gaussian import VARIANCES
    from ddpm_lightning.evaluation import guidance, inception_weights
    from ddpm_lightning.evaluation.fidelity import DATASETS, METRICS, PAPER_NUM_SAMPLES

    assert diffusion.samplers.registered()[: len(choices.SAMPLERS)] == choices.SAMPLERS
    assert set(diffusion.SPACINGS) == set(choices.SPACINGS)
    assert choices.SCHEDULES == diffusion.SCHEDULES
    assert choices.VARIANCES == VARIANCES
    assert (choices.METRICS, choices.EVAL_DATASETS, choices.PAPER_NUM_SAMPLES) == (METRICS, DATASETS, PAPER_NUM_SAMPLES)
    sweep_module = sys.modules["ddpm_lightning.evaluation.sampler_sweep"]
    assert set(sweep_module.SETTINGS) == set(choices.SWEEP_SETTINGS)
    assert (choices.SWEEP_STEPS, choices.SWEEP_DATASETS) == (sweep_module.STEPS, sweep_module.DATASETS)
    assert choices.GUIDANCE_SCALES == guidance.SCALES
    assert choices.FID_WEIGHTS_SOURCES == get_args(inception_weights.WeightsSource)
    assert choices.FID_WEIGHTS_FILENAME == inception_weights.FID_WEIGHTS_FILENAME


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"ablate"}))
def test_a_commands_help_imports_no_torch(command: str) -> None:
    code = (
        "import sys\nfrom ddpm_lightning.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"ddpm {command}" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_top_level_help_lists_every_command_without_importing_them() -> None:
    code = (
        "import sys\nfrom ddpm_lightning.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert all(name in done.stdout for name in COMMANDS) and "ddpm fit --help" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_an_unknown_command_is_one_line_with_the_closest_command(capsys: pytest.CaptureFixture[str]) -> None:
    from ddpm_lightning.cli import main

    for typo, hint in (("tset", "did you mean test?"), ("sampel", "did you mean sample?"), ("xyzzy", "ddpm --help"),
                       ("trian", "did you mean fit?"), ("train", "did you mean fit?")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main([typo])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ddpm: error: unknown command {typo!r}: ") and hint in err and len(err.splitlines()) == 1


def test_version_and_python_m_answer_without_importing_torch() -> None:
    from ddpm_lightning import __version__

    code = (
        "import runpy, sys\nsys.argv = ['ddpm', '--version']\n"
        "try:\n    runpy.run_module('ddpm_lightning', run_name='__main__')\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [f"ddpm-lightning {__version__}", "exit 0 False"]


def test_the_folders_the_documented_commands_write_are_ignored_by_git() -> None:
    root = Path(__file__).resolve().parents[1]
    paths = ["samples/grid.png", "weights/fid-inception.pth", "results/guidance/grid_s3.png", "runs/demo/demo.ckpt"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert done.stdout.split() == paths


def test_make_install_says_what_it_does_and_shows_pips_progress() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP): pyproject.toml") :].split("\n\n")[0]
    assert "pip install -q" not in recipe and "echo" in recipe
