"""The data layer: CIFAR-10 through torchvision's loader, its error messages, and the embedded digits."""

from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import pytest
import torch
import torchvision
from helpers import CIFAR_ARCHIVE

from ddpm_lightning.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    EmbeddedDigitsDataModule,
    images_of,
    labels_of,
    per_process_batch_size,
    to_model_range,
    to_uint8,
)
from ddpm_lightning.data import cifar10 as cifar10_module
from ddpm_lightning.data.transforms import SeededFlips, seeded_flip

pytestmark = pytest.mark.unit


def _ready(dm: CIFAR10DataModule | EmbeddedDigitsDataModule) -> CIFAR10DataModule | EmbeddedDigitsDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _raw_cifar(dataset: torchvision.datasets.CIFAR10) -> torch.Tensor:
    """The stored uint8 HWC pixels as (N, 3, 32, 32) in [-1, 1], written out here as the paper's scaling."""
    return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def test_to_uint8_inverts_model_range_and_clamps_overshoot() -> None:
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(pixels.float() / 255)), pixels)
    assert to_uint8(torch.tensor([-1.7, 1.3])).tolist() == [0, 255]


def test_images_of_a_batch_or_item_with_or_without_labels_and_a_clear_error_otherwise() -> None:
    x, y = torch.zeros(2, 1, 4, 4), torch.tensor([3, 5])
    assert images_of(x) is x and images_of((x, y)) is x and images_of([x, y]) is x and images_of((x,)) is x
    assert images_of({"image": x, "label": y}) is x and images_of({"pixel_values": x}) is x
    assert torch.equal(labels_of((x, y)), y) and torch.equal(labels_of({"labels": y, "images": x}), y)
    assert labels_of(x) is None and labels_of((x,)) is None and labels_of({"image": x}) is None
    assert labels_of((x[0], 3)).dtype == torch.long and int(labels_of((x[0], 3))) == 3  # a data set item
    with pytest.raises(TypeError, match="holds its images under one of image, images, pixel_values; got keys img"):
        images_of({"img": x})
    with pytest.raises(TypeError, match="got tuple whose images are a list"):
        images_of(([1, 2], y))


@pytest.mark.parametrize("form", ["pair", "mapping", "bare"])
def test_seeded_flips_flip_the_images_of_any_item_form_and_keep_the_labels(form: str) -> None:
    images = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 1, 2, 2)
    wrap = {"pair": lambda i: (images[i], i), "mapping": lambda i: {"image": images[i], "label": i},
            "bare": lambda i: images[i]}[form]  # fmt: skip
    flips = SeededFlips([wrap(i) for i in range(8)], seed=3)
    flipped = [seeded_flip(3, 1, i) for i in range(8)]
    assert 0 < sum(flipped) < 8  # both cases occur in this draw
    for i in range(8):
        item = flips[(1, i)]
        expected = images[i].flip(-1) if flipped[i] else images[i]
        assert torch.equal(images_of(item), expected)
        assert form == "bare" or int(labels_of(item)) == i


def test_cifar10_batch_is_float32_images_in_model_range(cifar10_dir: Path) -> None:
    dm = _ready(CIFAR10DataModule(str(cifar10_dir), batch_size=16, num_workers=2))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() < 0 < x.max()


