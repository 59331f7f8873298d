"""Pixel-range conversions shared by the data modules, callbacks and sampling.

The model works in [-1, 1] (Ho et al. 2020, Sec. 3.3: "scaled linearly to [-1, 1]"); files and FID want uint8.
"""

import torch
from torchvision import transforms


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to the model's range [-1, 1]."""
    return x * 2 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map model-range images to uint8 in [0, 255]; samples may overshoot [-1, 1], so clamp first."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ToModelRange:
    """Transform form of `to_model_range`: a class, not a lambda, so DataLoader workers can pickle it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_range(x)


def image_transform(random_flip: bool) -> transforms.Compose:
    """PIL image -> float32 (C, H, W) in [-1, 1], optionally flipped left-right with probability 1/2."""
    steps = [transforms.RandomHorizontalFlip()] if random_flip else []
    return transforms.Compose([*steps, transforms.ToTensor(), ToModelRange()])
