"""CIFAR-10 (50,000 train / 10,000 test 32x32 colour images), read by torchvision's own loader."""

import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Literal

from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import extract_archive

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.transforms import SeededFlips, image_transform

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    """The data set is missing, incomplete or corrupt, and cannot be fetched."""


def _not_found(root: Path) -> DataNotFoundError:
    return DataNotFoundError(
        f"CIFAR-10 not found or corrupted in {root}. Put either the extracted '{FOLDER}/' folder or "
        f"'{ARCHIVE}' (from {URL}) in that folder, or set `download: true` to fetch it when online."
    )


def _extract(archive: Path) -> None:
    root = archive.parent
    # Extract next to the data and move into place only when complete, so that an interrupted
    # extraction never leaves a half-filled folder that looks like data.
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            extract_archive(str(archive), tmp)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DataNotFoundError(
                f"Could not extract {archive}: {err}. The file is corrupt or incomplete: replace it with a "
                f"fresh copy of {URL}, or delete it and set `download: true` to fetch it when online."
            ) from err
        if not (Path(tmp) / FOLDER).is_dir():
            raise DataNotFoundError(f"{archive} does not contain the folder '{FOLDER}/'; is it CIFAR-10?")
        try:
            (Path(tmp) / FOLDER).rename(root / FOLDER)
        except OSError:
            # every node's first process prepares the data (prepare_data_per_node): on a shared file system another
            # node may have moved its complete copy into place first, and this one is dropped with the tmp folder
            if not (root / FOLDER).is_dir():
                raise


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 as `(image, label)` batches, images float32 (B, 3, 32, 32) in [-1, 1].

    `batch_size` is the global batch size (paper: 128): `setup()` divides it by the trainer's world size into
    `per_process_batch_size`, and raises ValueError when it does not divide. Train uses the 50,000 training
    images with random horizontal flips (paper, Appendix B); val and test both use the 10,000 test images,
    unflipped. `prepare_data()` extracts `cifar-10-python.tar.gz` if only the archive is present, or
    downloads it when `download` is true.
    """

    name = "cifar10"
    channels = 3
    image_size = 32

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        random_flip: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        num_predict: int = 64,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed, num_predict)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.download = download
        self.random_flip = random_flip

    def prepare_data(self) -> None:
        """Make `data_dir/cifar-10-batches-py/` exist: extract the archive found there, or download it."""
        if (self.data_dir / FOLDER).is_dir() or (self.trainer is not None and self.trainer.predicting):
            return
        if (self.data_dir / ARCHIVE).is_file():
            _extract(self.data_dir / ARCHIVE)
            return
        if not self.download:
            raise _not_found(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            CIFAR10(self.data_dir, train=True, download=True)
        except OSError as err:  # offline: urllib's URLError and socket errors are OSErrors
            raise _not_found(self.data_dir) from err

    def setup(self, stage: str | None = None) -> None:
        self._update_per_process_batch_size()
        if stage == "predict":  # sampling needs no images
            return
        if stage in (None, "fit"):
            # flips decided by (seed, epoch, index): restored exactly on resume (SeededFlips)
            self.train_set = SeededFlips(self._load(train=True, random_flip=False), self.seed, self.random_flip)
        if self.val_set is None:
            self.val_set = self.test_set = self._load(train=False, random_flip=False)

    def real_images_dataset(self, split: Literal["train", "val", "test"] = "train") -> CIFAR10:
        """Un-augmented `(image, label)` items of `split`, e.g. for FID reference statistics."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        return self._load(train=split == "train", random_flip=False)

    def _load(self, train: bool, random_flip: bool) -> CIFAR10:
        try:
            return CIFAR10(self.data_dir, train=train, transform=image_transform(random_flip))
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise _not_found(self.data_dir) from err