def test_cifar10_splits_have_the_fake_sizes(cifar10_dir: Path) -> None:
    dm = _ready(CIFAR10DataModule(str(cifar10_dir), batch_size=16, num_workers=0))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 40, 40)
    assert len(dm.train_dataloader()) == 200 // 16  # drop_last on train only
    assert len(dm.val_dataloader()) == -(-40 // 16)


def test_cifar10_val_batch_equals_unflipped_data(cifar10_dir: Path) -> None:
    torch.manual_seed(0)
    dm = _ready(CIFAR10DataModule(str(cifar10_dir), batch_size=8, num_workers=0, random_flip=True))
    x, _ = next(iter(dm.val_dataloader()))
    assert torch.allclose(x, _raw_cifar(dm.val_set)[:8], atol=1e-6)


def test_cifar10_flips_train_images_only(cifar10_dir: Path) -> None:
    torch.manual_seed(0)
    dm = _ready(CIFAR10DataModule(str(cifar10_dir), batch_size=8, num_workers=0, random_flip=True))
    train_image = _raw_cifar(dm.train_set.dataset)[0]
    # the flip of an item is decided by (seed, epoch, index): the same on every read, different across epochs
    draws = [dm.train_set[(epoch, 0)][0] for epoch in range(32)]
    unflipped = [torch.allclose(d, train_image, atol=1e-6) for d in draws]
    flipped = [torch.allclose(d, train_image.flip(-1), atol=1e-6) for d in draws]
    assert all(u or f for u, f in zip(unflipped, flipped, strict=True))
    assert any(unflipped) and any(flipped)
    assert all(torch.equal(dm.train_set[(3, 0)][0], draws[3]) for _ in range(4))
    val_image = _raw_cifar(dm.val_set)[0]
    assert all(torch.allclose(dm.val_set[0][0], val_image, atol=1e-6) for _ in range(32))


def test_cifar10_real_images_dataset_is_unaugmented(cifar10_dir: Path) -> None:
    dataset = CIFAR10DataModule(str(cifar10_dir), random_flip=True).real_images_dataset("train")
    assert torch.allclose(torch.stack([dataset[i][0] for i in range(4)]), _raw_cifar(dataset)[:4], atol=1e-6)


@pytest.mark.parametrize("step", ["prepare_data", "setup"])
def test_missing_cifar10_error_names_archive_folder_and_download(tmp_path: Path, step: str) -> None:
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError) as error:
        getattr(dm, step)()
    assert isinstance(error.value, DataNotFoundError)
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and "cifar-10-batches-py" in message
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "download: true" in message


def test_offline_download_gives_the_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()


def test_archive_only_folder_is_extracted_and_loads(fake_cifar10_tarball: Path, cifar10_dir: Path) -> None:
    # `cifar10_dir` patches the md5s; the archive holds byte-identical copies of its files.
    dm = _ready(CIFAR10DataModule(str(fake_cifar10_tarball.parent), batch_size=8, num_workers=0))
    assert (fake_cifar10_tarball.parent / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 32, 32)


def test_a_node_that_extracts_the_archive_second_keeps_the_first_copy(fake_cifar10_tarball: Path) -> None:
    # two nodes' first processes extract the same archive on a shared file system: the later one finds the folder
    extract = cifar10_module._extract
    extract(fake_cifar10_tarball)
    first = (fake_cifar10_tarball.parent / "cifar-10-batches-py" / "data_batch_1").stat().st_ino
    extract(fake_cifar10_tarball)
    assert (fake_cifar10_tarball.parent / "cifar-10-batches-py" / "data_batch_1").stat().st_ino == first
    assert sorted(p.name for p in fake_cifar10_tarball.parent.iterdir()) == ["cifar-10-batches-py", CIFAR_ARCHIVE]


def test_corrupt_archive_error_names_the_file(fake_cifar10_tarball: Path) -> None:
    fake_cifar10_tarball.write_bytes(fake_cifar10_tarball.read_bytes()[:5000])
    with pytest.raises(DataNotFoundError) as error:
        CIFAR10DataModule(str(fake_cifar10_tarball.parent)).prepare_data()
    assert str(fake_cifar10_tarball) in str(error.value) and "corrupt" in str(error.value)
    assert not (fake_cifar10_tarball.parent / "cifar-10-batches-py").exists()


