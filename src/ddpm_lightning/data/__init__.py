"""Data modules yielding `(image, label)` batches with images in [-1, 1], and the pixel-range helpers."""

from ddpm_lightning.data.base import images_of, labels_of, per_process_batch_size, stack_items
from ddpm_lightning.data.cifar10 import CIFAR10DataModule, DataNotFoundError
from ddpm_lightning.data.digits import EmbeddedDigitsDataModule, load_digits
from ddpm_lightning.data.image_folder import ImageFolderDataModule, UnreadableImageError
from ddpm_lightning.data.transforms import image_transform, to_model_range, to_uint8

__all__ = [
    "CIFAR10DataModule",
    "DataNotFoundError",
    "EmbeddedDigitsDataModule",
    "ImageFolderDataModule",
    "UnreadableImageError",
    "image_transform",
    "images_of",
    "labels_of",
    "stack_items",
    "load_digits",
    "per_process_batch_size",
    "to_model_range",
    "to_uint8",
]
