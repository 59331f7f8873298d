"""``ddpm sampler-sweep``: the table, CSV and plot of each sampler's quality against the number of network evaluations,
on a tiny digits model."""

import csv
import re
from datetime import date
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import CLASSIFIER_TEST_EPOCHS, run_cli
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation import SETTINGS
from ddpm_lightning.evaluation.sampler_sweep import run_info, training_digits
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet

pytestmark = pytest.mark.integration
T = 20


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 1x32x32 model with T = 20, saved as `ddpm fit` would after training on the digits."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    module = DiffusionModule(net, schedule="cosine", objective="v", num_timesteps=T)
    path = tmp_path_factory.mktemp("ckpt") / "digits.ckpt"
    datamodule = {"_class_path": "ddpm_lightning.data.EmbeddedDigitsDataModule", "val_fraction": 0.1, "seed": 0}
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": datamodule,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_digits_checkpoint_is_scored_on_its_training_split_and_tables_say_where_they_were_made() -> None:
    # the split is the checkpoint's seed and held-out fraction, at the classifier's 32 pixels whatever the model's
    digits = training_digits("digits", {"seed": 3, "val_fraction": 0.2, "image_size": 28, "batch_size": 7})
    assert (digits.seed, digits.val_fraction, digits.image_size) == (3, 0.2, 32)
    other = training_digits("cifar10", {"seed": 3, "val_fraction": 0.2})
    assert (other.seed, other.val_fraction) == (0, 0.1)  # another data set's split says nothing about the digits
    info = run_info(torch.device("cpu"))
    assert info == {"device": "CPU", "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "date": date.today().isoformat()}  # fmt: skip


def test_sweep_writes_the_table_csv_and_plot(digits_ckpt: Path, classifier_cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "samplers"
    run_cli("sampler-sweep", "--ckpt", digits_ckpt, "--out", out, "--steps", T, 4, "--num", 6, "--batch-size", 4,
            "--classifier-epochs", CLASSIFIER_TEST_EPOCHS, "--classifier-cache-dir", classifier_cache)  # fmt: skip

    rows = read_csv(out / "table.csv")
    assert list(rows[0]) == ["setting", "sampler", "spacing", "eta", "nfe", "frechet_distance", "class_entropy",
                             "confident_share", "seconds", "images_per_s", "same_as"]  # fmt: skip
    settings = ["ddpm", "ddim", "ddim_quadratic", "dpmpp_2m", "heun"]
    assert list(SETTINGS) == settings and SETTINGS["ddim_quadratic"] == SamplerConfig("ddim", spacing="quadratic")
    # Heun in the column of its evaluations: (NFE + 1) // 2 steps make 2 steps - 1 evaluations
    heun = [("heun", 19), ("heun", 3)]
    assert [(r["setting"], int(r["nfe"])) for r in rows] == [(s, n) for s in settings[:-1] for n in (T, 4)] + heun
    assert all(float(r["images_per_s"]) > 0 and float(r["frechet_distance"]) >= 0 for r in rows)
    # on all T timesteps quadratic spacing is uniform spacing: sampled once, reported twice
    quadratic_full = next(r for r in rows if r["setting"] == "ddim_quadratic" and r["nfe"] == str(T))
    ddim_full = next(r for r in rows if r["setting"] == "ddim" and r["nfe"] == str(T))
    assert quadratic_full["same_as"] == "ddim" and quadratic_full["frechet_distance"] == ddim_full["frechet_distance"]

    table = (out / "table.md").read_text()
    assert f"| sampler | {T} | 4 |" in table and "| dpmpp_2m |" in table and "real held-out digits score" in table
    assert Image.open(out / "quality_vs_nfe.png").size[0] > 0
    printed = capsys.readouterr().out
    assert "dpmpp_2m" in printed and str(out / "table.md") in printed
    assert not list(out.glob("*.tmp"))


def test_sweep_compares_several_checkpoints_in_one_table(
    digits_ckpt: Path, classifier_cache: Path, tmp_path: Path
) -> None:
    # a second model of the 28-pixel digits shape would be refused next to this 32-pixel one; the same file twice
    # under two labels gives two rows per setting with the same samples
    out = tmp_path / "samplers"
    run_cli("sampler-sweep", "--ckpt", digits_ckpt, digits_ckpt, "--labels", "fixed", "learned", "--out", out,
            "--samplers", "ddpm", "--steps", 4, 2, "--num", 4, "--classifier-epochs", CLASSIFIER_TEST_EPOCHS,
            "--classifier-cache-dir", classifier_cache)  # fmt: skip
    rows = read_csv(out / "table.csv")
    assert [(r["setting"], r["nfe"]) for r in rows] == [
        ("fixed ddpm", "4"), ("fixed ddpm", "2"), ("learned ddpm", "4"), ("learned ddpm", "2")
    ]  # fmt: skip
    assert rows[0]["frechet_distance"] == rows[2]["frechet_distance"] and rows[2]["same_as"] == ""
    table = (out / "table.md").read_text()
    assert "| fixed ddpm |" in table
    assert table.split("\n")[0].count("schedule") == 1  # two checkpoints of one process: it is described once


def test_sweep_scores_fid_for_other_data(digits_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_fid(images: torch.Tensor, **kwargs: object) -> float:
        assert images.dtype == torch.uint8 and kwargs["data"] == "cifar10"
        calls.append(len(images))
        return 12.5

    monkeypatch.setattr("ddpm_lightning.evaluation.sampler_sweep.fid_of_images", fake_fid)
    # the checks made before sampling: FID's weights and real images (none here)
    monkeypatch.setattr("ddpm_lightning.evaluation.sampler_sweep.fetch_fid_weights", lambda weights: weights)
    monkeypatch.setattr("ddpm_lightning.evaluation.sampler_sweep.reference_set", lambda *args: None)
    out = tmp_path / "samplers"
    run_cli("sampler-sweep", "--ckpt", digits_ckpt, "--out", out, "--data", "cifar10", "--steps", 3,
            "--samplers", "ddim", "dpmpp_2m", "--num", 4)  # fmt: skip
    rows = read_csv(out / "table.csv")
    assert calls == [4, 4] and [r["fid"] for r in rows] == ["12.5", "12.5"] and "frechet_distance" not in rows[0]
    assert "**FID**" in (out / "table.md").read_text()


@pytest.mark.filterwarnings("ignore:ddpm sampler-sweep. --nfe is deprecated:FutureWarning")  # the --nfe case
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], r"steps 0: .* \[1, 20\]"),
        (["--steps", "10", "21"], r"steps 21: .* \[1, 20\]"),
        (["--nfe", "10", "21"], r"steps 21: .* \[1, 20\]"),  # the deprecated spelling of --steps
        (["--num", "1"], "num must be >= 2"),
    ],
)
def test_bad_settings_are_clear_errors(digits_ckpt: Path, tmp_path: Path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sampler-sweep", "--ckpt", str(digits_ckpt), "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error:")
    assert re.search(message, err)