def test_global_batch_size_is_split_over_the_world_size(cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(str(cifar10_dir), batch_size=128, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=4)
    dm.setup("fit")
    assert dm.per_process_batch_size == 32
    assert dm.train_dataloader().batch_size == 32


def test_gradient_accumulation_keeps_the_global_batch(cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(str(cifar10_dir), batch_size=128, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=4)
    dm.setup("fit")
    assert dm.train_dataloader().batch_size == 16  # 2 processes x 4 micro-batches x 16 = 128 per optimizer step
    with pytest.raises(ValueError, match=r"batch_size=100 .*\(2 processes\) x 3 accumulated micro-batches.*of 6"):
        per_process_batch_size(100, 2, 3)


def test_batch_size_not_divisible_by_world_size_names_both() -> None:
    with pytest.raises(ValueError, match=r"batch_size=128.*divisible.*3 processes"):
        per_process_batch_size(128, 3)
    dm = EmbeddedDigitsDataModule(batch_size=10)
    dm.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match=r"batch_size=10.*4 processes"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("name", "value"), [("batch_size", 0), ("num_workers", -1), ("val_fraction", 1.0), ("image_size", 0)]
)
def test_bad_digits_argument_raises_naming_it(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name}.*{value}"):
        EmbeddedDigitsDataModule(**{name: value})


def test_digits_batch_is_one_channel_32px_in_model_range() -> None:
    x, y = next(iter(_ready(EmbeddedDigitsDataModule(batch_size=32, seed=0)).train_dataloader()))
    assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() <= 1  # the 2-pixel padding is background, -1


def test_digits_splits_are_disjoint_and_cover_all_5000(digits: EmbeddedDigitsDataModule) -> None:
    train_x, train_y = digits.split_arrays("train")
    val_x, val_y = digits.split_arrays("val")
    assert (len(train_y), len(val_y)) == (4500, 500)
    train_rows = {row.numpy().tobytes() for row in train_x.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in val_x.flatten(1))
    assert set(train_y.tolist()) == set(val_y.tolist()) == set(range(10))


def test_digits_split_depends_on_seed_only(digits: EmbeddedDigitsDataModule) -> None:
    torch.manual_seed(123)
    same = EmbeddedDigitsDataModule(seed=0).split_arrays("val")[1]
    other = EmbeddedDigitsDataModule(seed=1).split_arrays("val")[1]
    assert torch.equal(same, digits.split_arrays("val")[1])
    assert not torch.equal(other, same)


def test_digits_resize_to_other_image_size() -> None:
    images, _ = EmbeddedDigitsDataModule(image_size=16).split_arrays("val")
    assert images.shape == (500, 1, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_the_train_loader_resumes_in_the_middle_of_an_epoch_with_the_same_batches() -> None:
    from ddpm_lightning.data.base import ResumableDataLoader, ResumableSampler

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, key: tuple[int, int]) -> int:
            return key[1]

    dataset = Items()

    def loader(world_size: int = 1, batch_size: int = 4) -> ResumableDataLoader:
        return ResumableDataLoader(dataset, batch_size=batch_size, sampler=ResumableSampler(dataset, world_size, 0, 7))

    straight = loader()
    straight.sampler.set_epoch(1)
    batches = [b.clone() for b in straight]
    stopped = loader()
    stopped.sampler.set_epoch(1)
    iterator = iter(stopped)
    first = [next(iterator), next(iterator)]
    state = stopped.state_dict()
    assert state == {"epoch": 1, "batches": 2, "batch_size": 4, "world_size": 1}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch again
    assert [b.tolist() for b in first + list(resumed)] == [b.tolist() for b in batches]
    # the keys carry the epoch, for the seeded flips
    assert next(iter(ResumableSampler(dataset, 1, 0, 7)))[0] == 0
    # a state after the last batch of an epoch points at the next one
    list(iterator)
    assert stopped.state_dict()["epoch"] == 2 and stopped.state_dict()["batches"] == 0
    with pytest.raises(ValueError, match="1 processes and a global batch size of 4; this run has 2 and 8"):
        loader(world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="this run has 2 and 4"):
        loader(world_size=2, batch_size=2).load_state_dict(state)  # the same global batch size, other shards
    loader(world_size=2).load_state_dict({**state, "epoch": 2, "batches": 0})  # at an epoch boundary: any
