"""Pixel-range conversions shared by the data modules, callbacks and sampling.

The model works in [-1, 1] (Ho et al. 2020, Sec. 3.3: "scaled linearly to [-1, 1]"); files and FID want uint8.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from ddpm_lightning.data.base import IMAGE_KEYS
from ddpm_lightning.io import to_uint8

__all__ = ["SeededFlips", "ToModelRange", "image_transform", "seeded_flip", "to_model_range", "to_uint8"]


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to the model's range [-1, 1]."""
    return x * 2 - 1


class ToModelRange:
    """Transform form of `to_model_range`: a class, not a lambda, so DataLoader workers can pickle it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_range(x)


def image_transform(random_flip: bool) -> transforms.Compose:
    """PIL image -> float32 (C, H, W) in [-1, 1], optionally flipped left-right with probability 1/2."""
    steps = [transforms.RandomHorizontalFlip()] if random_flip else []
    return transforms.Compose([*steps, transforms.ToTensor(), ToModelRange()])


def seeded_flip(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is flipped in epoch ``epoch``: probability 1/2, a function of the three numbers alone,
    so that a resumed run and every DataLoader worker draw the flips of an uninterrupted run."""
    return bool(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 1)


class SeededFlips(Dataset):
    """``(image, ...)`` items of ``dataset``, flipped left-right when :func:`seeded_flip` says so (``random_flip``).

    Indexed by ``(epoch, index)`` keys (:class:`~ddpm_lightning.data.base.ResumableSampler`) or by a bare index
    (epoch 0).
    """

    def __init__(self, dataset: Dataset, seed: int, random_flip: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.dataset[index]
        if not (self.random_flip and seeded_flip(self.seed, epoch, index)):
            return item
        if isinstance(item, (tuple, list)):
            return (item[0].flip(-1), *item[1:])
        if isinstance(item, Mapping):  # the images under the first of IMAGE_KEYS the item has
            key = next(k for k in IMAGE_KEYS if k in item)
            return {**item, key: item[key].flip(-1)}
        return item.flip(-1)
